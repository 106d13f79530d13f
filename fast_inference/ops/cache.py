"""Python wrappers for the KV-cache kernels: write new tokens, copy blocks, swap blocks between devices."""

import torch


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # int64 [num_tokens]; negative = padding, skipped
) -> None:
    """Write each token's key/value into its cache slot (block_id * block_size + offset)."""
    torch.ops.fast_inference.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def copy_blocks(
    key_caches: list[torch.Tensor],  # per layer [num_blocks, block_size, num_kv_heads, head_size]
    value_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,  # int64 [n, 2] of (src, dst)
) -> None:
    """Copy whole blocks src -> dst in every layer's key and value cache."""
    torch.ops.fast_inference.copy_blocks(key_caches, value_caches, block_mapping)


def swap_blocks(
    src: torch.Tensor,  # [num_src_blocks, ...]
    dst: torch.Tensor,  # [num_dst_blocks, ...]
    block_mapping: torch.Tensor,  # int64 [n, 2] of (src, dst)
) -> None:
    """Copy blocks from one cache to another, possibly on another device (e.g. GPU <-> pinned CPU)."""
    torch.ops.fast_inference.swap_blocks(src, dst, block_mapping)
