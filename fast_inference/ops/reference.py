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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: float32 statistics, x * rstd rounded to x's dtype, times weight."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x in place, then rms_norm(residual)."""
    residual.add_(x)
    return rms_norm(residual, weight, eps)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x [T, H, D] = x * cos + roll(x, D/2) * sin in place; cos, sin [T, D] (full width, signed sin)."""
    x.copy_(x * cos[:, None] + torch.roll(x, x.shape[-1] // 2, -1) * sin[:, None])


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2 * I] = [gate | up] -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


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


# ---- sampling ----
# Pure-PyTorch references of the sampling ops (test oracles; slow, sort-based, float64 where it matters).
import math as _math  # noqa: E402  (the sampling section keeps its own imports)

import torch as _torch  # noqa: E402

_MASK32 = 0xFFFFFFFF
_MASS_SCALE = 2.0**40
_EXP_MIN_ARG = -86.0


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 on one 128-bit counter (Random123 parameters), in Python integers."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (
            ((p1 >> 32) ^ c1 ^ k0) & _MASK32,
            p1 & _MASK32,
            ((p0 >> 32) ^ c3 ^ k1) & _MASK32,
            p0 & _MASK32,
        )
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def philox_random64(seed: int, offset: int) -> int:
    """The 64 random bits a sampling row draws: key = seed, counter = (offset, 0, 0)."""
    s, o = seed & 0xFFFFFFFFFFFFFFFF, offset & 0xFFFFFFFFFFFFFFFF
    out = philox4x32_10((o & _MASK32, o >> 32, 0, 0), (s & _MASK32, s >> 32))
    return out[0] | (out[1] << 32)


def _fma32(a: _torch.Tensor, b, c) -> _torch.Tensor:
    # float32 fma emulated in float64: the product of two floats is exact in float64.
    return (
        a.double() * (b.double() if isinstance(b, _torch.Tensor) else b)
        + (c.double() if isinstance(c, _torch.Tensor) else c)
    ).float()


def _f32(v: float) -> float:
    return float(_torch.tensor(v, dtype=_torch.float32))


def fi_exp(z: _torch.Tensor) -> _torch.Tensor:
    """The kernels' float32 exp of z <= 0, operation for operation (0 below -86)."""
    z = z.float()
    t = _fma32(z, _f32(1.44269504088896341), 12582912.0)
    n = t - 12582912.0
    r = _fma32(-n, _f32(0.693145751953125), z)
    r = _fma32(-n, _f32(1.42860682030941723212e-6), r)
    p = _fma32(_torch.full_like(r, _f32(1 / 720)), r, _f32(1 / 120))
    for c in (_f32(1 / 24), _f32(1 / 6), 0.5, 1.0, 1.0):
        p = _fma32(p, r, c)
    scale = _torch.pow(2.0, n.double()).float()
    out = p * scale
    return _torch.where(z >= _EXP_MIN_ARG, out, _torch.zeros_like(out))


def _greedy(row: _torch.Tensor) -> int:
    return int((row == row.max()).nonzero()[0, 0])


def _check_row(row: _torch.Tensor, b: int) -> None:
    if _torch.isnan(row).any() or _torch.isposinf(row).any():
        raise ValueError(f"logits row {b} contains NaN or +inf")
    if _torch.isneginf(row).all():
        raise ValueError(f"logits row {b} has no finite value")


def sampling_probs(
    logits: _torch.Tensor,
    temperature: _torch.Tensor,
    top_k: _torch.Tensor,
    top_p: _torch.Tensor,
    min_p: _torch.Tensor,
) -> _torch.Tensor:
    """Exact float64 distribution [B, V] that ops.sample draws from.

    p = softmax(logits / T). Top-k keeps x >= the k-th largest logit (ties kept). Top-p keeps, within
    the top-k set, every token with p >= t where t is the largest value such that the top-k tokens with
    p >= t hold at least top_p of the top-k mass (ties kept). Min-p keeps p >= min_p * max(p). The kept
    probabilities are renormalized. Temperature 0: all mass on the first maximum.
    """
    x = logits.double()
    batch, vocab = x.shape
    out = _torch.zeros_like(x)
    for b in range(batch):
        row = x[b]
        _check_row(row, b)
        t = float(temperature[b])
        if t == 0.0:
            out[b, _greedy(row)] = 1.0
            continue
        p = _torch.softmax(row / t, dim=0)
        keep = p > 0
        k = int(top_k[b])
        if 0 < k < vocab:
            keep &= row >= _torch.topk(row, k).values[-1]
        tp = float(top_p[b])
        if tp < 1.0:
            pk = _torch.where(keep, p, _torch.zeros_like(p))
            values = _torch.sort(pk, descending=True).values
            cum = _torch.cumsum(values, 0)
            pos = int(_torch.searchsorted(cum, tp * float(cum[-1])).clamp(max=vocab - 1))
            keep &= p >= values[pos]
        keep &= p >= float(min_p[b]) * float(p.max())
        q = _torch.where(keep, p, _torch.zeros_like(p))
        out[b] = q / q.sum()
    return out


