"""Weights kept in ggml block formats (from a GGUF file or quantized at load): the stored-weight record and the
linear / embedding module that runs them through ops.quant_linear and ops.dequantize."""

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fast_inference import ops
from fast_inference.ops import quant

from .llama import _DirectCall, _rows_of_tiles, _tiles_fit

# ggml type id -> name, for the block formats the quantized ops implement.
QUANTIZED_TYPES = quant.QTYPE_NAMES

# --quantization names -> ggml type id (formats this engine can quantize an HF checkpoint into at load).
LOAD_TIME_QUANTIZATIONS = {"q8_0": 8, "q4_0": 2}


row_bytes = quant.row_bytes


@dataclass(slots=True)
class StoredWeight:
    """One checkpoint tensor as it is kept in memory."""

    qtype: int | None  # ggml type id of the blocks; None: a dense float tensor
    # dense: [rows, cols] (or [cols] for vectors); quantized: uint8 [rows, row_bytes], or interleaved
    # [rows / 16, blocks, 16 * block_bytes] (ops.interleave_rows)
    data: torch.Tensor
    cols: int  # weights per row (K)

    @property
    def rows(self) -> int:
        if self.data.dim() == 3:
            return self.data.shape[0] * quant.TILE_ROWS
        return self.data.shape[0] if self.data.dim() > 1 else 1


def _concat_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a; b] along rows: a view when b's bytes directly follow a's in one storage (the GGUF loader lays fused
    parts out that way), else a copy."""
    adjacent = (
        a.is_contiguous()
        and b.is_contiguous()
        and a.dtype == b.dtype
        and a.shape[1:] == b.shape[1:]
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.data_ptr() + a.numel() * a.element_size() == b.data_ptr()
    )
    if not adjacent:
        return torch.cat((a, b))
    return a.new_empty(0).set_(
        a.untyped_storage(), a.storage_offset(), (a.shape[0] + b.shape[0], *a.shape[1:])
    )


def _cpu_layout(part: StoredWeight) -> StoredWeight:
    """A quantized part in the layout its device's kernels read fastest. On CPU, weights with whole tiles of rows
    are interleaved (ops.interleave_rows: the decode GEMV runs ~2x faster) in place, over the
    same memory (the GGUF arena's huge pages), so no second copy is ever resident; each part reaches here once
    (the loader hands every checkpoint tensor to one module). Elsewhere plain rows."""
    data = part.data.contiguous()
    if data.device.type != "cpu" or data.shape[0] % quant.TILE_ROWS:
        return StoredWeight(part.qtype, data, part.cols)
    tiles = ops.interleave_rows(data, part.qtype)
    data.view(-1).copy_(tiles.view(-1))
    return StoredWeight(part.qtype, data.view(tiles.shape), part.cols)


def _dense_layout(part: StoredWeight, dtype: torch.dtype) -> StoredWeight:
    """A dense part (F32/F16/BF16 in the file) in the activation dtype; on CPU a bf16 part whose shape tiles
    becomes VNNI tiles (ops.vnni_tiles, what ops.linear runs fastest for every M) over the same memory, as
    _cpu_layout does for the block formats."""
    data = part.data.to(dtype).contiguous()
    if data.dim() != 2 or not _tiles_fit(data):
        return StoredWeight(None, data, part.cols)
    tiles = ops.vnni_tiles(data)
    data.view(-1).copy_(tiles.view(-1))
    return StoredWeight(None, data.view(tiles.shape), part.cols)


class QuantizedLinear(_DirectCall):
    """y = x W^T (+ b) with W's row groups (fused q/k/v, gate/up) each in its own format.

    A Q4_K_M file stores attn_v in Q6_K next to Q4_K q/k: parts in different formats stay separate ops whose
    outputs are concatenated; parts in the same format are concatenated once at load into one op. Dense parts
    (F32/F16/BF16 in the file) are kept in the activation dtype and run through ops.linear (bf16 on CPU as
    VNNI tiles). The rows double as an embedding table
    (embed), so a tied head and the token lookup share one quantized copy."""

    def __init__(self, parts: list[StoredWeight], bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        merged: list[StoredWeight] = []
        for part in parts:
            if merged and merged[-1].qtype == part.qtype:
                last = merged[-1]
                merged[-1] = StoredWeight(last.qtype, _concat_rows(last.data, part.data), last.cols)
            else:
                merged.append(part)
        self.parts = [_dense_layout(p, dtype) if p.qtype is None else _cpu_layout(p) for p in merged]
        self.in_features = parts[0].cols
        self.out_features = sum(p.rows for p in parts)
        self.bias = bias
        self.dtype = dtype

    @property
    def weight_bytes(self) -> int:
        return sum(p.data.numel() * p.data.element_size() for p in self.parts)

    def projection(self) -> torch.ScriptObject:
        """This module's forward as a C++ fast_inference.Projection (for DecoderStack), over the same tensors."""
        qtypes = [-1 if p.qtype is None else p.qtype for p in self.parts]
        return torch.classes.fast_inference.Projection(
            [p.data for p in self.parts], qtypes, self.bias, sys.maxsize
        )

    def _one(self, x: torch.Tensor, part: StoredWeight, bias: torch.Tensor | None) -> torch.Tensor:
        if part.qtype is None:
            return ops.linear(x, part.data, bias)
        return ops.quant_linear(x, part.data, part.qtype, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype."""
        if len(self.parts) == 1:
            return self._one(x, self.parts[0], self.bias)
        y = torch.cat([self._one(x, p, None) for p in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (int64 [T]) as [T, K] in the activation dtype: only those rows are dequantized."""
        (part,) = self.parts  # an embedding table is one tensor
        if part.qtype is None:
            return _rows_of_tiles(part.data, ids) if part.data.dim() == 3 else F.embedding(ids, part.data)
        if part.data.dim() == 2:
            return ops.dequantize(part.data.index_select(0, ids), part.qtype, part.cols, self.dtype)
        # Interleaved: the tiles holding the rows, dequantized (16 rows each), then the rows themselves.
        if ids.shape[0] == 1:  # a batch-1 decode step: slices instead of index arithmetic (3 ops, not 8)
            tile, row = divmod(int(ids[0]), quant.TILE_ROWS)
            values = ops.dequantize(part.data[tile : tile + 1], part.qtype, part.cols, self.dtype)
            return values[row : row + 1]
        tiles = ops.dequantize(
            part.data.index_select(0, ids // quant.TILE_ROWS), part.qtype, part.cols, self.dtype
        )
        picked = torch.arange(ids.shape[0], device=ids.device) * quant.TILE_ROWS + ids % quant.TILE_ROWS
        return tiles.index_select(0, picked)
