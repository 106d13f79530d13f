"""Python wrappers for the quantized-weight ops: ggml block formats (as GGUF files store them) used in place."""

import torch

# ggml type ids: the number a GGUF file stores for a tensor's format, and the `qtype` of every op here.
Q4_0 = 2
Q4_1 = 3
Q5_0 = 6
Q5_1 = 7
Q8_0 = 8
Q4_K = 12
Q5_K = 13
Q6_K = 14
QTYPE_NAMES = {
    Q4_0: "Q4_0",
    Q4_1: "Q4_1",
    Q5_0: "Q5_0",
    Q5_1: "Q5_1",
    Q8_0: "Q8_0",
    Q4_K: "Q4_K",
    Q5_K: "Q5_K",
    Q6_K: "Q6_K",
}
# (values per block, bytes per block)
BLOCK_LAYOUT = {
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q5_1: (32, 24),
    Q8_0: (32, 34),
    Q4_K: (256, 144),
    Q5_K: (256, 176),
    Q6_K: (256, 210),
}
# The formats `quantize` writes (the K-quants are read from files only).
WRITABLE_QTYPES = (Q4_0, Q4_1, Q8_0)
# Rows per tile of the interleaved layout (interleave_rows; every format has it).
TILE_ROWS = 16


def row_bytes(qtype: int, in_features: int) -> int:
    """Bytes of one quantized row of `in_features` values (padded with zeros to whole blocks)."""
    elems, nbytes = BLOCK_LAYOUT[qtype]
    return -(-in_features // elems) * nbytes


def quantize(
    weight: torch.Tensor, qtype: int
) -> torch.Tensor:  # weight: float [N, K] -> uint8 [N, row_bytes]
    """Quantize each row into `qtype` blocks with ggml's rounding (Q4_0, Q4_1, Q8_0); K is zero-padded."""
    return torch.ops.fast_inference.quantize(weight, qtype)


def interleave_rows(
    qweight: torch.Tensor,  # uint8 [N, row_bytes], N % 16 == 0
    qtype: int,
) -> torch.Tensor:  # uint8 [N / 16, blocks_per_row, 16 * block_bytes]
    """The same blocks regrouped into tiles of 16 rows x 1 block (a super-block for the K-quants): per tile the
    16 rows' fp16 scales side by side (Q4_1 / Q5_1: then their mins; Q4_K / Q5_K: then their dmins), then the
    block's other bytes, in order, as 4-byte words of all 16 rows. Every quantized op accepts this layout; on CPU
    the decode GEMV runs ~2x faster on it (one vector load covers 16 rows, so nothing is broadcast or summed
    across lanes)."""
    return torch.ops.fast_inference.interleave_rows(qweight, qtype)


def dequantize(
    qweight: torch.Tensor,  # uint8 [N, row_bytes(qtype, in_features)] or interleaved
    qtype: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [N, in_features]
    """The weight the blocks stand for, in `dtype` (any supported qtype)."""
    return torch.ops.fast_inference.dequantize(qweight, qtype, in_features, dtype)


def quant_linear(
    x: torch.Tensor,  # [M, K] float32 / bfloat16 / float16
    qweight: torch.Tensor,  # uint8 [N, row_bytes(qtype, K)] or interleaved (interleave_rows)
    qtype: int,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N] in x's dtype
    """x W^T + b with W in its block format. On CPU decode-sized x (M <= 8) streams W once (int8 dot products
    for every format, activations quantized to 32-value blocks as llama.cpp does); larger M dequantizes cache-
    sized slabs of W into a GEMM (bf16 for bf16 x from M = 32 on AVX-512 BF16 CPUs, else f32)."""
    return torch.ops.fast_inference.quant_linear(x, qweight, qtype, bias)
