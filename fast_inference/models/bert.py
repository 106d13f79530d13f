"""BERT-family encoder (BertModel / BertForMaskedLM checkpoints): config, weight loading, varlen forward.

The forward pass runs on a flat batch of many sequences with no padding: token t of sequence s sits at
row cu_query_lens[s] + t of the batch's AttentionMetadata (the decoders' one, built by build_metadata).
Bidirectional attention goes through the project's kernels: each layer writes its keys and values into a
scratch paged cache with ops.reshape_and_cache and attends with ops.paged_attention(causal=False). The
cache is scratch space reused by every layer, because an encoder layer needs only its own keys and
values and they are dead once the layer is done.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fast_inference import ops
from fast_inference.ops.attention_metadata import AttentionMetadata


def onednn_available() -> bool:
    """oneDNN's prepacked linear with fused epilogues (what torch.compile's CPU freezing uses) is present."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# config.json hidden_act -> function; "gelu" in BERT configs is the exact erf form.
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(slots=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    architecture: str

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict) -> "BertConfig":
        if config.get("model_type") != "bert":
            raise ValueError(f"config.json: model_type {config.get('model_type')!r} is not 'bert'")
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"config.json: position_embedding_type {position_type!r} is not supported (only 'absolute')"
            )
        act = config.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act {act!r} is not supported ({sorted(_ACTIVATIONS)})")
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        if hidden % heads:
            raise ValueError(
                f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
            )
        archs = config.get("architectures") or ["BertModel"]
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            intermediate_size=int(config["intermediate_size"]),
            max_position_embeddings=int(config.get("max_position_embeddings", 512)),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            hidden_act=act,
            architecture=archs[0],
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> "BertConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"model: {model_dir} has no config.json")
        return cls.from_dict(json.loads(path.read_text()))


class _Linear:
    """y = x @ W^T + b, optionally with GELU or a residual add fused into the GEMM's epilogue.

    On CPU the weight is reordered once into oneDNN's blocked layout (no per-call packing of W) and
    the element-wise tail runs inside the GEMM while the tile is still in cache, instead of another
    pass over a [num_tokens, 4 * hidden] tensor: float32 always, bfloat16 only where the CPU computes
    bf16 natively (ops.cpu_bf16_native(); oneDNN's bf16 reorder raises on AVX2-only CPUs). CPU bf16
    elsewhere runs ops.linear's own kernels; other devices plain F.linear + torch ops.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, prepack: bool) -> None:
        self.weight = weight  # [out_features, in_features]
        self.bias = bias  # [out_features]
        self.packed = None
        on_cpu = weight.device.type == "cpu"
        self.use_op = on_cpu and weight.dtype == torch.bfloat16 and not ops.cpu_bf16_native()
        if (
            prepack
            and on_cpu
            and (weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and not self.use_op))
        ):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_op:
            return ops.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.packed, self.bias, "gelu" if gelu else "none", [], "none" if gelu else ""
            )
        y = self._plain(x)
        return F.gelu(y) if gelu else y

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x @ W^T + b + residual."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        y = self._plain(x)
        y += residual
        return y


def _read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: (sharded) safetensors first, then (sharded) pytorch_model.bin."""
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f), device="cpu"))
        return state
    files = sorted(model_dir.glob("pytorch_model*.bin"))
    if files:
        state = {}
        for f in files:
            state.update(torch.load(str(f), map_location="cpu", weights_only=True))
        return state
    raise ValueError(f"model: {model_dir} has no *.safetensors or pytorch_model*.bin weights")


def _normalize_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BertModel names: drop the "bert." prefix of task heads, map old LayerNorm gamma/beta names."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("bert."):
            name = name[len("bert.") :]
        elif name.startswith(("cls.", "pooler.")) or "." not in name:
            continue  # the MLM / NSP heads and the pooler are not part of the token embeddings
        if name.endswith(".gamma"):
            name = name[: -len(".gamma")] + ".weight"
        elif name.endswith(".beta"):
            name = name[: -len(".beta")] + ".bias"
        out[name] = tensor
    return out


