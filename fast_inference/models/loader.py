"""Builds a model from a Hugging Face directory (safetensors, optionally quantized at load) or a GGUF file:
picks the class and fills its fused weights."""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from fast_inference import ops

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .gguf import gguf_weights, is_gguf_file
from .llama import Linear, LlamaForCausalLM
from .quantized import LOAD_TIME_QUANTIZATIONS, QuantizedLinear, StoredWeight

MODEL_CLASSES = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def safetensors_files(model_path: str | Path) -> list[Path]:
    """The checkpoint files: those named by model.safetensors.index.json, else every *.safetensors."""
    path = Path(model_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"checkpoint shards listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights found in {str(path)!r}")
    return files


def _target(model: LlamaForCausalLM, name: str) -> tuple[torch.Tensor, int, int] | None:
    """Where a checkpoint tensor goes: (parameter, row offset, rows); None for tensors we do not use."""
    cfg = model.config
    if name == "model.embed_tokens.weight":
        return model.embed_tokens, 0, cfg.vocab_size
    if name == "lm_head.weight":
        if cfg.tie_word_embeddings:
            return None  # tied: the embedding is the head
        return model.lm_head, 0, cfg.vocab_size
    if name == "model.norm.weight":
        return model.norm.weight, 0, cfg.hidden_size
    m = _LAYER.match(name)
    if m is None or int(m.group(1)) >= cfg.num_layers:
        return None
    layer = model.layers[int(m.group(1))]
    rest = m.group(2)
    attn = layer.self_attn
    q, kv = attn.q_size, attn.kv_size
    inter = cfg.intermediate_size
    table = {
        "self_attn.q_proj.weight": (attn.qkv_proj.weight, 0, q),
        "self_attn.k_proj.weight": (attn.qkv_proj.weight, q, kv),
        "self_attn.v_proj.weight": (attn.qkv_proj.weight, q + kv, kv),
        "self_attn.o_proj.weight": (attn.o_proj.weight, 0, cfg.hidden_size),
        "mlp.gate_proj.weight": (layer.mlp.gate_up_proj.weight, 0, inter),
        "mlp.up_proj.weight": (layer.mlp.gate_up_proj.weight, inter, inter),
        "mlp.down_proj.weight": (layer.mlp.down_proj.weight, 0, cfg.hidden_size),
        "input_layernorm.weight": (layer.input_layernorm.weight, 0, cfg.hidden_size),
        "post_attention_layernorm.weight": (layer.post_attention_layernorm.weight, 0, cfg.hidden_size),
    }
    bias = attn.qkv_proj.bias
    if bias is not None:
        table["self_attn.q_proj.bias"] = (bias, 0, q)
        table["self_attn.k_proj.bias"] = (bias, q, kv)
        table["self_attn.v_proj.bias"] = (bias, q + kv, kv)
    if attn.q_norm is not None:
        table["self_attn.q_norm.weight"] = (attn.q_norm.weight, 0, cfg.head_dim)
        table["self_attn.k_norm.weight"] = (attn.k_norm.weight, 0, cfg.head_dim)
    return table.get(rest)


def load_model(cfg: ModelConfig, tensor_parallel=None) -> LlamaForCausalLM:
    """Instantiate the architecture in cfg.dtype on cfg.device and fill every weight from the checkpoint.
    tensor_parallel (a parallel_layers.TensorParallel of size > 1): this rank's share of the model only."""
    model_class = MODEL_CLASSES.get(cfg.architecture)
    if model_class is None:
        raise ValueError(
            f"unsupported architecture {cfg.architecture!r}; supported: {', '.join(MODEL_CLASSES)}"
        )
    if tensor_parallel is not None and tensor_parallel.size > 1:
        from .parallel_loader import load_sharded_model

        return load_sharded_model(model_class, cfg, tensor_parallel)
    if is_gguf_file(cfg.model_path):
        return _build_from_stored(model_class, cfg, gguf_weights(cfg))
    if cfg.quantization is not None:
        return _build_from_stored(model_class, cfg, _quantized_checkpoint(cfg))
    model = model_class(cfg)
    expected: dict[tuple[int, int], str] = {}
    for pname, param in model.named_parameters(remove_duplicate=True):
        expected[(id(param), 0)] = pname
    loaded: set[tuple[int, int]] = set()
    filled_rows: dict[int, int] = {}
    for file in safetensors_files(cfg.model_path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                target = _target(model, name)
                if target is None:
                    continue
                param, offset, rows = target
                tensor = f.get_tensor(name)
                dest = param.data[offset : offset + rows]
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise ValueError(
                        f"weight {name!r} in {file.name} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(dest.shape)} from config.json"
                    )
                dest.copy_(tensor)
                filled_rows[id(param)] = filled_rows.get(id(param), 0) + rows
                loaded.add((id(param), 0))
    missing = [
        pname
        for key, pname in expected.items()
        if key not in loaded or filled_rows.get(key[0], 0) < dict(model.named_parameters())[pname].shape[0]
    ]
    if missing:
        hint = " (untied model without lm_head.weight?)" if "lm_head" in missing else ""
        raise ValueError(
            f"checkpoint in {cfg.model_path!r} is missing weights: {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}{hint}"
        )
    model.eval()
    model.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return model


# The fused projections of the model -> the checkpoint tensors (Hugging Face names) they concatenate by rows.
_FUSED_PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
_LINEAR_WEIGHT = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"
)
# The token embedding and the head of a load-time quantized model: Q8_0 whatever the layers get (as llama.cpp
# keeps them at higher precision), a 4-bit tied embedding costs too much quality.
_TABLE_QTYPE = LOAD_TIME_QUANTIZATIONS["q8_0"]


