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


def test_reshape_and_cache_strided_key(device):
    # key/value sliced out of a fused qkv projection: token stride > num_kv_heads * head_size
    gen = torch.Generator().manual_seed(3)
    num_tokens, kv_heads, head = 9, 2, 64
    qkv = torch.randn(num_tokens, 4 * kv_heads * head, generator=gen).to(device)
    key = qkv[:, 2 * kv_heads * head : 3 * kv_heads * head].view(num_tokens, kv_heads, head)
    value = qkv[:, 3 * kv_heads * head :].view(num_tokens, kv_heads, head)
    key_cache = torch.zeros(4, 8, kv_heads, head, device=device)
    value_cache = torch.zeros_like(key_cache)
    slot_mapping = torch.tensor([0, 3, 9, 10, 31, -1, 17, 8, 1], device=device)
    k_ref, v_ref = key_cache.clone(), value_cache.clone()
    ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    ref.reshape_and_cache(key, value, k_ref, v_ref, slot_mapping)
    torch.testing.assert_close(key_cache, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(value_cache, v_ref, rtol=0, atol=0)


def test_copy_blocks_no_layers_or_pairs(device):
    ops.copy_blocks([], [], torch.zeros(0, 2, dtype=torch.int64, device=device))
    cache = torch.randn(3, 8, 1, 64, device=device)
    before = cache.clone()
    ops.copy_blocks([cache], [cache.clone()], torch.zeros(0, 2, dtype=torch.int64, device=device))
    torch.testing.assert_close(cache, before, rtol=0, atol=0)


def test_opcheck(device):
    gen = torch.Generator().manual_seed(4)
    key_cache = make_cache(4, 8, 2, 64, torch.float32, device, gen)
    value_cache = make_cache(4, 8, 2, 64, torch.float32, device, gen)
    key = torch.randn(5, 2, 64, generator=gen).to(device)
    value = torch.randn(5, 2, 64, generator=gen).to(device)
    slots = torch.tensor([0, 9, -1, 31, 4], device=device)
    torch.library.opcheck(
        torch.ops.fast_inference.reshape_and_cache.default, (key, value, key_cache, value_cache, slots)
    )
    mapping = torch.tensor([[0, 2], [1, 3]], device=device)
    torch.library.opcheck(
        torch.ops.fast_inference.copy_blocks.default,
        ([key_cache, key_cache.clone()], [value_cache, value_cache.clone()], mapping),
    )
    dst = make_cache(3, 8, 2, 64, torch.float32, "cpu", gen)
    torch.library.opcheck(
        torch.ops.fast_inference.swap_blocks.default, (key_cache, dst, torch.tensor([[3, 0], [1, 2]]))
    )


# ---- bad input: an exception that names the argument ----------------------------------------------


def cache_args(device="cpu"):
    gen = torch.Generator().manual_seed(5)
    return [
        torch.randn(4, 2, 64, generator=gen).half().to(device),
        torch.randn(4, 2, 64, generator=gen).half().to(device),
        make_cache(3, 8, 2, 64, torch.float16, device, gen),
        make_cache(3, 8, 2, 64, torch.float16, device, gen),
        torch.tensor([0, 5, 23, -1], device=device),
    ]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(0, a[0].float()), "key dtype"),
        (lambda a: a.__setitem__(1, a[1][:, :1]), "value shape"),
        (lambda a: a.__setitem__(1, a[1][:3]), "value has 3 tokens but key has 4"),
        (
            lambda a: a.__setitem__(0, a[0].transpose(1, 2).contiguous().transpose(1, 2)),
            "key must have unit stride",
        ),
        (lambda a: a.__setitem__(2, a[2][..., :32].contiguous()), "value_cache shape"),
        (
            lambda a: a.__setitem__(2, a[2].transpose(0, 1).contiguous().transpose(0, 1)),
            "key_cache must be contiguous",
        ),
        (lambda a: a.__setitem__(3, a[3].bfloat16()), "value_cache dtype"),
        (lambda a: a.__setitem__(2, a[2][0]), "key_cache must be 4-D"),
        (lambda a: a.__setitem__(4, a[4].int()), "slot_mapping must be int64"),
        (lambda a: a.__setitem__(4, a[4][:2]), "slot_mapping must be"),
    ],
)
def test_reshape_and_cache_bad_metadata(device, mutate, match):
    args = cache_args(device)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.reshape_and_cache(*args)


def test_reshape_and_cache_slot_out_of_range():
    args = cache_args()
    args[4][2] = 24  # 3 blocks x 8 slots
    before = args[2].clone()
    with pytest.raises(ValueError, match=r"slot_mapping\[2\] = 24 is out of range"):
        ops.reshape_and_cache(*args)
    torch.testing.assert_close(args[2], before, rtol=0, atol=0)  # nothing written


def test_copy_blocks_bad_input():
    caches = [torch.zeros(4, 8, 2, 64) for _ in range(2)]
    with pytest.raises(ValueError, match=r"block_mapping\[1, 1\] = 4 is out of range"):
        ops.copy_blocks(caches[:1], caches[1:], torch.tensor([[0, 1], [2, 4]]))
    with pytest.raises(RuntimeError, match="block_mapping must be int64"):
        ops.copy_blocks(caches[:1], caches[1:], torch.tensor([[0, 1]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="block_mapping must be"):
        ops.copy_blocks(caches[:1], caches[1:], torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="key_caches has 2 layers but value_caches has 1"):
        ops.copy_blocks(caches, caches[:1], torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match=r"value_caches\[0\] shape"):
        ops.copy_blocks(caches[:1], [torch.zeros(5, 8, 2, 64)], torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match=r"key_caches\[1\] dtype"):
        ops.copy_blocks([caches[0], caches[1].half()], caches, torch.tensor([[0, 1]]))


def test_swap_blocks_bad_input():
    src, dst = torch.zeros(4, 8, 2, 64), torch.zeros(2, 8, 2, 64)
    with pytest.raises(ValueError, match=r"block_mapping\[0, 0\] = 4 is out of range for src"):
        ops.swap_blocks(src, dst, torch.tensor([[4, 0]]))
    with pytest.raises(ValueError, match=r"block_mapping\[0, 1\] = 2 is out of range for dst"):
        ops.swap_blocks(src, dst, torch.tensor([[0, 2]]))
    with pytest.raises(RuntimeError, match="dst dtype"):
        ops.swap_blocks(src, dst.half(), torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match="dst shape"):
        ops.swap_blocks(src, dst[:, :4], torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match="src must be contiguous"):
        ops.swap_blocks(src.transpose(1, 2), dst.transpose(1, 2), torch.tensor([[0, 1]]))
