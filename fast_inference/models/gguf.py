"""GGUF checkpoints: the file's metadata -> ModelConfig and tokenizer, its tensors -> weights under Hugging Face names.

The header is parsed here (with the `gguf` package's type tables) rather than by gguf.GGUFReader: the reader
builds a numpy view per string, which takes 15-40 s on a 49k-token vocabulary; this parse takes well under a
second. Tensor data is read straight from a memory map; quantized tensors stay in their ggml block layout
(uint8 [rows, row_bytes]) and are never dequantized here.

Memory: the quantized tensors are copied once, straight from the map, into one huge-page arena (the decode
kernels stream them every step; see hugepages.py), in the order the engine fuses them (q, k, v back to back,
then gate, up) so a fused projection is a view over its parts instead of a concatenated copy; the q/k row
un-permutation is done by that same copy. The map is closed after loading, so the process keeps about one file's
worth of weights.
"""

import mmap
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig, resolve_dtype, resolve_max_model_len
from .hugepages import huge_page_buffer
from .quantized import QUANTIZED_TYPES, StoredWeight, row_bytes

GGUF_MAGIC = b"GGUF"
# ggml type ids of the plain floating-point tensors a file may hold.
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30
_DENSE_DTYPES = {GGML_F32: torch.float32, GGML_F16: torch.float16, GGML_BF16: torch.bfloat16}
SUPPORTED_TENSOR_TYPES = {GGML_F32: "F32", GGML_F16: "F16", GGML_BF16: "BF16", **QUANTIZED_TYPES}

# general.architecture -> the engine's architecture. llama.cpp files Mistral (and SmolLM, TinyLlama) as llama.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# convert_hf_to_gguf permutes the q/k rows of these (for llama.cpp's interleaved RoPE); we undo it.
_PERMUTED_QK = ("llama", "mistral")

# Metadata value types (GGUF spec): fixed-size scalars by struct format; 8 is a string, 9 an array.
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (rows first): ggml's ne reversed
    ggml_type: int
    offset: int  # absolute byte offset in the file


