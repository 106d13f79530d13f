"""Tensor parallelism of the Llama-family decoder: which sizes a TP degree allows, each rank's slice of every
checkpoint tensor, and the layers that join the slices (column/row-parallel linears, vocab-parallel table)."""

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fast_inference.ops import quant

from .config import ModelConfig
from .llama import _DirectCall
from .quantized import StoredWeight


@dataclass(slots=True)
class TensorParallel:
    """This process's place in the tensor-parallel group. The group is the whole world (rank 0 = the
    engine), so group None, the default process group, is the usual value."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None


def check_tensor_parallel(cfg: ModelConfig, size: int) -> None:
    """ValueError when the model's shapes cannot be split `size` ways (called before any worker starts)."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {size}")
    if size == 1:
        return
    name = f"tensor_parallel_size={size}"
    if cfg.num_heads % size:
        raise ValueError(f"{name} does not divide the model's {cfg.num_heads} attention heads")
    kv = cfg.num_kv_heads
    if kv % size and size % kv:
        raise ValueError(
            f"{name} must divide the model's {kv} KV heads or be a multiple of it (KV heads replicated)"
        )
    if cfg.intermediate_size % size:
        raise ValueError(f"{name} does not divide the model's intermediate_size {cfg.intermediate_size}")
    if cfg.quantization is not None:
        block = quant.BLOCK_LAYOUT[_load_time_qtype(cfg.quantization)][0]
        for what, k in (
            ("attention width", cfg.num_heads * cfg.head_dim),
            ("intermediate_size", cfg.intermediate_size),
        ):
            if (k // size) % block:
                raise ValueError(
                    f"{name} with quantization={cfg.quantization!r}: the row-parallel slice of the {what} "
                    f"({k} / {size}) is not a whole number of {block}-value blocks"
                )


def _load_time_qtype(name: str) -> int:
    from .quantized import LOAD_TIME_QUANTIZATIONS

    return LOAD_TIME_QUANTIZATIONS[name]


def kv_heads_of_rank(cfg: ModelConfig, tp: TensorParallel) -> tuple[int, int]:
    """(first KV head, count) this rank keeps: a 1/size share, or one replicated head when size > KV heads
    (rank r's query heads then all belong to KV head r // (size / num_kv_heads))."""
    kv = cfg.num_kv_heads
    if kv >= tp.size:
        per_rank = kv // tp.size
        return tp.rank * per_rank, per_rank
    return tp.rank // (tp.size // kv), 1


def vocab_shard(vocab_size: int, tp: TensorParallel) -> tuple[int, int, int]:
    """(first token id, real rows, padded rows) of this rank's vocabulary slice: ceil(V / size) rows each,
    the last one padded with zero rows (their logits are cut off after the gather)."""
    padded = -(-vocab_size // tp.size)
    start = min(tp.rank * padded, vocab_size)
    return start, min(padded, vocab_size - start), padded


def shard_config(cfg: ModelConfig, tp: TensorParallel) -> ModelConfig:
    """The per-rank model shape: the layers are built from it as if it were a (narrower) model of its own."""
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // tp.size,
        num_kv_heads=kv_heads_of_rank(cfg, tp)[1],
        intermediate_size=cfg.intermediate_size // tp.size,
        vocab_size=vocab_shard(cfg.vocab_size, tp)[2],
    )


# How a checkpoint tensor (Hugging Face name, minus "model.layers.N.") is split: "rows" = output features
# (column-parallel), "cols" = input features (row-parallel), "vocab" = table rows; anything else is whole.
_ROW_SPLIT = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}
_COL_SPLIT = {"self_attn.o_proj", "mlp.down_proj"}


def shard_of(name: str, cfg: ModelConfig, tp: TensorParallel) -> tuple[str, int, int] | None:
    """(axis, start, stop) of this rank's slice of checkpoint tensor `name`; None: every rank keeps it whole."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        start, rows, _ = vocab_shard(cfg.vocab_size, tp)
        return "vocab", start, start + rows
    parts = name.split(".")
    if len(parts) < 6 or parts[1] != "layers":
        return None
    proj = ".".join(parts[3:5])
    d = cfg.head_dim
    if proj == "self_attn.q_proj":
        heads = cfg.num_heads // tp.size
        return "rows", tp.rank * heads * d, (tp.rank + 1) * heads * d
    if proj in ("self_attn.k_proj", "self_attn.v_proj"):
        first, count = kv_heads_of_rank(cfg, tp)
        return "rows", first * d, (first + count) * d
    if proj in ("mlp.gate_proj", "mlp.up_proj"):
        inter = cfg.intermediate_size // tp.size
        return "rows", tp.rank * inter, (tp.rank + 1) * inter
    if proj == "self_attn.o_proj":
        width = cfg.num_heads // tp.size * d
        return "cols", tp.rank * width, (tp.rank + 1) * width
    if proj == "mlp.down_proj":
        inter = cfg.intermediate_size // tp.size
        return "cols", tp.rank * inter, (tp.rank + 1) * inter
    return None


def check_whole_blocks(name: str, qtype: int, start: int, stop: int, size: int) -> None:
    """ValueError when the row-parallel slice [start:stop] of a tensor in `qtype` blocks would split a block."""
    block = quant.BLOCK_LAYOUT[qtype][0]
    if start % block or stop % block:
        raise ValueError(
            f"tensor_parallel_size={size}: {name!r} is stored in {quant.QTYPE_NAMES[qtype]} "
            f"({block}-value blocks) and its row-parallel slice [{start}:{stop}] splits a block; "
            "use a smaller tensor_parallel_size or a checkpoint in a 32-value format (Q8_0, Q4_0, Q4_1)"
        )


def slice_stored(name: str, stored: StoredWeight, cfg: ModelConfig, tp: TensorParallel) -> StoredWeight:
    """This rank's part of one checkpoint tensor, in its stored format (quantized rows stay whole blocks)."""
    shard = shard_of(name, cfg, tp)
    if shard is None:
        return stored
    axis, start, stop = shard
    data = stored.data
    if axis == "cols":
        if stored.qtype is None:
            return StoredWeight(None, data[:, start:stop].contiguous(), stop - start)
        check_whole_blocks(name, stored.qtype, start, stop, tp.size)
        first, nbytes = quant.row_bytes(stored.qtype, start), quant.row_bytes(stored.qtype, stop - start)
        return StoredWeight(stored.qtype, data[:, first : first + nbytes].contiguous(), stop - start)
    rows = data[start:stop] if data.dim() > 1 else data[start:stop]
    if axis == "vocab":
        padded = vocab_shard(cfg.vocab_size, tp)[2]
        if rows.shape[0] < padded:  # zero bytes decode to zero in every ggml format too
            rows = torch.cat((rows, rows.new_zeros(padded - rows.shape[0], *rows.shape[1:])))
    return StoredWeight(stored.qtype, rows.contiguous(), stored.cols)


