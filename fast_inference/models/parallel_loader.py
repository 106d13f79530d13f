"""Loads one tensor-parallel rank's share of a model: only its slice of each checkpoint tensor is read (HF
safetensors) or kept (GGUF), then the rank-local model is built and its parallel layers wrapped."""

from safetensors import safe_open

from fast_inference import ops

from .config import ModelConfig
from .gguf import GGUFFile, gguf_weights, hf_name, is_gguf_file
from .llama import LlamaForCausalLM
from .loader import _LINEAR_WEIGHT, _TABLE_QTYPE, _build_from_stored, safetensors_files
from .parallel_layers import (
    TensorParallel,
    check_whole_blocks,
    parallelize,
    read_slice,
    shard_config,
    shard_of,
    slice_stored,
)
from .quantized import LOAD_TIME_QUANTIZATIONS, QUANTIZED_TYPES, StoredWeight


def check_gguf_shards(cfg: ModelConfig, size: int) -> None:
    """ValueError (before any worker starts) when a GGUF tensor's row-parallel slice would split its quant
    blocks: only the header's tensor table is read."""
    if size == 1 or not is_gguf_file(cfg.model_path):
        return
    with GGUFFile(cfg.model_path) as gf:
        for gname, info in gf.tensors.items():
            name = hf_name(gname)
            shard = shard_of(name, cfg, TensorParallel(0, size)) if name is not None else None
            if shard is not None and shard[0] == "cols" and info.ggml_type in QUANTIZED_TYPES:
                for rank in range(size):  # every rank's slice starts at a multiple of the first one's width
                    _, start, stop = shard_of(name, cfg, TensorParallel(rank, size))
                    check_whole_blocks(name, info.ggml_type, start, stop, size)


def _rank_checkpoint(cfg: ModelConfig, tp: TensorParallel) -> dict[str, StoredWeight]:
    """This rank's slices of the safetensors tensors (quantized after slicing when cfg.quantization: the
    slices are whole blocks, so the blocks are the ones a single process would make)."""
    qtype = LOAD_TIME_QUANTIZATIONS[cfg.quantization] if cfg.quantization is not None else None
    weights: dict[str, StoredWeight] = {}
    for file in safetensors_files(cfg.model_path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                tensor = read_slice(name, f.get_slice(name), cfg, tp)
                cols = tensor.shape[-1]
                if qtype is not None and _LINEAR_WEIGHT.match(name):
                    weights[name] = StoredWeight(qtype, ops.quantize(tensor.float(), qtype), cols)
                elif qtype is not None and name in ("model.embed_tokens.weight", "lm_head.weight"):
                    weights[name] = StoredWeight(
                        _TABLE_QTYPE, ops.quantize(tensor.float(), _TABLE_QTYPE), cols
                    )
                else:
                    weights[name] = StoredWeight(None, tensor, cols)
    return weights


def load_sharded_model(model_class, cfg: ModelConfig, tp: TensorParallel) -> LlamaForCausalLM:
    """The model with this rank's weights: heads, KV heads, intermediate rows and vocabulary rows split as
    parallel_layers.shard_of says; norms replicated."""
    if is_gguf_file(cfg.model_path):
        weights = gguf_weights(cfg, select=lambda name, stored: slice_stored(name, stored, cfg, tp))
    else:
        weights = _rank_checkpoint(cfg, tp)
    model = _build_from_stored(model_class, shard_config(cfg, tp), weights)
    parallelize(model, cfg, tp)
    return model
