"""Python wrapper for the paged-attention kernel: argument checks, output allocation, shapes."""

import torch


def paged_attention(
    query: torch.Tensor,  # [num_query_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # int32 [num_seqs], context length including the new tokens
    cu_query_lens: torch.Tensor,  # int32 [num_seqs + 1]
    scale: float,
    *,
    causal: bool = True,
    out: torch.Tensor | None = None,  # [num_query_tokens, num_heads, head_size]
) -> torch.Tensor:
    """Varlen attention of new query tokens over a paged KV cache (decode, prefill, chunked prefill)."""
    if out is None:
        out = torch.empty_like(query)
    torch.ops.fast_inference.paged_attention(
        query, key_cache, value_cache, block_tables, seq_lens, cu_query_lens, float(scale), bool(causal), out
    )
    return out
