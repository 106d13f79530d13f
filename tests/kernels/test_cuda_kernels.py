"""CUDA-specific tests of the KV-cache and paged-attention kernels against the pure-PyTorch references.

Covers what only the CUDA kernels have: the head-size buckets, run-time block sizes, the split-KV
decode path (contexts past the 512-token split) and its reduction, the query-tile mapping of the
prefill kernel, NaN rows for out-of-range block ids, CUDA graph capture, and host<->device swaps.
"""

import paged_batch
import pytest
import torch
from paged_batch import TOLERANCE, check_against_reference

from fast_inference import ops
from fast_inference.ops import reference as ref

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPLIT = 512  # the decode kernel's fixed split size (kPartitionSize)


def make_batch(query_lens, seq_lens, *, extra_table_blocks=2, **kwargs):
    """paged_batch.make_batch on the GPU, with spare (out-of-range) block-table columns by default."""
    return paged_batch.make_batch(
        query_lens, seq_lens, device="cuda", extra_table_blocks=extra_table_blocks, **kwargs
    )


# ---- paged_attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("block_size", [8, 32, 128])
def test_mixed_batch_head_and_block_sizes(dtype, head_size, block_size):
    # decode, decode at exactly a block, prefill, chunked prefill over a cached prefix, one past a block
    query_lens = [1, 1, 33, 7, 9, 1]
    seq_lens = [50, block_size, 33, 40 + block_size, block_size + 1, 1]
    args = make_batch(
        query_lens,
        seq_lens,
        num_heads=8,
        num_kv_heads=2,
        head_size=head_size,
        block_size=block_size,
        dtype=dtype,
    )
    check_against_reference(args, causal=True, dtype=dtype)
    check_against_reference(args, causal=False, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_kv_decode_long_contexts(dtype):
    # around and past the split size, many splits, and a sequence using exactly one split
    seq_lens = [SPLIT - 1, SPLIT, SPLIT + 1, 2 * SPLIT, 3 * SPLIT + 17, 9000, 1]
    args = make_batch(
        [1] * len(seq_lens), seq_lens, num_heads=16, num_kv_heads=4, head_size=128, block_size=16, dtype=dtype
    )
    check_against_reference(args, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_long_prefix_prefill_and_decode_mixed(dtype):
    # chunked prefill over a long cached prefix next to long decodes (the split-KV reduction) in one batch
    query_lens = [1, 300, 1, 64, 2]
    seq_lens = [5000, 2100, 1300, 64, 4000]
    args = make_batch(
        query_lens, seq_lens, num_heads=8, num_kv_heads=2, head_size=64, block_size=64, dtype=dtype
    )
    check_against_reference(args, causal=True, dtype=dtype)
    check_against_reference(args, causal=False, dtype=dtype)


def test_prefill_tile_mapping_many_sequences():
    # query lengths around the f32 kernel's 32-row tiles (head 128) and the tensor-core kernel's 64-row
    # tiles, so that the tiles of neighbouring sequences meet in every way
    query_lens = [2, 31, 32, 33, 1, 64, 65, 3, 95, 1, 1, 127, 2, 96]
    seq_lens = [q + extra for q, extra in zip(query_lens, [0, 5, 40, 0, 9, 100, 0, 1, 33, 1000, 2, 0, 7, 12])]
    args = make_batch(
        query_lens, seq_lens, num_heads=4, num_kv_heads=2, head_size=128, block_size=16, dtype=torch.float32
    )
    check_against_reference(args, causal=True, dtype=torch.float32)
    # f32 head 256 uses 16-row tiles; bf16 runs on tensor cores with 64-row tiles
    args = make_batch(
        query_lens, seq_lens, num_heads=2, num_kv_heads=1, head_size=256, block_size=8, dtype=torch.float32
    )
    check_against_reference(args, causal=True, dtype=torch.float32)
    args = make_batch(
        query_lens, seq_lens, num_heads=2, num_kv_heads=1, head_size=256, block_size=8, dtype=torch.bfloat16
    )
    check_against_reference(args, causal=True, dtype=torch.bfloat16)


def test_non_contiguous_query_and_out():
    query_lens, seq_lens = [1, 20, 1], [600, 30, 7]
    query, kc, vc, bt, sl, cu = make_batch(
        query_lens, seq_lens, num_heads=8, num_kv_heads=2, head_size=128, block_size=16, dtype=torch.float16
    )
    # query as a slice of a fused qkv projection, out as a slice of a wider buffer
    qkv = torch.randn(query.shape[0], 12, 128, device="cuda", dtype=torch.float16)
    qkv[:, :8] = query
    q_view = qkv[:, :8]
    out_buffer = torch.zeros(query.shape[0], 10, 128, device="cuda", dtype=torch.float16)
    out_view = out_buffer[:, 1:9]
    ops.paged_attention(q_view, kc, vc, bt, sl, cu, 128**-0.5, out=out_view)
    want = ref.paged_attention(query, kc, vc, bt, sl, cu, 128**-0.5)
    rtol, atol = TOLERANCE[torch.float16]
    torch.testing.assert_close(out_view, want, rtol=rtol, atol=atol)
    assert out_buffer[:, 0].abs().max() == 0 and out_buffer[:, 9].abs().max() == 0


def test_decode_is_batch_invariant():
    # fixed split size: a sequence's output does not depend on what else is in the batch
    seq_lens = [3000, 40, 1200, 513]
    args = make_batch(
        [1] * 4, seq_lens, num_heads=8, num_kv_heads=2, head_size=128, block_size=16, dtype=torch.bfloat16
    )
    query, kc, vc, bt, sl, cu = args
    batched = ops.paged_attention(*args, 128**-0.5)
    for s in range(4):
        alone = ops.paged_attention(
            query[s : s + 1],
            kc,
            vc,
            bt[s : s + 1],
            sl[s : s + 1],
            torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
            128**-0.5,
        )
        assert torch.equal(alone, batched[s : s + 1])


def test_out_of_range_block_id_gives_nan_rows_only():
    query_lens, seq_lens = [1, 1, 10, 4], [1000, 100, 40, 30]
    query, kc, vc, bt, sl, cu = make_batch(
        query_lens, seq_lens, num_heads=4, num_kv_heads=2, head_size=64, block_size=16, dtype=torch.float32
    )
    bad = bt.clone()
    bad[0, 40] = kc.shape[0]  # decode sequence, second split
    bad[2, 1] = -5  # prefill sequence
    got = ops.paged_attention(query, kc, vc, bad, sl, cu, 0.125)
    want = ref.paged_attention(query, kc, vc, bt, sl, cu, 0.125)
    assert torch.isnan(got[0]).all() and torch.isnan(got[2:12]).all()
    torch.testing.assert_close(
        got[1], want[1], rtol=TOLERANCE[torch.float32][0], atol=TOLERANCE[torch.float32][1]
    )
    torch.testing.assert_close(
        got[12:], want[12:], rtol=TOLERANCE[torch.float32][0], atol=TOLERANCE[torch.float32][1]
    )


def test_inconsistent_seq_lens_give_nan_rows_only():
    query_lens, seq_lens = [1, 8, 1], [20, 30, 50]
    query, kc, vc, bt, sl, cu = make_batch(
        query_lens, seq_lens, num_heads=2, num_kv_heads=1, head_size=64, block_size=16, dtype=torch.float32
    )
    bad = sl.clone()
    bad[1] = 5  # shorter than its 8 new tokens
    bad[2] = bt.shape[1] * 16 + 1  # past its block-table row
    got = ops.paged_attention(query, kc, vc, bt, bad, cu, 0.125)
    assert torch.isnan(got[1:]).all()
    want = ref.paged_attention(query, kc, vc, bt, sl, cu, 0.125)
    torch.testing.assert_close(
        got[0], want[0], rtol=TOLERANCE[torch.float32][0], atol=TOLERANCE[torch.float32][1]
    )


def test_decode_cuda_graph_capture_and_replay():
    batch, max_blocks, block_size = 8, 160, 16
    query, kc, vc, bt, sl, cu = make_batch(
        [1] * batch,
        [max_blocks * block_size - 7] * batch,
        num_heads=8,
        num_kv_heads=2,
        head_size=128,
        block_size=block_size,
        dtype=torch.bfloat16,
        extra_table_blocks=0,
    )
    out = torch.empty_like(query)
    scale = 128**-0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as torch recommends
        ops.paged_attention(query, kc, vc, bt, sl, cu, scale, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_attention(query, kc, vc, bt, sl, cu, scale, out=out)
    for step, lens in enumerate(
        [[2000, 1, 17, 512, 513, 1500, 2553, 100], [5, 4000 // 2, 9, 1024, 1, 77, 2000, 2553]]
    ):
        query.copy_(torch.randn_like(query, dtype=torch.float32).to(query.dtype))
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        want = ref.paged_attention(query, kc, vc, bt, sl, cu, scale)
        rtol, atol = TOLERANCE[torch.bfloat16]
        torch.testing.assert_close(out, want, rtol=rtol, atol=atol, msg=f"replay {step}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_size", [8, 40, 104, 200])
def test_other_head_sizes_use_the_next_bucket(dtype, head_size):
    # head sizes that are not multiples of 16 leave zero padding columns in the tensor-core tiles
    args = make_batch(
        [1, 9, 70],
        [900, 20, 75],
        num_heads=4,
        num_kv_heads=2,
        head_size=head_size,
        block_size=16,
        dtype=dtype,
    )
    check_against_reference(args, dtype=dtype)


# ---- KV-cache ops ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,num_kv_heads,head_size", [(8, 8, 128), (128, 1, 64), (16, 4, 80)])
def test_reshape_and_cache_strided_key(dtype, block_size, num_kv_heads, head_size):
    gen = torch.Generator().manual_seed(3)
    num_blocks, num_tokens = 7, 45
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device="cuda")
    value_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device="cuda")
    # key and value as views into a fused [tokens, q + k + v heads] projection
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_size, generator=gen).to(dtype=dtype, device="cuda")
    key, value = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 2 * num_kv_heads :]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::4] = -1
    slot_mapping = slots.cuda()
    k_ref, v_ref = key_cache.clone(), value_cache.clone()
    ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    ref.reshape_and_cache(key, value, k_ref, v_ref, slot_mapping)
    assert torch.equal(key_cache, k_ref) and torch.equal(value_cache, v_ref)


