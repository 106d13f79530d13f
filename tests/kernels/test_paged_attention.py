"""Tests of paged_attention against the pure-PyTorch reference: decode, prefill, chunked prefill, GQA."""

import pytest
import torch

from fast_inference import ops
from fast_inference.ops import reference as ref

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def make_batch(query_lens, seq_lens, *, num_heads, num_kv_heads, head_size, block_size, dtype, device, seed=0,
               extra_blocks=3):
    """Random caches and a shuffled (non-contiguous) block table holding every sequence's context."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + extra_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    value_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks_per_seq):
        block_tables[s, :n] = perm[used : used + n].to(torch.int32)
        used += n
    cu = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(query_lens).cumsum(0)
    query = torch.randn(int(cu[-1]), num_heads, head_size, generator=gen).to(dtype=dtype, device=device)
    return (query, key_cache, value_cache, block_tables.to(device),
            torch.tensor(seq_lens, dtype=torch.int32, device=device), cu.to(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_mixed_batch_matches_reference(device, dtype, causal):
    # decode, decode at exactly a block, full prefill, chunked prefill over a cached prefix, one past a block
    query_lens = [1, 1, 33, 7, 17]
    seq_lens = [50, 16, 33, 40, 17]
    args = make_batch(query_lens, seq_lens, num_heads=8, num_kv_heads=2, head_size=64, block_size=16,
                      dtype=dtype, device=device)
    scale = 64 ** -0.5
    got = ops.paged_attention(*args, scale, causal=causal)
    want = ref.paged_attention(*args, scale, causal=causal)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
