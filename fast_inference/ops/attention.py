"""Python wrapper for the paged-attention kernel: output allocation, shapes, documentation.

Validation lives in the C++ op (csrc/checks/attention_checks.h), so direct torch.ops calls are
checked the same way: wrong shapes, dtypes or devices raise RuntimeError naming the argument on every
device. On CPU the values of block_tables, seq_lens and cu_query_lens are checked too (ValueError);
on CUDA reading them would cost a host synchronisation per layer, so the kernel instead writes NaN
rows for the query tokens whose sequence holds an out-of-range value.
"""

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
    """Varlen attention of new query tokens over a paged KV cache (decode, prefill, chunked prefill).

    Sequence s owns query rows ``cu_query_lens[s]:cu_query_lens[s+1]`` (q_len of them) and a context of
    ``seq_lens[s]`` cached tokens, the new ones included, stored in blocks ``block_tables[s, :]``
    (position p lives in block ``block_tables[s, p // block_size]`` at offset ``p % block_size``).
    Query token j sits at position ``seq_lens[s] - q_len + j``; with ``causal`` it attends to every
    cached position <= its own, without it to all ``seq_lens[s]`` positions. Query head h reads kv
    head ``h // (num_heads // num_kv_heads)`` (GQA/MQA).

    dtypes: query, caches and out share one dtype (float32, float16 or bfloat16); softmax and
    accumulation are float32. head_size: a multiple of 8 up to 256; block_size: a power of two up to
    256. query and out may be strided views with unit stride along head_size. Returns ``out``
    (allocated like ``query`` when None), written in place.
    """
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    torch.ops.fast_inference.paged_attention(
        query, key_cache, value_cache, block_tables, seq_lens, cu_query_lens, float(scale), bool(causal), out
    )
    return out