def test_reshape_and_cache_unaligned_rows_and_out_of_range_slot():
    # an odd element offset forces the 2-byte copy unit; an out-of-range slot is skipped on the device
    flat = torch.randn(1 + 5 * 2 * 64 * 2, device="cuda", dtype=torch.float16)
    key = flat[1 : 1 + 640].view(5, 2, 64)
    value = flat[1 + 640 :].view(5, 2, 64)
    key_cache = torch.zeros(4, 8, 2, 64, device="cuda", dtype=torch.float16)
    value_cache = torch.zeros_like(key_cache)
    slot_mapping = torch.tensor([3, 31, 10_000, -1, 0], device="cuda")
    ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    k_ref, v_ref = torch.zeros_like(key_cache), torch.zeros_like(value_cache)
    keep = torch.tensor([True, True, False, True, True], device="cuda")
    ref.reshape_and_cache(key[keep], value[keep], k_ref, v_ref, slot_mapping[keep])
    assert torch.equal(key_cache, k_ref) and torch.equal(value_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_many_layers(dtype):
    gen = torch.Generator().manual_seed(4)
    shape = (12, 16, 2, 80)
    keys = [torch.randn(shape, generator=gen).to(dtype=dtype, device="cuda") for _ in range(5)]
    values = [torch.randn(shape, generator=gen).to(dtype=dtype, device="cuda") for _ in range(5)]
    mapping = torch.tensor([[0, 5], [3, 7], [11, 1], [2, 2]], dtype=torch.int64, device="cuda")
    keys_ref, values_ref = [k.clone() for k in keys], [v.clone() for v in values]
    ops.copy_blocks(keys, values, mapping)
    ref.copy_blocks(keys_ref, values_ref, mapping)
    for got, want in zip(keys + values, keys_ref + values_ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize("direction", ["gpu_to_cpu", "cpu_to_gpu", "gpu_to_gpu"])
@pytest.mark.parametrize("pinned", [True, False])
def test_swap_blocks_between_devices(direction, pinned):
    gen = torch.Generator().manual_seed(5)
    src_device, dst_device = {
        "gpu_to_cpu": ("cuda", "cpu"),
        "cpu_to_gpu": ("cpu", "cuda"),
        "gpu_to_gpu": ("cuda", "cuda"),
    }[direction]
    src = torch.randn(9, 16, 2, 64, generator=gen).to(torch.bfloat16)
    dst = torch.randn(6, 16, 2, 64, generator=gen).to(torch.bfloat16)
    src, dst = src.to(src_device), dst.to(dst_device)
    if pinned:
        src = src.pin_memory() if src_device == "cpu" else src
        dst = dst.pin_memory() if dst_device == "cpu" else dst
    mapping = torch.tensor([[8, 0], [2, 5], [4, 1]], dtype=torch.int64)
    dst_ref = dst.clone()
    ops.swap_blocks(src, dst, mapping)
    torch.cuda.synchronize()
    ref.swap_blocks(src, dst_ref, mapping)
    assert torch.equal(dst.cpu(), dst_ref.cpu())


def test_swap_blocks_rejects_out_of_range_ids():
    src = torch.zeros(4, 8, device="cuda")
    dst = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="block_mapping"):
        ops.swap_blocks(src, dst, torch.tensor([[3, 2]]))
