"""Scheduler: continuous batching with chunked prefill, prefix-cache admission and preemption by recompute."""

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
            hits, hashes = bm.lookup(seq)
            cached = len(hits) * bm.block_size
            num_new = min(seq.num_tokens - cached, budget)
            need = bm.blocks_needed(cached + num_new) - len(hits)
            if need > bm.num_free_after_hits(hits):
                break
            waiting.popleft()
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

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and give its blocks back."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