def sample(
    logits: _torch.Tensor,
    temperature: _torch.Tensor,
    top_k: _torch.Tensor,
    top_p: _torch.Tensor,
    min_p: _torch.Tensor,
    seeds: _torch.Tensor,
    offsets: _torch.Tensor,
) -> _torch.Tensor:
    """The draw of ops.sample, step by step with sorts: the same token as the kernels on the same inputs.

    e = fi_exp((x - max) / T) in float32, fixed-point mass q = trunc(e * 2^40); thresholds as in
    sampling_probs but on e and integer masses; the token is the first index (among survivors, in
    vocabulary order) whose running mass exceeds r = floor(random64 * total / 2^64), random64 from
    Philox keyed by (seed, offset).
    """
    x = logits.float().cpu()
    batch, vocab = x.shape
    tokens = _torch.empty(batch, dtype=_torch.int64)
    for b in range(batch):
        row = x[b]
        _check_row(row, b)
        t = float(temperature[b])
        m = float(row.max())
        # 1 / T in float32 arithmetic, as the kernels compute it
        inv_t = float(_torch.tensor(1.0) / temperature[b].float().cpu()) if t > 0 else 0.0
        if t == 0.0 or not _math.isfinite(inv_t):
            tokens[b] = _greedy(row)
            continue
        keep = _torch.ones(vocab, dtype=_torch.bool)
        k = int(top_k[b])
        if 0 < k < vocab:
            keep &= row >= _torch.topk(row, k).values[-1]
        e = fi_exp((row - m) * inv_t)
        e = _torch.where(keep, e, _torch.zeros_like(e))
        q = (e.double() * _MASS_SCALE).long()
        threshold = _f32(float(min_p[b])) if float(min_p[b]) > 0 else 1e-45  # 1e-45: the smallest e > 0
        tp = float(top_p[b])
        if tp < 1.0:
            total = int(q.sum())
            target = tp * float(total)
            target = 1 if not target >= 1.0 else (total if target >= total else int(target))
            order = _torch.argsort(e, descending=True, stable=True)
            cum = _torch.cumsum(q[order], 0)
            pos = int(_torch.searchsorted(cum, target))
            threshold = max(threshold, float(e[order[pos]]))
        threshold = min(threshold, 1.0)
        survivors = e >= threshold
        qs = _torch.where(survivors, q, _torch.zeros_like(q))
        total = int(qs.sum())
        r = (philox_random64(int(seeds[b]), int(offsets[b])) * total) >> 64
        tokens[b] = int(_torch.searchsorted(_torch.cumsum(qs, 0), r, right=True))
    return tokens.to(logits.device)


def _rows(ids: _torch.Tensor, cu_lens: _torch.Tensor, b: int) -> _torch.Tensor:
    return ids[int(cu_lens[b]) : int(cu_lens[b + 1])]


def apply_penalties(
    logits: _torch.Tensor,
    prompt_token_ids: _torch.Tensor,
    prompt_cu_lens: _torch.Tensor,
    output_token_ids: _torch.Tensor,
    output_cu_lens: _torch.Tensor,
    presence_penalty: _torch.Tensor,
    frequency_penalty: _torch.Tensor,
    repetition_penalty: _torch.Tensor,
) -> None:
    """In place: repetition penalty over distinct prompt + output tokens (Hugging Face: x > 0 ? x / r :
    x * r), then x -= presence * (count > 0) + frequency * count over output tokens (OpenAI)."""
    for b in range(logits.shape[0]):
        row = logits[b]
        prompt, output = (
            _rows(prompt_token_ids, prompt_cu_lens, b),
            _rows(output_token_ids, output_cu_lens, b),
        )
        rep = float(repetition_penalty[b])
        if rep != 1.0:
            ids = _torch.unique(_torch.cat([prompt, output]))
            v = row[ids].float()
            row[ids] = _torch.where(v > 0, v / rep, v * rep).to(row.dtype)
        pres, freq = presence_penalty[b].float(), frequency_penalty[b].float()
        if (pres != 0 or freq != 0) and output.numel() > 0:
            ids, counts = _torch.unique(output, return_counts=True)
            row[ids] = (row[ids].float() - (pres + freq * counts.float())).to(row.dtype)