class GGUFFile:
    """A parsed GGUF header plus a read-only memory map of the file for the tensor data."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if self._map[:4] != GGUF_MAGIC:
            self._map.close()
            raise ValueError(f"{self.path!r} is not a GGUF file (no GGUF magic)")
        self._pos = 4
        version = self._scalar("<I")
        if version not in (2, 3):
            self._map.close()
            raise ValueError(f"{self.path!r}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            ne = struct.unpack_from(f"<{n_dims}Q", self._map, self._pos)
            self._pos += 8 * n_dims
            ggml_type, offset = self._scalar("<I"), self._scalar("<Q")
            infos.append((name, tuple(reversed(ne)), ggml_type, offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = (self._pos + alignment - 1) // alignment * alignment
        self.tensors = {
            name: TensorInfo(name, shape, ggml_type, data_start + offset)
            for name, shape, ggml_type, offset in infos
        }

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- header parsing ----------------------------------------------------------------------
    def _scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._scalar("<Q")
        text = self._map[self._pos : self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return text

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._scalar("<I"), self._scalar("<Q")
            if etype in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[etype]
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self._map, self._pos))
                self._pos += struct.calcsize(fmt) * count
                return values
            return [self._value(etype) for _ in range(count)]
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"{self.path!r}: unknown GGUF metadata value type {vtype}")
        return self._scalar(_SCALAR_FORMATS[vtype])

    # ---- tensor data -------------------------------------------------------------------------
    def _check_type(self, info: TensorInfo) -> None:
        if info.ggml_type not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(
                f"tensor {info.name!r} in {self.path!r} has ggml type {_type_name(info.ggml_type)}; supported: "
                f"{', '.join(SUPPORTED_TENSOR_TYPES.values())}"
            )

    def _view(self, info: TensorInfo) -> torch.Tensor:
        """The tensor's bytes in the map as a read-only uint8 [rows, row_bytes] (no copy). Delete it before
        close(): a live view keeps the map open."""
        cols = info.shape[-1]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        if info.ggml_type in _DENSE_DTYPES:
            width = cols * torch.empty((), dtype=_DENSE_DTYPES[info.ggml_type]).element_size()
        else:
            width = row_bytes(info.ggml_type, cols)
        with warnings.catch_warnings():  # read only: the map is never written through it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(self._map, dtype=torch.uint8, count=rows * width, offset=info.offset)
        return raw.view(rows, width)

    def tensor(self, name: str) -> StoredWeight:
        """A tensor's data copied out of the map: dense [rows, cols] (or [cols]) in its file dtype, or ggml blocks
        uint8 [rows, row_bytes] for the quantized types."""
        info = self.tensors[name]
        self._check_type(info)
        view = self._view(info)
        cols = info.shape[-1]
        if info.ggml_type in _DENSE_DTYPES:
            data = view.clone().view(_DENSE_DTYPES[info.ggml_type]).view(*info.shape)
            return StoredWeight(None, data, cols)
        return StoredWeight(info.ggml_type, view.clone(), cols)

    def copy_into(self, name: str, dest: torch.Tensor, permute_heads: int | None = None) -> None:
        """Copy a quantized tensor's blocks into dest (uint8 [rows, row_bytes]); permute_heads: undo
        convert_hf_to_gguf's q/k row permutation in the same copy (as _unpermute_rows does for dense ones)."""
        info = self.tensors[name]
        self._check_type(info)
        src = self._view(info)
        if permute_heads is None:
            dest.copy_(src)
        else:
            rows, width = src.shape
            half = rows // permute_heads // 2
            dest.view(permute_heads, 2, half, width).copy_(
                src.view(permute_heads, half, 2, width).transpose(1, 2)
            )
        del src


def _type_name(ggml_type: int) -> str:
    try:
        import gguf

        return gguf.GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"#{ggml_type}"