def _quantized_checkpoint(cfg: ModelConfig) -> dict[str, StoredWeight]:
    """The safetensors tensors, the linear and embedding weights quantized one at a time (no full-precision
    copy of the model is ever resident)."""
    qtype = LOAD_TIME_QUANTIZATIONS[cfg.quantization]
    weights: dict[str, StoredWeight] = {}
    for file in safetensors_files(cfg.model_path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                tensor = f.get_tensor(name)
                if _LINEAR_WEIGHT.match(name):
                    weights[name] = StoredWeight(qtype, ops.quantize(tensor.float(), qtype), tensor.shape[-1])
                elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                    packed = ops.quantize(tensor.float(), _TABLE_QTYPE)
                    weights[name] = StoredWeight(_TABLE_QTYPE, packed, tensor.shape[-1])
                else:
                    weights[name] = StoredWeight(None, tensor, tensor.shape[-1])
    return weights


def _build_from_stored(model_class, cfg: ModelConfig, weights: dict[str, StoredWeight]) -> LlamaForCausalLM:
    """Build the model around checkpoint tensors kept in their stored format: quantized projections become
    QuantizedLinear (blocks as stored), all-dense ones a plain Linear in cfg.dtype."""
    source = cfg.model_path
    missing: list[str] = []

    def take(name: str, cols: int | None = None) -> StoredWeight | None:
        stored = weights.pop(name, None)
        if stored is None:
            missing.append(name)
        elif cols is not None and stored.cols != cols:
            raise ValueError(f"weight {name!r} in {source!r} has {stored.cols} columns, expected {cols}")
        return stored

    def make_linear(name: str, in_features: int, out_features: int, bias: bool):
        if name in ("embed_tokens", "lm_head"):
            part_names = ["model.embed_tokens.weight" if name == "embed_tokens" else "lm_head.weight"]
            bias_names: list[str] = []
        else:
            layer, proj = name.split(".", 2)[1], name.split(".", 2)[2]
            stems = [f"model.layers.{layer}.{p}" for p in _FUSED_PARTS[proj]]
            part_names = [f"{s}.weight" for s in stems]
            bias_names = [f"{s}.bias" for s in stems] if bias else []
        parts = [take(n, in_features) for n in part_names]
        biases = [take(n) for n in bias_names]
        if None in parts or None in biases:
            return Linear(
                in_features, 1, False, cfg.dtype, cfg.device
            )  # reported below, with every other gap
        rows = sum(p.rows for p in parts)
        if rows != out_features:
            raise ValueError(
                f"weights {', '.join(part_names)} in {source!r} have {rows} rows, expected {out_features}"
            )
        parts = [StoredWeight(p.qtype, p.data.to(cfg.device), p.cols) for p in parts]
        bias_t = torch.cat([b.data.reshape(-1) for b in biases]).to(cfg.device, cfg.dtype) if biases else None
        if name not in ("embed_tokens", "lm_head") and all(p.qtype is None for p in parts):
            linear = Linear(in_features, out_features, bias, cfg.dtype, cfg.device)
            linear.weight.data.copy_(torch.cat([p.data for p in parts]))
            if bias_t is not None:
                linear.bias.data.copy_(bias_t)
            return linear
        return QuantizedLinear(parts, bias_t, cfg.dtype)

    model = model_class(cfg, make_linear)
    vectors = [("model.norm.weight", model.norm.weight)]
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        vectors.append((prefix + "input_layernorm.weight", layer.input_layernorm.weight))
        vectors.append((prefix + "post_attention_layernorm.weight", layer.post_attention_layernorm.weight))
        if layer.self_attn.q_norm is not None:
            vectors.append((prefix + "self_attn.q_norm.weight", layer.self_attn.q_norm.weight))
            vectors.append((prefix + "self_attn.k_norm.weight", layer.self_attn.k_norm.weight))
    for name, param in vectors:
        stored = take(name)
        if stored is not None:
            if stored.data.numel() != param.numel():
                raise ValueError(
                    f"weight {name!r} in {source!r} has {stored.data.numel()} values, expected {param.numel()}"
                )
            param.data.copy_(stored.data.reshape(param.shape))
    if missing:
        raise ValueError(
            f"checkpoint {source!r} is missing weights: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    model.eval()
    quantized = {id(m): m.weight_bytes for m in model.modules() if isinstance(m, QuantizedLinear)}
    model.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        quantized.values()
    )
    return model