def apply_logit_bias(
    logits: _torch.Tensor, token_ids: _torch.Tensor, biases: _torch.Tensor, cu_lens: _torch.Tensor
) -> None:
    """In place: logits[b, token_ids[i]] += biases[i] for row b's entries, in list order."""
    for b in range(logits.shape[0]):
        for i in range(int(cu_lens[b]), int(cu_lens[b + 1])):
            tok = int(token_ids[i])
            logits[b, tok] = (logits[b, tok].float() + biases[i].float()).to(logits.dtype)


def apply_token_bitmask(
    logits: _torch.Tensor, bitmask: _torch.Tensor, indices: _torch.Tensor | None = None
) -> None:
    """In place: logits[b, v] = -inf where bit v % 32 of bitmask[b, v // 32] is 0, for b in indices
    (all rows when None)."""
    vocab = logits.shape[1]
    shifts = _torch.arange(32, dtype=_torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]  # [B, V]
    rows = range(logits.shape[0]) if indices is None else [int(r) for r in indices]
    for b in rows:
        logits[b].masked_fill_(~allowed[b], float("-inf"))


def compute_logprobs(
    logits: _torch.Tensor, token_ids: _torch.Tensor, num_top: int
) -> tuple[_torch.Tensor, _torch.Tensor, _torch.Tensor]:
    """log_softmax of the raw logits: (chosen token's logprob [B], top ids [B, n], top logprobs [B, n])."""
    lp = _torch.log_softmax(logits.float(), dim=-1)
    top = _torch.topk(lp, num_top, dim=-1)
    return lp.gather(1, token_ids.view(-1, 1)).view(-1), top.indices, top.values


# ---- quantized weights (ggml block formats) ---------------------------------------------------------------


def _f16(blocks: _torch.Tensor, start: int) -> _torch.Tensor:  # [N, nb, bytes] -> f32 [N, nb, 1]
    return blocks[..., start : start + 2].contiguous().view(_torch.float16).float()


def _k_scales_mins(s: _torch.Tensor) -> tuple[_torch.Tensor, _torch.Tensor]:  # [N, nb, 12] -> 2 x [N, nb, 8]
    s = s.int()
    low_sc, low_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    high_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    high_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return _torch.cat([low_sc, high_sc], -1).float(), _torch.cat([low_m, high_m], -1).float()


def _tile_parts(qtype: int) -> tuple[int, int, int]:
    """(header bytes, where the header starts, where the words start) in one block: the fp16 header fields
    (d; Q4_1 / Q5_1: d, m; Q4_K / Q5_K: d, dmin) lead the block, except Q6_K's d, its last two bytes."""
    from .quant import Q4_1, Q4_K, Q5_1, Q5_K, Q6_K

    header = 4 if qtype in (Q4_1, Q5_1, Q4_K, Q5_K) else 2
    return (header, 208, 0) if qtype == Q6_K else (header, 0, header)