def read_slice(name: str, tensor_slice, cfg: ModelConfig, tp: TensorParallel) -> torch.Tensor:
    """Read only this rank's part of a safetensors tensor (safe_open(...).get_slice(name))."""
    shard = shard_of(name, cfg, tp)
    if shard is None:
        return tensor_slice[:]
    axis, start, stop = shard
    if axis == "cols":
        return tensor_slice[:, start:stop]
    rows = tensor_slice[start:stop]
    if axis == "vocab":
        padded = vocab_shard(cfg.vocab_size, tp)[2]
        if rows.shape[0] < padded:
            rows = torch.cat((rows, rows.new_zeros(padded - rows.shape[0], *rows.shape[1:])))
    return rows


class ColumnParallelLinear(_DirectCall):
    """Output features split over the ranks (fused QKV by heads, gate/up by intermediate rows): each rank
    computes its slice, which the rank-local attention / activation consume with no communication."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class RowParallelLinear(_DirectCall):
    """Input features split over the ranks (o_proj by heads, down_proj by intermediate): each rank's partial
    product is summed by one all-reduce, the layer's only communication (two per decoder layer)."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup | None):
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        dist.all_reduce(y, group=self.group)
        return y


class VocabParallelEmbedding(_DirectCall):
    """The token table (and, tied or not, the head) split by vocabulary rows.

    embed: each rank looks up the ids in its range, zeros the rest, and one all-reduce sums the rows (exact:
    every row has one non-zero contributor). forward (the head): each rank's logits slice, gathered to rank 0
    (CPU) or to every rank (CUDA: one all-gather, which a CUDA graph can capture); ranks without the full
    logits get an empty [B, 0] tensor."""

    def __init__(self, inner: nn.Module, vocab_size: int, tp: TensorParallel, gather_to_all: bool):
        super().__init__()
        self.inner = inner
        self.vocab_size = vocab_size
        self.start, self.rows, self.padded = vocab_shard(vocab_size, tp)
        self.tp = tp
        self.gather_to_all = gather_to_all

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        h = self.inner.embed(local.masked_fill(outside, 0))
        h.masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(h, group=self.tp.group)
        return h

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> logits [B, vocab] on rank 0 (and every rank when gather_to_all)."""
        local = self.inner(hidden).contiguous()  # [B, padded]
        size, batch = self.tp.size, local.shape[0]
        if self.gather_to_all:
            full = local.new_empty(size * batch, self.padded)
            dist.all_gather_into_tensor(full, local, group=self.tp.group)
        elif self.tp.rank == 0:
            parts = [torch.empty_like(local) for _ in range(size)]
            dist.gather(local, parts, dst=0, group=self.tp.group)  # the TP group is the whole world
            full = torch.cat(parts)
        else:
            dist.gather(local, None, dst=0, group=self.tp.group)
            return local.new_empty(batch, 0)
        # [size * B, padded] -> [B, size * padded], then the padding rows' logits cut off
        return full.view(size, batch, self.padded).transpose(0, 1).reshape(batch, -1)[:, : self.vocab_size]


def parallelize(model: nn.Module, cfg: ModelConfig, tp: TensorParallel) -> None:
    """Wrap a model built from shard_config(cfg, tp) and this rank's weights: the projections that need a
    collective get it, the table and head become vocab-parallel (tied: one module serves both)."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = ColumnParallelLinear(attn.qkv_proj)
        attn.o_proj = RowParallelLinear(attn.o_proj, tp.group)
        mlp.gate_up_proj = ColumnParallelLinear(mlp.gate_up_proj)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, tp.group)
    gather_to_all = cfg.device.type == "cuda"
    tied = model.head is model.embedding
    model.embedding = VocabParallelEmbedding(model.embedding, cfg.vocab_size, tp, gather_to_all)
    model.head = (
        model.embedding if tied else VocabParallelEmbedding(model.head, cfg.vocab_size, tp, gather_to_all)
    )
