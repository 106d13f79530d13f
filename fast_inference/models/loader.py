"""Builds a model from a Hugging Face directory: picks the class, reads (sharded) safetensors into fused weights."""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .llama import LlamaForCausalLM

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


def load_model(cfg: ModelConfig) -> LlamaForCausalLM:
    """Instantiate the architecture in cfg.dtype on cfg.device and fill every weight from the checkpoint."""
    model_class = MODEL_CLASSES.get(cfg.architecture)
    if model_class is None:
        raise ValueError(
            f"unsupported architecture {cfg.architecture!r}; supported: {', '.join(MODEL_CLASSES)}"
        )
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
