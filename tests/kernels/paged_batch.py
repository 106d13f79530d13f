"""Paged-attention test helpers shared by the CPU and CUDA suites: random batches and the one tolerance table."""

import torch

from fast_inference import ops
from fast_inference.ops import reference as ref

# paged_attention vs ops.reference, per dtype (rtol, atol), on every device: softmax and accumulation are
# float32; the bf16 kernels round P to bf16 for the p.v products (as flash attention does), hence its bound.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def check_against_reference(args, *, causal=True, scale=None, dtype=torch.float32):
    """ops.paged_attention(*args) equals the reference within TOLERANCE[dtype]; returns the kernel's output."""
    scale = args[0].shape[-1] ** -0.5 if scale is None else scale
    got = ops.paged_attention(*args, scale, causal=causal)
    want = ref.paged_attention(*args, scale, causal=causal)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return got


def make_batch(
    query_lens,
    seq_lens,
    *,
    num_heads,
    num_kv_heads,
    head_size,
    block_size,
    dtype,
    device,
    seed=0,
    extra_blocks=3,
    extra_table_blocks=1,
):
    """Random caches and a shuffled (non-contiguous) block table holding every sequence's context."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
    max_blocks = max(blocks_per_seq) + extra_table_blocks
    num_blocks = sum(blocks_per_seq) + extra_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    value_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    perm = torch.randperm(num_blocks, generator=gen)
    # Unused table entries hold a block id that is out of range: the kernel must never read them.
    block_tables = torch.full((len(seq_lens), max_blocks), num_blocks + 1000, dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks_per_seq):
        block_tables[s, :n] = perm[used : used + n].to(torch.int32)
        used += n
    cu = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(query_lens).cumsum(0)
    query = torch.randn(int(cu[-1]), num_heads, head_size, generator=gen).to(dtype=dtype, device=device)
    return (
        query,
        key_cache,
        value_cache,
        block_tables.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        cu.to(device),
    )
