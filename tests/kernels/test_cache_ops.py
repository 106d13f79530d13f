"""Tests of the KV-cache ops (reshape_and_cache, copy_blocks, swap_blocks) against the references."""

import pytest
import torch

from fast_inference import ops
from fast_inference.ops import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_cache(num_blocks, block_size, num_kv_heads, head_size, dtype, device, gen):
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,num_kv_heads,head_size", [(16, 2, 64), (8, 1, 128), (128, 4, 80)])
def test_reshape_and_cache_matches_reference(device, dtype, block_size, num_kv_heads, head_size):
    gen = torch.Generator().manual_seed(0)
    num_blocks, num_tokens = 6, 37
    key_cache = make_cache(num_blocks, block_size, num_kv_heads, head_size, dtype, device, gen)
    value_cache = make_cache(num_blocks, block_size, num_kv_heads, head_size, dtype, device, gen)
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype=dtype, device=device)
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1  # padding tokens are skipped
    slot_mapping = slots.to(device)
    k_ref, v_ref = key_cache.clone(), value_cache.clone()
    ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    ref.reshape_and_cache(key, value, k_ref, v_ref, slot_mapping)
    torch.testing.assert_close(key_cache, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(value_cache, v_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(1)
    layers = 3
    keys = [make_cache(10, 16, 2, 64, dtype, device, gen) for _ in range(layers)]
    values = [make_cache(10, 16, 2, 64, dtype, device, gen) for _ in range(layers)]
    mapping = torch.tensor([[0, 5], [3, 7], [9, 1]], dtype=torch.int64, device=device)
    keys_ref, values_ref = [k.clone() for k in keys], [v.clone() for v in values]
    ops.copy_blocks(keys, values, mapping)
    ref.copy_blocks(keys_ref, values_ref, mapping)
    for got, want in zip(keys + values, keys_ref + values_ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_blocks_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(2)
    src = make_cache(8, 16, 2, 64, dtype, device, gen)
    dst = make_cache(5, 16, 2, 64, dtype, "cpu", gen)
    mapping = torch.tensor([[7, 0], [2, 4], [3, 1]], dtype=torch.int64)
    dst_ref = dst.clone()
    ops.swap_blocks(src, dst, mapping)
    ref.swap_blocks(src, dst_ref, mapping)
    torch.testing.assert_close(dst, dst_ref, rtol=0, atol=0)
