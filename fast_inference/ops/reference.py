"""Pure-PyTorch references of the fast_inference ops: the test oracles, same signatures as the kernels."""

import torch

# ---- attention and KV cache ----


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # int64 [num_tokens]; negative = padding, skipped
) -> None:
    """Write each token's key/value into slot block_id * block_size + offset, skipping negative slots."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[keep]
    value_cache[blocks, offsets] = value[keep]


def copy_blocks(
    key_caches: list[torch.Tensor],  # per layer [num_blocks, block_size, num_kv_heads, head_size]
    value_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,  # int64 [n, 2] of (src, dst)
) -> None:
    """Copy block src -> dst in every layer's key and value cache, pairs applied in order."""
    for src, dst in block_mapping.tolist():
        for cache in (*key_caches, *value_caches):
            cache[dst] = cache[src]


def swap_blocks(
    src: torch.Tensor,  # [num_src_blocks, ...]
    dst: torch.Tensor,  # [num_dst_blocks, ...]
    block_mapping: torch.Tensor,  # int64 [n, 2] of (src, dst)
) -> None:
    """Copy blocks of src into blocks of dst (the tensors may live on different devices)."""
    for s, d in block_mapping.tolist():
        dst[d] = src[s].to(dst.device)


def paged_attention(
    query: torch.Tensor,  # [num_query_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    cu_query_lens: torch.Tensor,  # int32 [num_seqs + 1]
    scale: float,
    *,
    causal: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen attention over a paged cache, computed per sequence in float32 with an explicit mask.

    Query token j of sequence s sits at position seq_lens[s] - q_len + j; causal attention sees the
    cached positions <= its own, non-causal sees all seq_lens[s] positions.
    """
    num_heads = query.shape[1]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    result = torch.empty_like(query) if out is None else out
    cu = cu_query_lens.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = cu[s], cu[s + 1]
        if q1 == q0:
            continue
        positions = torch.arange(seq_len, device=query.device)
        slots = block_tables[s].long()[positions // block_size]
        offsets = positions % block_size
        k = key_cache[slots, offsets].float().repeat_interleave(group, dim=1)  # [seq_len, num_heads, D]
        v = value_cache[slots, offsets].float().repeat_interleave(group, dim=1)
        q = query[q0:q1].float()  # [q_len, num_heads, D]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if causal:
            q_pos = seq_len - (q1 - q0) + torch.arange(q1 - q0, device=query.device)
            scores = scores.masked_fill(positions[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        result[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return result
