"""Sentence-transformers pooling: read modules.json / 1_Pooling / sentence_bert_config.json, pool varlen rows.

A sentence-transformers model directory is a pipeline of modules (modules.json): the Transformer (the
checkpoint in the directory itself), a Pooling module (1_Pooling/config.json: which token reductions
to concatenate) and optionally a Normalize module (unit L2 norm). sentence_bert_config.json gives
the maximum sequence length (sentence-transformers >= 5 keeps it as the tokenizer's model_max_length
instead). A plain Hugging Face directory without modules.json gets what
sentence-transformers itself builds for one: mean pooling, no normalization.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# sentence-transformers' order: several enabled modes are concatenated in this order.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(slots=True)
class PoolingConfig:
    modes: tuple[str, ...]  # reductions, concatenated in this order
    normalize: bool  # L2-normalize the pooled vector (a Normalize module follows Pooling)
    max_seq_length: (
        int | None
    )  # sentence_bert_config.json's or the tokenizer's limit; None when neither has one
    sentence_transformers: bool  # the directory has a modules.json

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size * len(self.modes)


def _class_name(module_type: str) -> str:
    return module_type.rsplit(".", 1)[-1]


def _read_pooling_modes(path: Path) -> tuple[str, ...]:
    config = json.loads(path.read_text())
    if "pooling_mode" in config:  # sentence-transformers >= 5 writes the modes directly
        value = config["pooling_mode"]
        modes = (value,) if isinstance(value, str) else tuple(value)
    else:
        modes = tuple(mode for key, mode in _LEGACY_KEYS.items() if config.get(key, False)) or ("mean",)
    for mode in modes:
        if mode not in POOLING_MODES:
            raise ValueError(f"{path}: pooling mode {mode!r} is not one of {POOLING_MODES}")
    if config.get("include_prompt", True) is False:
        raise ValueError(f"{path}: include_prompt=false (prompt-excluding pooling) is not supported")
    return modes


def load_pooling_config(model_dir: str | os.PathLike) -> PoolingConfig:
    """The pooling pipeline of a model directory (see the module docstring for the defaults)."""
    model_dir = Path(model_dir)
    max_seq_length = None
    sbert_path = model_dir / "sentence_bert_config.json"
    if sbert_path.is_file():
        value = json.loads(sbert_path.read_text()).get("max_seq_length")
        max_seq_length = int(value) if value is not None else None
    tokenizer_path = model_dir / "tokenizer_config.json"
    if max_seq_length is None and tokenizer_path.is_file():
        value = json.loads(tokenizer_path.read_text()).get("model_max_length")
        # Tokenizers without a limit store a huge sentinel (int(1e30)); that is no limit.
        if isinstance(value, int) and 0 < value < 1_000_000:
            max_seq_length = value

    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return PoolingConfig(
            modes=("mean",), normalize=False, max_seq_length=max_seq_length, sentence_transformers=False
        )

    modules = sorted(json.loads(modules_path.read_text()), key=lambda m: int(m.get("idx", 0)))
    names = [_class_name(m.get("type", "")) for m in modules]
    if not names or names[0] != "Transformer" or modules[0].get("path", "") not in ("", "."):
        raise ValueError(
            f"{modules_path}: the first module must be the Transformer in the model directory itself"
        )
    modes: tuple[str, ...] | None = None
    normalize = False
    for module, name in zip(modules[1:], names[1:]):
        if name == "Pooling" and modes is None and not normalize:
            config_path = model_dir / module.get("path", "") / "config.json"
            if not config_path.is_file():
                raise ValueError(f"{modules_path}: Pooling module has no {config_path}")
            modes = _read_pooling_modes(config_path)
        elif name == "Normalize" and modes is not None:
            normalize = True
        else:
            raise ValueError(
                f"{modules_path}: module {module.get('type')!r} at position {module.get('idx')} is not "
                "supported (supported pipeline: Transformer, Pooling, optional Normalize)"
            )
    if modes is None:
        raise ValueError(f"{modules_path}: no Pooling module after the Transformer")
    return PoolingConfig(
        modes=modes, normalize=normalize, max_seq_length=max_seq_length, sentence_transformers=True
    )


def pool(
    hidden: torch.Tensor,  # [num_tokens, hidden_size], sequences back to back
    cu_seq_lens: torch.Tensor,  # int64 [num_seqs + 1] prefix sums of the sequence lengths
    config: PoolingConfig,
) -> torch.Tensor:  # float32 [num_seqs, hidden_size * len(config.modes)]
    """Reduce each sequence's token states to one vector, as sentence-transformers' Pooling (+ Normalize)."""
    hidden = hidden.float()
    num_seqs = cu_seq_lens.numel() - 1
    dim = hidden.shape[1]
    starts, ends = cu_seq_lens[:-1], cu_seq_lens[1:]
    lens = ends - starts
    num_tokens = hidden.shape[0]
    segment = torch.repeat_interleave(torch.arange(num_seqs, device=hidden.device), lens)
    token = torch.arange(num_tokens, device=hidden.device)

    def weighted_sum(weights: torch.Tensor) -> torch.Tensor:  # weights: [num_tokens]
        # A [num_seqs, num_tokens] block-diagonal weight matrix times the states: one small GEMM with
        # float32 accumulation, much cheaper than a scatter-add over the rows.
        matrix = hidden.new_zeros(num_seqs, num_tokens)
        matrix[segment, token] = weights
        return matrix @ hidden

    vectors = []
    for mode in config.modes:
        if mode == "cls":
            vectors.append(hidden[starts])
        elif mode == "lasttoken":
            vectors.append(hidden[ends - 1])
        elif mode == "mean":
            vectors.append(weighted_sum(1.0 / lens.to(hidden.dtype)[segment]))
        elif mode == "mean_sqrt_len_tokens":
            vectors.append(weighted_sum(lens.to(hidden.dtype).rsqrt()[segment]))
        elif mode == "max":
            out = hidden.new_full((num_seqs, dim), float("-inf"))
            vectors.append(
                out.scatter_reduce_(0, segment.unsqueeze(1).expand(-1, dim), hidden, reduce="amax")
            )
        elif mode == "weightedmean":
            # Weight of a token = its 1-based position in the sequence.
            position = (token - starts[segment] + 1).to(hidden.dtype)
            total = (lens * (lens + 1) // 2).to(hidden.dtype)
            vectors.append(weighted_sum(position / total[segment]))
    out = vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=1)
    if config.normalize:
        out = F.normalize(out, p=2.0, dim=1)
    return out
