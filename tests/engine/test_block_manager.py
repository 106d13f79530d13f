"""BlockManager and Scheduler unit tests: ref counts, prefix-cache hits, LRU eviction, preemption order."""

from fast_inference.engine.block_manager import BlockManager
from fast_inference.engine.config import SchedulerConfig
from fast_inference.engine.outputs import RequestMetrics
from fast_inference.engine.sampling_params import SamplingParams
from fast_inference.engine.scheduler import Scheduler
from fast_inference.engine.sequence import Request, Sequence, SequenceStatus


def _seq(tokens, seq_id=0):
    req = Request(str(seq_id), None, list(tokens), SamplingParams(), RequestMetrics(0.0))
    seq = Sequence(
        seq_id=seq_id,
        request=req,
        index=0,
        token_ids=list(tokens),
        num_prompt_tokens=len(tokens),
        seed=0,
        max_tokens=100,
    )
    req.seqs.append(seq)
    return seq


def _compute(bm, seq, n):
    bm.grow(seq, seq.num_computed + n)
    seq.num_computed += n
    bm.register_full_blocks(seq)


def test_prefix_hits_share_blocks_and_keep_one_token_uncached():
    bm = BlockManager(8, 4, True)
    a = _seq(range(10))
    _compute(bm, a, 10)
    assert len(a.block_table) == 3 and len(a.block_hashes) == 2
    b = _seq(list(range(8)) + [99, 98])
    blocks, hashes = bm.lookup(b)
    assert blocks == a.block_table[:2]
    bm.take_hits(b, blocks, hashes)
    assert b.num_computed == 8
    assert [bm.ref_counts[x] for x in a.block_table[:2]] == [2, 2]
    # An exact block-aligned repeat leaves its last block to recompute (a logit row is needed).
    c = _seq(range(8))
    assert bm.lookup(c)[0] == a.block_table[:1]
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_free_blocks == 8 and all(r == 0 for r in bm.ref_counts)


def test_freed_cached_blocks_survive_until_evicted_lru():
    bm = BlockManager(4, 2, True)
    a = _seq([1, 2, 3, 4, 5])
    _compute(bm, a, 5)
    cached = a.block_table[:2]
    bm.free_seq(a)
    # Uncached blocks are handed out first; cached ones stay findable.
    x = _seq([7, 7])
    bm.grow(x, 2)
    assert x.block_table[0] not in cached
    assert bm.lookup(_seq([1, 2, 3, 4, 9]))[0] == cached
    # Needing every free block evicts the cached ones, oldest first (the prefix's tail last freed first).
    y = _seq(range(6))
    bm.grow(y, 6)
    assert bm.num_free_blocks == 0
    assert bm.lookup(_seq([1, 2, 3, 4, 9]))[0] == []
    bm.free_seq(x)
    bm.free_seq(y)
    assert bm.num_free_blocks == 4


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, 4, False)
    a = _seq(range(10))
    _compute(bm, a, 10)
    assert bm.lookup(_seq(range(10)))[0] == []


def test_fork_shares_full_blocks_only():
    bm = BlockManager(8, 4, False)
    a = _seq(range(10))
    _compute(bm, a, 10)
    child = _seq(range(10), seq_id=1)
    bm.fork(a, child)
    assert child.block_table == a.block_table[:2] and child.num_computed == 8
    assert bm.ref_counts[a.block_table[0]] == 2 and bm.ref_counts[a.block_table[2]] == 1
    bm.free_seq(a)
    bm.free_seq(child)
    assert bm.num_free_blocks == 8


def test_scheduler_budget_chunking_and_youngest_preempted():
    bm = BlockManager(4, 4, False)
    sched = Scheduler(
        SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=6,
            max_model_len=64,
            block_size=4,
            enable_prefix_caching=False,
        ),
        bm,
    )
    old, young = _seq(range(7), 0), _seq(range(5), 1)
    sched.add(old)
    sched.add(young)
    out = sched.schedule()
    assert [s.seq_id for s in out.seqs] == [0] and out.num_new_tokens == [6]  # chunk under the budget
    old.num_computed += 6
    out = sched.schedule()
    assert [s.seq_id for s in out.seqs] == [0, 1] and out.num_new_tokens == [1, 5]
    old.num_computed += 1
    young.num_computed += 5
    assert bm.num_free_blocks == 0  # 2 blocks each
    old.token_ids.append(1)  # sampled tokens: both still fit their second block
    young.token_ids.append(2)
    out = sched.schedule()
    assert out.num_new_tokens == [1, 1] and not out.preempted
    old.num_computed += 1
    young.num_computed += 1
    old.token_ids.append(3)  # old's 9th token needs a third block: the youngest gives its blocks back
    young.token_ids.append(4)
    out = sched.schedule()
    assert out.preempted == [young] and [s.seq_id for s in out.seqs] == [0]
    assert young.status is SequenceStatus.WAITING and young.block_table == [] and young.num_computed == 0
    assert sched.waiting[0] is young and len(old.block_table) == 3