class BertEncoder:
    """Weights and forward of a BertModel: embeddings + LayerNorm, then post-LN encoder layers."""

    def __init__(
        self,
        config: BertConfig,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        prepack: bool | None = None,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.scale = 1.0 / math.sqrt(config.head_size)
        self.activation = _ACTIVATIONS[config.hidden_act]
        # oneDNN fuses only the exact-erf GELU the same way as F.gelu; other activations run unfused.
        self.prepack = onednn_available() if prepack is None else (prepack and onednn_available())
        self.fuse_gelu = config.hidden_act == "gelu"
        state = _normalize_names(state)

        def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            if name not in state:
                raise ValueError(f"checkpoint: missing weight {name!r}")
            tensor = state[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"checkpoint: weight {name!r} has shape {tuple(tensor.shape)}, config.json says {shape}"
                )
            return tensor.to(device=device, dtype=dtype).contiguous()

        c = config
        h, inter = c.hidden_size, c.intermediate_size
        self.word_embeddings = take("embeddings.word_embeddings.weight", (c.vocab_size, h))
        position = take("embeddings.position_embeddings.weight", (c.max_position_embeddings, h))
        token_type = take("embeddings.token_type_embeddings.weight", (c.type_vocab_size, h))
        # Every input is a single segment (token type 0), so fold that row into the position table:
        # one gather-add per token instead of two.
        self.position_embeddings = (position.float() + token_type[0].float()).to(dtype).contiguous()
        self.embed_ln = (take("embeddings.LayerNorm.weight", (h,)), take("embeddings.LayerNorm.bias", (h,)))

        self.layers = []
        for i in range(c.num_hidden_layers):
            p = f"encoder.layer.{i}."
            # Fused QKV: one GEMM of width 3h instead of three of width h.
            qkv_w = torch.cat(
                [take(p + f"attention.self.{n}.weight", (h, h)) for n in ("query", "key", "value")]
            )
            qkv_b = torch.cat([take(p + f"attention.self.{n}.bias", (h,)) for n in ("query", "key", "value")])
            self.layers.append(
                _BertLayer(
                    qkv=_Linear(qkv_w, qkv_b, self.prepack),
                    out=_Linear(
                        take(p + "attention.output.dense.weight", (h, h)),
                        take(p + "attention.output.dense.bias", (h,)),
                        self.prepack,
                    ),
                    ln1_w=take(p + "attention.output.LayerNorm.weight", (h,)),
                    ln1_b=take(p + "attention.output.LayerNorm.bias", (h,)),
                    up=_Linear(
                        take(p + "intermediate.dense.weight", (inter, h)),
                        take(p + "intermediate.dense.bias", (inter,)),
                        self.prepack,
                    ),
                    down=_Linear(
                        take(p + "output.dense.weight", (h, inter)),
                        take(p + "output.dense.bias", (h,)),
                        self.prepack,
                    ),
                    ln2_w=take(p + "output.LayerNorm.weight", (h,)),
                    ln2_b=take(p + "output.LayerNorm.bias", (h,)),
                )
            )

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        prepack: bool | None = None,
    ) -> "BertEncoder":
        model_dir = Path(model_dir)
        config = BertConfig.from_model_dir(model_dir)
        return cls(config, _read_checkpoint(model_dir), dtype, torch.device(device), prepack)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [num_tokens], all sequences back to back
        positions: torch.Tensor,  # int64 [num_tokens], 0-based position inside its own sequence
        meta: AttentionMetadata,  # built by build_metadata with causal=False
        key_cache: torch.Tensor,  # [num_blocks, block_size, num_heads, head_size], scratch shared by layers
        value_cache: torch.Tensor,  # same shape
    ) -> torch.Tensor:  # [num_tokens, hidden_size], the last hidden state of every token
        c = self.config
        eps = c.layer_norm_eps
        x = F.embedding(input_ids, self.word_embeddings)
        x += F.embedding(positions, self.position_embeddings)
        x = F.layer_norm(x, (c.hidden_size,), *self.embed_ln, eps)
        num_tokens = x.shape[0]
        heads, head_size = c.num_attention_heads, c.head_size
        for layer in self.layers:
            qkv = layer.qkv(x).view(num_tokens, 3, heads, head_size)
            q, k, v = qkv.unbind(1)
            ops.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping)
            # q stays a strided view into qkv: the kernel takes token and head strides, so no copy.
            attn = ops.paged_attention(
                q,
                key_cache,
                value_cache,
                meta.block_tables,
                meta.seq_lens,
                meta.cu_query_lens,
                self.scale,
                causal=meta.causal,
            )
            h = layer.out.add(attn.view(num_tokens, c.hidden_size), x)
            x = F.layer_norm(h, (c.hidden_size,), layer.ln1_w, layer.ln1_b, eps)
            h = layer.up(x, gelu=True) if self.fuse_gelu else self.activation(layer.up(x))
            h = layer.down.add(h, x)
            x = F.layer_norm(h, (c.hidden_size,), layer.ln2_w, layer.ln2_b, eps)
        return x


@dataclass(slots=True)
class _BertLayer:
    qkv: _Linear  # [3 * hidden, hidden], rows: query, key, value
    out: _Linear  # [hidden, hidden]
    ln1_w: torch.Tensor  # post-attention LayerNorm
    ln1_b: torch.Tensor
    up: _Linear  # [intermediate, hidden]
    down: _Linear  # [hidden, intermediate]
    ln2_w: torch.Tensor  # post-FFN LayerNorm
    ln2_b: torch.Tensor
