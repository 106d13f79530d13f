"""Scheduler: continuous batching with decode-first chunked prefill under a step-latency budget (a step cost
model fitted to observed step times), prefix-cache admission and preemption by recompute; after each forward,
update() does the bookkeeping (computed tokens, prefix-cache blocks, n > 1 forks) and finish() frees the
sequences the sampled tokens ended."""

import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import SchedulerConfig
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each sequence computes this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def sample_token_rows(self) -> list[int]:
        """Flat index (into this step's new tokens) of the last token of every sequence that computes
        its last token now, i.e. samples: one logits row each, in batch order."""
        rows = []
        end = -1
        for seq, n in zip(self.seqs, self.num_new_tokens):
            end += n
            if seq.num_computed + n == seq.num_tokens:
                rows.append(end)
        return rows


class StepCostModel:
    """cost(tokens) ~ a + b * tokens seconds for one engine step, fitted to the observed steps by least
    squares with exponentially decaying weights (the machine's load drifts; a shared CPU more so).

    a is what every step pays (weights streamed once, per-layer dispatch, sampling), b what each scheduled
    token adds. While the observed token counts barely vary (a run of same-size decode steps), a and b
    cannot be told apart: b is then the cost per token with a = 0, which over-estimates b, so budgets from it
    err on the short side."""

    def __init__(self, decay: float = 0.97):
        self.decay = decay
        self.weight = self.sum_x = self.sum_xx = self.sum_y = self.sum_xy = 0.0
        self.fixed = 0.0  # a, seconds
        self.per_token = 0.0  # b, seconds

    @property
    def ready(self) -> bool:
        return self.weight > 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < 1 or seconds <= 0.0:
            return
        d = self.decay
        self.weight = self.weight * d + 1.0
        self.sum_x = self.sum_x * d + tokens
        self.sum_xx = self.sum_xx * d + tokens * tokens
        self.sum_y = self.sum_y * d + seconds
        self.sum_xy = self.sum_xy * d + tokens * seconds
        mean_x, mean_y = self.sum_x / self.weight, self.sum_y / self.weight
        var_x = self.sum_xx / self.weight - mean_x * mean_x
        if var_x > 1.0:  # token counts spread by more than a token: a and b separate
            b = (self.sum_xy / self.weight - mean_x * mean_y) / var_x
            a = mean_y - b * mean_x
            if b > 0.0 and a >= 0.0:
                self.fixed, self.per_token = a, b
                return
        self.fixed, self.per_token = 0.0, mean_y / mean_x

    def cost(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    def tokens_within(self, seconds: float) -> int:
        """The most tokens one step can carry and still cost at most `seconds`."""
        if self.per_token <= 0.0:
            return 1 << 30
        return int((seconds - self.fixed) / self.per_token + 1e-6)  # + 1e-6: 39.9999... tokens is 40


class Scheduler:
    """Each step: running decodes first, then unfinished prompt chunks of running sequences, then waiting
    ones, while the token budget, the sequence cap and the free blocks allow. When a running sequence cannot
    get a block, the youngest running sequence is preempted (blocks freed, recomputed later).

    Token budget: max_num_batched_tokens per step; and a step that carries decodes takes prompt tokens only
    up to its latency target, max(target_itl_ms, twice the modelled cost of its decodes alone), from the
    step cost model (observe_step), but always at least one block's worth so prompts keep advancing. A step
    without decodes (nobody waits for a token) fills the whole budget."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.step_cost = StepCostModel()

    def observe_step(self, batch: SchedulerOutput, seconds: float) -> None:
        """Feed one finished step's wall time (schedule to outputs) to the cost model."""
        self.step_cost.observe(sum(batch.num_new_tokens), seconds)

    def prefill_budget(self, num_decodes: int, budget: int) -> int:
        """Prompt tokens a step with num_decodes decodes may add, of the budget left after them."""
        cost = self.step_cost
        if num_decodes == 0 or not cost.ready:
            return budget
        target = max(self.config.target_itl_ms / 1e3, 2.0 * cost.cost(num_decodes))
        return min(budget, max(cost.tokens_within(target) - num_decodes, self.config.block_size))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.bm
        running = self.running
        num_decodes = 0
        stopped = False  # a running sequence could not get its blocks, even after preempting the younger
        # Pass 1: decodes (one new token each), all of them; pass 2: running prompt chunks.
        for decodes in (True, False):
            if not decodes:
                prefill_left = self.prefill_budget(num_decodes, budget)
            i = 0
            while not stopped and i < len(running) and budget > 0:
                seq = running[i]
                i += 1
                remaining = seq.num_tokens - seq.num_computed
                if (remaining == 1) != decodes:
                    continue
                num_new = 1 if decodes else min(remaining, prefill_left)
                if num_new <= 0:
                    break
                target = seq.num_computed + num_new
                while not bm.can_grow(seq, target):
                    victim = running.pop()
                    self._preempt(victim)
                    out.preempted.append(victim)
                    if victim is seq:
                        stopped = True
                        break
                    k = next((k for k, s in enumerate(out.seqs) if s is victim), -1)
                    if k >= 0:  # scheduled in the decode pass: take it back out
                        out.seqs.pop(k)
                        budget += out.num_new_tokens.pop(k)
                        num_decodes -= 1
                if stopped:
                    break
                bm.grow(seq, target)
                out.seqs.append(seq)
                out.num_new_tokens.append(num_new)
                budget -= num_new
                if decodes:
                    num_decodes += 1
                else:
                    prefill_left -= num_new
        if out.preempted:
            return out  # memory is tight: admit nothing new this step
        prefill_left = min(prefill_left, budget)
        waiting = self.waiting
        while waiting and prefill_left > 0 and len(running) < self.config.max_num_seqs:
            seq = waiting[0]
            # Prompt logprobs need every prompt position's logits: no prefix-cache hits for those.
            hits, hashes = bm.lookup(seq) if seq.request.prompt_logprobs is None else ([], [])
            cached = len(hits) * bm.block_size
            num_new = min(seq.num_tokens - cached, prefill_left)
            need = bm.blocks_needed(cached + num_new) - len(hits)
            if need > bm.num_free_after_hits(hits):
                break
            waiting.popleft()
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = time.time()
            if seq.num_output_tokens == 0:
                bm.record_query(seq.num_tokens, cached)
                seq.request.num_cached_tokens = max(seq.request.num_cached_tokens, cached)
            bm.take_hits(seq, hits, hashes)
            bm.grow(seq, cached + num_new)
            seq.status = SequenceStatus.RUNNING
            running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(num_new)
            prefill_left -= num_new
        return out

    def update(self, batch: SchedulerOutput) -> tuple[list[Sequence], list[int]]:
        """After the forward: count the computed tokens, publish newly full blocks in the prefix cache,
        and fork the n > 1 requests whose prompt has just been computed (the forks share its full blocks
        and sample from its logits row). Returns the sequences that sample now and, for each, its row in
        the logits of batch.sample_token_rows()."""
        samplers: list[Sequence] = []
        rows: list[int] = []
        bm = self.bm
        row = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += n
            bm.register_full_blocks(seq)
            if seq.num_computed < seq.num_tokens:
                continue  # a prompt chunk: nothing to sample yet
            samplers.append(seq)
            rows.append(row)
            req = seq.request
            for index in range(1, req.pending_forks + 1):
                child = seq.fork(index)
                bm.fork(seq, child)
                self.running.append(child)
                req.seqs.append(child)
                samplers.append(child)
                rows.append(row)
            req.pending_forks = 0
            row += 1
        return samplers, rows

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and give its blocks back.

        Not part of update(): update() runs before sampling (a fork samples in the step that forks it,
        from its parent's logits row), and whether a sequence has finished is known only once the output
        processor has applied the stop rules to the token it sampled."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
