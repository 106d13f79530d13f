"""Scheduler: continuous batching with chunked prefill, prefix-cache admission and preemption by recompute;
after each forward, update() does the bookkeeping (computed tokens, prefix-cache blocks, n > 1 forks) and
finish() frees the sequences the sampled tokens ended."""

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


class Scheduler:
    """Each step: running sequences first (decodes and unfinished prompt chunks), in admission order,
    then waiting ones while the token budget, the sequence cap and the free blocks allow. When a running
    sequence cannot get a block, the youngest running sequence is preempted (blocks freed, recomputed later)."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

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
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            target = seq.num_computed + num_new
            scheduled = True
            while not bm.can_grow(seq, target):
                victim = running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            bm.grow(seq, target)
            out.seqs.append(seq)
            out.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        if out.preempted:
            return out  # memory is tight: admit nothing new this step
        waiting = self.waiting
        while waiting and budget > 0 and len(running) < self.config.max_num_seqs:
            seq = waiting[0]
            # Prompt logprobs need every prompt position's logits: no prefix-cache hits for those.
            hits, hashes = bm.lookup(seq) if seq.request.prompt_logprobs is None else ([], [])
            cached = len(hits) * bm.block_size
            num_new = min(seq.num_tokens - cached, budget)
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
            budget -= num_new
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