def is_gguf_file(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() == ".gguf"


def _arch(gf: GGUFFile) -> tuple[str, str]:
    """(GGUF architecture name, engine architecture); unknown ones raise naming them and the supported."""
    name = gf.metadata.get("general.architecture")
    if name not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {name!r} in {gf.path!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    return name, GGUF_ARCHITECTURES[name]


def gguf_model_config(
    path: str | Path,
    dtype: str | torch.dtype,
    device: torch.device,
    max_model_len: int | None,
) -> ModelConfig:
    """ModelConfig from the file's hyper-parameters (`<arch>.*` keys) and special token ids."""
    with GGUFFile(path) as gf:
        name, arch = _arch(gf)
        meta = gf.metadata

        def key(suffix, default=None):
            value = meta.get(f"{name}.{suffix}", default)
            if value is None:
                raise ValueError(f"GGUF file {gf.path!r} lacks the metadata key {name}.{suffix}")
            return value

        for tname, info in gf.tensors.items():
            if info.ggml_type not in SUPPORTED_TENSOR_TYPES:
                raise ValueError(
                    f"tensor {tname!r} in {gf.path!r} has ggml type {_type_name(info.ggml_type)}; supported: "
                    f"{', '.join(SUPPORTED_TENSOR_TYPES.values())}"
                )
        hidden = int(key("embedding_length"))
        num_heads = int(key("attention.head_count"))
        num_kv_heads = int(key("attention.head_count_kv", num_heads))
        head_dim = int(meta.get(f"{name}.attention.key_length") or hidden // num_heads)
        vocab = meta.get(f"{name}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
        if not vocab:
            vocab = gf.tensors["token_embd.weight"].shape[0]
        rope_scaling = _rope_scaling(gf, name)
        max_pos = int(key("context_length", 2048))
        max_model_len = resolve_max_model_len(max_model_len, max_pos, "context_length")
        eos = {
            int(meta[k])
            for k in (
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id",
            )
            if meta.get(k) is not None
        }
        has_bias = "blk.0.attn_q.bias" in gf.tensors
        return ModelConfig(
            model_path=gf.path,
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            max_model_len=int(max_model_len),
            tie_word_embeddings="output.weight" not in gf.tensors,
            attention_bias=has_bias,
            qk_norm="blk.0.attn_q_norm.weight" in gf.tensors,
            hidden_act="silu",
            dtype=resolve_dtype(dtype, None, device),
            device=device,
            checkpoint_dtype=None,
            eos_token_ids=eos,
            generation_defaults={},
            hf_config={},
        )


def _rope_scaling(gf: GGUFFile, name: str) -> dict | None:
    """RoPE scaling from `<arch>.rope.scaling.*`: none and linear are supported; others raise naming them."""
    kind = gf.metadata.get(f"{name}.rope.scaling.type", "none")
    if "rope_freqs.weight" in gf.tensors:
        raise ValueError(
            f"{gf.path!r} scales RoPE by per-frequency factors (rope_freqs.weight, Llama 3.1 style), which the "
            "GGUF loader does not support yet; supported RoPE scaling: none, linear"
        )
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(gf.metadata[f"{name}.rope.scaling.factor"])}
    raise ValueError(f"unsupported RoPE scaling type {kind!r} in {gf.path!r}; supported: none, linear")


def gguf_tokenizer(path: str | Path):
    """A fast tokenizer from the file's vocabulary, merges, special tokens and chat template, through
    transformers' GGUF tokenizer conversion (it knows llama.cpp's pre-tokenizer names)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer

    keys = {
        "ggml.model": "tokenizer_type",
        "ggml.pre": "pre_tokenizer_type",
        "ggml.tokens": "tokens",
        "ggml.scores": "scores",
        "ggml.token_type": "token_type",
        "ggml.merges": "merges",
        "ggml.precompiled_charsmap": "precompiled_charsmap",
        "ggml.bos_token_id": "bos_token_id",
        "ggml.eos_token_id": "eos_token_id",
        "ggml.unknown_token_id": "unk_token_id",
        "ggml.padding_token_id": "pad_token_id",
        "ggml.add_space_prefix": "add_prefix_space",
    }
    with GGUFFile(path) as gf:
        meta = gf.metadata
        arch = meta.get("general.architecture")
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"GGUF file {str(path)!r} has no tokenizer (tokenizer.ggml.tokens)")
    tokenizer_dict = {name: meta[f"tokenizer.{k}"] for k, name in keys.items() if f"tokenizer.{k}" in meta}
    tokens = tokenizer_dict["tokens"]
    backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    kwargs: dict = {}
    for name, k in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
    ):
        token_id = meta.get(f"tokenizer.ggml.{k}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            kwargs[name] = tokens[token_id]
    # sentencepiece ("llama") vocabularies add BOS unless the file says not to; byte-level BPE ones do not.
    default_bos = tokenizer_dict.get("tokenizer_type") == "llama"
    kwargs["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
    kwargs["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if meta.get("tokenizer.chat_template"):
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    return tokenizer


# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for tensors the engine does not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _unpermute_rows(data: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's q/k row permutation. Whole rows move, so ggml blocks (which never cross a
    row) are reordered as they are: hf = gguf.reshape(heads, D/2, 2, ...).swapaxes(1, 2)."""
    rows = data.shape[0]
    tail = data.shape[1:]
    return (
        data.reshape(num_heads, rows // num_heads // 2, 2, *tail)
        .transpose(1, 2)
        .reshape(rows, *tail)
        .contiguous()
    )


# The order of a layer's projections in the arena: each fused projection's parts back to back, in the order
# the loader concatenates them (loader._FUSED_PARTS), so the fused weight is a view.
_ARENA_ORDER = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_FUSED_WITH_PREVIOUS = {"self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight"}


def _arena_key(name: str) -> tuple[int, int]:
    if name == "model.embed_tokens.weight":
        return (-1, 0)
    if name == "lm_head.weight":
        return (1 << 30, 0)
    _, _, layer, rest = name.split(".", 3)
    return (int(layer), _ARENA_ORDER.index(rest) if rest in _ARENA_ORDER else len(_ARENA_ORDER))


def gguf_weights(
    cfg: ModelConfig, select: Callable[[str, StoredWeight], StoredWeight] | None = None
) -> dict[str, StoredWeight]:
    """Every tensor the engine uses, under its Hugging Face name, in the file's own format: quantized ones as
    views into one huge-page arena (see the module docstring), dense ones (norms, F32/F16/BF16) as copies.
    select(name, weight) keeps part of each tensor as it is read (a tensor-parallel rank's slice); then each
    tensor is a copy of its own, so a rank keeps only its slices (no arena: a view would pin all of it)."""
    if select is not None:
        return _selected_weights(cfg, select)
    weights: dict[str, StoredWeight] = {}
    with GGUFFile(cfg.model_path) as gf:
        arch_name, _ = _arch(gf)
        used = {hf_name(g): g for g in gf.tensors if hf_name(g) is not None}
        for name, gname in used.items():
            gf._check_type(gf.tensors[gname])
            if gf.tensors[gname].ggml_type in _DENSE_DTYPES:
                stored = gf.tensor(gname)
                if arch_name in _PERMUTED_QK and (".q_proj." in name or ".k_proj." in name):
                    heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
                    stored = StoredWeight(None, _unpermute_rows(stored.data, heads), stored.cols)
                weights[name] = stored
        quantized = sorted((n for n in used if n not in weights), key=_arena_key)
        # Offsets: 64-byte aligned, except a fused part that continues its predecessor in the same format.
        offsets, total, previous = {}, 0, None
        for name in quantized:
            info = gf.tensors[used[name]]
            key = _arena_key(name)
            fused = (
                previous is not None
                and name.split(".", 3)[-1] in _FUSED_WITH_PREVIOUS
                and previous[0] == (key[0], key[1] - 1)  # its predecessor in the same layer
                and previous[1] == (info.ggml_type, info.shape[-1])
            )
            if not fused:
                total = -(-total // 64) * 64
            offsets[name] = total
            rows = int(np.prod(info.shape[:-1]))
            total += rows * row_bytes(info.ggml_type, info.shape[-1])
            previous = (key, (info.ggml_type, info.shape[-1]))
        arena = huge_page_buffer(total)
        for name in quantized:
            info = gf.tensors[used[name]]
            cols, rows = info.shape[-1], int(np.prod(info.shape[:-1]))
            width = row_bytes(info.ggml_type, cols)
            dest = arena[offsets[name] : offsets[name] + rows * width].view(rows, width)
            heads = None
            if arch_name in _PERMUTED_QK and (".q_proj." in name or ".k_proj." in name):
                heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            gf.copy_into(used[name], dest, heads)
            weights[name] = StoredWeight(info.ggml_type, dest, cols)
    return weights


def _selected_weights(
    cfg: ModelConfig, select: Callable[[str, StoredWeight], StoredWeight]
) -> dict[str, StoredWeight]:
    """gguf_weights with a select: each tensor copied out of the map, un-permuted, then sliced by select."""
    weights: dict[str, StoredWeight] = {}
    with GGUFFile(cfg.model_path) as gf:
        arch_name, _ = _arch(gf)
        for gname in gf.tensors:
            name = hf_name(gname)
            if name is None:
                continue
            stored = gf.tensor(gname)
            if arch_name in _PERMUTED_QK and (".q_proj." in name or ".k_proj." in name):
                heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
                stored = StoredWeight(stored.qtype, _unpermute_rows(stored.data, heads), stored.cols)
            weights[name] = select(name, stored)
    return weights
