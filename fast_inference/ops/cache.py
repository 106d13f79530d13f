"""Python wrappers for the KV-cache kernels: write new tokens, copy blocks, swap blocks between devices.

Validation lives in the C++ ops (csrc/checks/cache_checks.h): wrong shapes, dtypes or devices raise
RuntimeError naming the argument; out-of-range slot or block ids raise ValueError where the ids are on
the host (CPU caches, swap_blocks' mapping) and are skipped on the device otherwise. Caches are [num_blocks, block_size, num_kv_heads, head_size], contiguous, float32,
float16 or bfloat16; slot = block_id * block_size + offset.
"""

import torch


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # int64 [num_tokens]; negative = padding, skipped
) -> None:
    """Write each token's key/value into its cache slot (block_id * block_size + offset).

    key/value may be strided views (e.g. slices of a fused qkv projection) with unit stride along
    head_size; their dtype must equal the caches'. Negative slots are skipped (padding tokens).
    """
    torch.ops.fast_inference.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def copy_blocks(
    key_caches: list[torch.Tensor],  # per layer [num_blocks, block_size, num_kv_heads, head_size]
    value_caches: list[torch.Tensor],  # per layer, same shape and dtype
    block_mapping: torch.Tensor,  # int64 [n, 2] of (src, dst), on the caches' device
) -> None:
    """Copy whole blocks src -> dst in every layer's key and value cache (copy-on-write of shared blocks).

    The pairs should not chain (a dst that is also a later src): they may be applied in any order.
    """
    torch.ops.fast_inference.copy_blocks(key_caches, value_caches, block_mapping)


def swap_blocks(
    src: torch.Tensor,  # [num_src_blocks, ...]
    dst: torch.Tensor,  # [num_dst_blocks, ...], same per-block shape and dtype
    block_mapping: torch.Tensor,  # int64 [n, 2] of (src, dst), on the CPU
) -> None:
    """Copy blocks of one cache into another, possibly on another device (e.g. GPU <-> pinned CPU)."""
    torch.ops.fast_inference.swap_blocks(src, dst, block_mapping)