def interleave_rows(qweight: _torch.Tensor, qtype: int) -> _torch.Tensor:
    """Reference of ops.interleave_rows: [N, row_bytes] -> [N / 16, nb, 16 * block_bytes], built row by row."""
    from .quant import BLOCK_LAYOUT, TILE_ROWS

    if qtype not in BLOCK_LAYOUT:
        raise ValueError(f"qtype {qtype} is not a supported format")
    block_bytes = BLOCK_LAYOUT[qtype][1]
    header, header_at, words_at = _tile_parts(qtype)
    n, nb = qweight.shape[0], qweight.shape[1] // block_bytes
    out = _torch.empty(n // TILE_ROWS, nb, TILE_ROWS * block_bytes, dtype=_torch.uint8)
    for g in range(n // TILE_ROWS):
        for b in range(nb):
            tile = out[g, b]
            for r in range(TILE_ROWS):
                block = qweight[g * TILE_ROWS + r, b * block_bytes : (b + 1) * block_bytes]
                for f in range(header // 2):  # field f of row r: bytes [32 f + 2 r, +2)
                    src = header_at + 2 * f
                    tile[32 * f + 2 * r : 32 * f + 2 * r + 2] = block[src : src + 2]
                for j in range((block_bytes - header) // 4):  # word j of row r: [16 header + 64 j + 4 r, +4)
                    at, src = TILE_ROWS * header + 64 * j + 4 * r, words_at + 4 * j
                    tile[at : at + 4] = block[src : src + 4]
    return out


def _plain_rows(qweight: _torch.Tensor, qtype: int) -> _torch.Tensor:
    """An interleaved weight back to plain [N, row_bytes] (the inverse of interleave_rows); plain as is."""
    from .quant import BLOCK_LAYOUT, TILE_ROWS

    if qweight.dim() != 3:
        return qweight
    header, header_at, _ = _tile_parts(qtype)
    quants = BLOCK_LAYOUT[qtype][1] - header
    g, nb, _ = qweight.shape
    heads = (
        qweight[..., : TILE_ROWS * header].reshape(g, nb, header // 2, TILE_ROWS, 2).permute(0, 1, 3, 2, 4)
    )
    words = (
        qweight[..., TILE_ROWS * header :].reshape(g, nb, quants // 4, TILE_ROWS, 4).permute(0, 1, 3, 2, 4)
    )
    parts = [heads.reshape(g, nb, TILE_ROWS, header), words.reshape(g, nb, TILE_ROWS, quants)]
    blocks = _torch.cat(parts[::-1] if header_at else parts, -1)
    return blocks.permute(0, 2, 1, 3).reshape(g * TILE_ROWS, -1)


def dequantize(qweight: _torch.Tensor, qtype: int, in_features: int, dtype: _torch.dtype = _torch.float32):
    """Reference of ops.dequantize: ggml's block formats decoded with plain tensor ops (either layout)."""
    from .quant import BLOCK_LAYOUT, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q8_0

    qweight = _plain_rows(qweight, qtype)

    elems, nbytes = BLOCK_LAYOUT[qtype]
    n = qweight.shape[0]
    b = qweight.reshape(n, -1, nbytes)
    if qtype in (Q4_0, Q4_1):
        qs = b[..., 2:18] if qtype == Q4_0 else b[..., 4:20]
        q = _torch.cat([qs & 0xF, qs >> 4], -1).float()
        vals = (q - 8) * _f16(b, 0) if qtype == Q4_0 else q * _f16(b, 0) + _f16(b, 2)
    elif qtype in (Q5_0, Q5_1):
        start = 2 if qtype == Q5_0 else 4  # qh, then qs
        qs = b[..., start + 4 : start + 20]
        qh = b[..., start : start + 4].int()
        high = qh[..., 0] | qh[..., 1] << 8 | qh[..., 2] << 16 | qh[..., 3] << 24  # bit j: value j
        bits = _torch.stack([(high >> j) & 1 for j in range(32)], -1)
        q = (_torch.cat([qs & 0xF, qs >> 4], -1).int() | bits << 4).float()
        vals = (q - 16) * _f16(b, 0) if qtype == Q5_0 else q * _f16(b, 0) + _f16(b, 2)
    elif qtype == Q8_0:
        vals = b[..., 2:34].contiguous().view(_torch.int8).float() * _f16(b, 0)
    elif qtype in (Q4_K, Q5_K):
        sc, mn = _k_scales_mins(b[..., 4:16])
        qs = b[..., 16:144] if qtype == Q4_K else b[..., 48:176]
        chunks = qs.reshape(n, -1, 4, 32).int()
        q = _torch.stack([chunks & 0xF, chunks >> 4], 3).reshape(
            n, -1, 8, 32
        )  # sub-block s = 2 * chunk + nibble
        if qtype == Q5_K:
            qh = b[..., 16:48].int()
            bits = _torch.stack([(qh >> s) & 1 for s in range(8)], 2)  # [N, nb, 8, 32]
            q = q + 16 * bits
        vals = (_f16(b, 0)[..., None] * sc[..., None] * q - _f16(b, 2)[..., None] * mn[..., None]).reshape(
            n, -1, 256
        )
    else:  # Q6_K
        ql = b[..., 0:128].int().reshape(n, -1, 2, 64)
        qh = b[..., 128:192].int().reshape(n, -1, 2, 32)
        sc = b[..., 192:208].contiguous().view(_torch.int8).float().reshape(n, -1, 2, 8)
        q = (
            _torch.cat(
                [
                    (ql[..., :32] & 0xF) | ((qh & 3) << 4),
                    (ql[..., 32:] & 0xF) | (((qh >> 2) & 3) << 4),
                    (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4),
                    (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4),
                ],
                -1,
            ).float()
            - 32
        )  # [N, nb, 2, 128]
        scale = sc.repeat_interleave(16, -1)  # each int8 scale covers 16 values
        vals = (_f16(b, 208)[..., None] * scale * q).reshape(n, -1, 256)
    return vals.reshape(n, -1)[:, :in_features].to(dtype)


def quantize(weight: _torch.Tensor, qtype: int) -> _torch.Tensor:
    """Reference of ops.quantize (Q4_0, Q4_1, Q8_0 with ggml's rounding); K is zero-padded to whole blocks."""
    from .quant import Q4_0, Q8_0, WRITABLE_QTYPES

    if qtype not in WRITABLE_QTYPES:
        raise ValueError(f"quantize writes Q4_0, Q4_1, Q8_0; got qtype {qtype}")
    n, k = weight.shape
    x = _torch.nn.functional.pad(weight.float(), (0, -k % 32)).reshape(n, -1, 32)

    def half_bytes(v: _torch.Tensor) -> _torch.Tensor:  # f32 [N, nb] -> uint8 [N, nb, 2]
        return v.half().unsqueeze(-1).view(_torch.uint8)

    def nibbles(q: _torch.Tensor) -> _torch.Tensor:  # int [N, nb, 32] -> uint8 [N, nb, 16]
        return (q[..., :16] | (q[..., 16:] << 4)).to(_torch.uint8)

    if qtype == Q8_0:
        d = x.abs().amax(-1) / 127
        idv = _torch.where(d != 0, 1.0 / d, _torch.zeros_like(d))
        v = x * idv[..., None]
        q = (
            (v.sign() * (v.abs() + 0.5).floor()).to(_torch.int8).view(_torch.uint8)
        )  # round half away from zero
        out = _torch.cat([half_bytes(d), q], -1)
    elif qtype == Q4_0:
        mx = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
        d = mx / -8
        idv = _torch.where(d != 0, 1.0 / d, _torch.zeros_like(d))
        q = (x * idv[..., None] + 8.5).clamp_max(15).trunc().int()
        out = _torch.cat([half_bytes(d), nibbles(q)], -1)
    else:  # Q4_1
        lo, hi = x.amin(-1), x.amax(-1)
        d = (hi - lo) / 15
        idv = _torch.where(d != 0, 1.0 / d, _torch.zeros_like(d))
        q = ((x - lo[..., None]) * idv[..., None] + 0.5).clamp_max(15).trunc().int()
        out = _torch.cat([half_bytes(d), half_bytes(lo), nibbles(q)], -1)
    return out.reshape(n, -1)


def int8_activation_blocks(x: _torch.Tensor) -> _torch.Tensor:  # [M, K] -> [M, K] f32
    """x as the CPU decode GEMVs of ops.quant_linear see it (M <= 8, AVX2 / AVX-512): each 32-value block
    (from k = 0, zero past K) rounded half to even to an int8 multiple of d = amax / 127, in the kernels' f32
    arithmetic (x * (1 / d)). quant_linear of this, exact, is what those kernels compute up to f32 rounding."""
    m, k = x.shape
    blocks = _torch.nn.functional.pad(x.float(), (0, -k % 32)).view(m, -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = _torch.where(d > 0, 1 / d, _torch.zeros_like(d))
    return (_torch.round(blocks * inv) * d).view(m, -1)[:, :k]


def quant_linear(x: _torch.Tensor, qweight: _torch.Tensor, qtype: int, bias: _torch.Tensor | None = None):
    """Reference of ops.quant_linear: dequantize, then an f32 matmul."""
    y = x.float() @ dequantize(qweight, qtype, x.shape[1]).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
