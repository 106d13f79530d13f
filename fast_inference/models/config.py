"""ModelConfig: the architecture-level facts the engine needs, parsed from a Hugging Face model directory
(or, through models/gguf.py, from a GGUF file's metadata), and the one dtype and max_model_len resolvers."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {name}")
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of 'auto', 'float32', 'float16', 'bfloat16', got {name!r}")
    return _DTYPES[key]


def cpu_auto_dtype() -> torch.dtype:
    """What dtype='auto' picks on this CPU, decided from bench_throughput (README, Performance): bfloat16
    wherever our bf16 kernels run (ops.cpu_isa() avx2 or avx512): half the weight bytes of f32 per decode
    step; measured SmolLM2-135M shape, same run: decode batch 32 3.2x (AVX-512 BF16) / 1.75x (AVX2) f32's
    speed, a 512-token prefill 3.7x / 2.0x, batch 1 2.7x / even (the AVX2 GEMV widens bf16 in registers,
    its blocked GEMM in cache). float32 on CPUs without AVX2, where only the portable loops and torch's
    slow bf16 GEMM would run."""
    from fast_inference import ops

    return torch.float32 if ops.cpu_isa() == "portable" else torch.bfloat16


def resolve_max_model_len(max_model_len: int | None, max_pos: int, source: str) -> int:
    """The context length to serve: the checkpoint's `source` limit (max_pos) unless a smaller one is asked for."""
    if max_model_len is None:
        return max_pos
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be positive, got {max_model_len}")
    if max_model_len > max_pos:
        raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's {source} ({max_pos})")
    return max_model_len


def resolve_dtype(
    requested: str | torch.dtype, checkpoint_dtype: torch.dtype | None, device: torch.device
) -> torch.dtype:
    """'auto' = the checkpoint's dtype on CUDA; on CPU cpu_auto_dtype() (bfloat16 with AVX2 or better)."""
    if not (isinstance(requested, str) and requested == "auto"):
        dtype = parse_dtype(requested)
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError("dtype float16 is not supported on CPU: use bfloat16 or float32")
        return dtype
    if device.type == "cuda":
        return checkpoint_dtype if checkpoint_dtype is not None else torch.bfloat16
    return cpu_auto_dtype()


@dataclass(slots=True)
class ModelConfig:
    model_path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    max_model_len: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    hidden_act: str
    dtype: torch.dtype
    device: torch.device
    checkpoint_dtype: torch.dtype | None
    eos_token_ids: set[int] = field(default_factory=set)
    # Default sampling values from generation_config.json (temperature, top_p, top_k, ...), if any.
    generation_defaults: dict = field(default_factory=dict)
    hf_config: dict = field(default_factory=dict, repr=False)
    # A block format the loader quantizes an HF checkpoint's linear weights into ("q8_0", "q4_0"), or None.
    quantization: str | None = None


def _as_id_set(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def load_model_config(
    model_path: str | Path,
    dtype: str | torch.dtype,
    device: torch.device,
    max_model_len: int | None,
    quantization: str | None = None,
) -> ModelConfig:
    """Read config.json (+ generation_config.json), or a GGUF file's metadata, and check the architecture is
    one we run. quantization: quantize an HF checkpoint's weights at load into that block format."""
    path = Path(model_path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        if quantization is not None:
            raise ValueError(
                f"quantization={quantization!r} applies to Hugging Face checkpoints; the GGUF file "
                f"{str(path)!r} is loaded in the formats it stores"
            )
        from .gguf import gguf_model_config

        return gguf_model_config(path, dtype, device, max_model_len)
    if quantization is not None:
        from .quantized import LOAD_TIME_QUANTIZATIONS

        if quantization not in LOAD_TIME_QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(LOAD_TIME_QUANTIZATIONS)} or None, got {quantization!r}"
            )
    if not path.is_dir():
        raise ValueError(f"model directory or .gguf file not found: {str(path)!r}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json")
    cfg = json.loads(config_file.read_text())
    architectures = cfg.get("architectures") or []
    arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {architectures or cfg.get('model_type')!r} in {str(config_file)!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hidden_act = cfg.get("hidden_act", "silu")
    if hidden_act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {hidden_act!r}: only silu is supported")
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim") or hidden // num_heads
    # transformers < 5 stores rope_theta + rope_scaling at the top level; 5.x folds both into rope_parameters.
    rope_params = cfg.get("rope_parameters") or {}
    rope_scaling = cfg.get("rope_scaling") or (rope_params if rope_params else None)
    rope_theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
    if rope_scaling is not None:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(
                f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3"
            )
        if rope_type == "default":
            rope_scaling = None
    ckpt_dtype_name = cfg.get("dtype") or cfg.get("torch_dtype")
    checkpoint_dtype = _DTYPES.get(str(ckpt_dtype_name).removeprefix("torch.")) if ckpt_dtype_name else None
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    max_model_len = resolve_max_model_len(max_model_len, max_pos, "max_position_embeddings")

    eos = _as_id_set(cfg.get("eos_token_id"))
    gen_defaults: dict = {}
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        gen = json.loads(gen_file.read_text())
        eos |= _as_id_set(gen.get("eos_token_id"))
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if gen.get(key) is not None:
                gen_defaults[key] = gen[key]
        if gen.get("do_sample") is False:
            gen_defaults["temperature"] = 0.0
    arch_is_qwen2 = arch == "Qwen2ForCausalLM"
    return ModelConfig(
        model_path=str(path),
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_pos,
        max_model_len=int(max_model_len),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", arch_is_qwen2)) or arch_is_qwen2,
        qk_norm=arch == "Qwen3ForCausalLM",
        hidden_act=hidden_act,
        dtype=resolve_dtype(dtype, checkpoint_dtype, device),
        device=device,
        checkpoint_dtype=checkpoint_dtype,
        eos_token_ids=eos,
        generation_defaults=gen_defaults,
        hf_config=cfg,
        quantization=quantization,
    )
