"""EncoderEngine: embeddings from a BERT-family encoder, many inputs per forward under a token budget.

An encoder request is a single forward pass with no decode steps, so there is nothing to schedule
across steps: embed() packs the inputs into flat, unpadded batches of at most max_num_batched_tokens
tokens, runs one forward per batch through a scratch paged KV cache (bidirectional attention through
ops.paged_attention), pools each sequence as the model's sentence-transformers config says, and
returns the vectors in input order. The engine exposes the surface the server and the LLM API use for
any engine; the generation entry points say plainly that this model serves embeddings only.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fast_inference.models.bert import BertConfig, BertEncoder
from fast_inference.models.config import resolve_dtype
from fast_inference.models.pooling import PoolingConfig, load_pooling_config, pool
from fast_inference.ops.attention_metadata import build_metadata

from .embed_batches import packed_batches
from .intake import check_embedding_inputs, resolve_truncation


def is_encoder_model(model_dir: str | os.PathLike) -> bool:
    """True when the directory holds a BERT-family encoder (served for embeddings by EncoderEngine)."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if config.get("is_decoder", False):
        return False
    if config.get("model_type") == "bert":
        return True
    archs = config.get("architectures") or []
    return any(arch.startswith("Bert") and not arch.startswith("BertLMHead") for arch in archs)


def encode_texts(
    tokenizer, texts: list[str], max_model_len: int, truncate_prompt_tokens: int | None = None
) -> list[list[int]]:
    """Encoder token ids for texts: special tokens added; truncation (when asked) keeps them, like
    sentence-transformers' own truncation at max_seq_length. -1 truncates to max_model_len."""
    k = resolve_truncation(truncate_prompt_tokens, max_model_len)
    if k is None:
        return tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=k)["input_ids"]


@dataclass(slots=True)
class EncoderModelConfig:
    """What the server and the LLM API read about the served model (the same names as LLMEngine's)."""

    model_path: str
    architecture: str
    max_model_len: int
    vocab_size: int
    hidden_size: int
    embedding_size: int  # length of the pooled vector (hidden_size x number of pooling modes)
    dtype: torch.dtype
    device: torch.device
    pooling: PoolingConfig
    eos_token_ids: set[int] = field(default_factory=set)
    # Matryoshka models (config.json, vLLM's keys) may be cut to fewer dimensions: /v1/embeddings `dimensions`.
    is_matryoshka: bool = False
    matryoshka_dimensions: list[int] | None = None


class EncoderEngine:
    """Embedding-only engine over a BERT-family model directory (optionally in sentence-transformers layout).

    Not thread-safe, like LLMEngine: one thread (the server's engine thread) calls embed / stats.
    """

    supports_generation = False

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 256,
        block_size: int = 16,
        device: str | torch.device = "cpu",
        tokenizer=None,
        prepack_weights: bool
        | None = None,  # oneDNN blocked weights + fused epilogues (default: when available)
    ) -> None:
        model_dir = Path(model)
        if not model_dir.is_dir():
            raise ValueError(f"model: {model} is not a directory")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
        bert_config = BertConfig.from_model_dir(model_dir)
        pooling = load_pooling_config(model_dir)
        limit = bert_config.max_position_embeddings
        if pooling.max_seq_length is not None:
            limit = min(limit, pooling.max_seq_length)
        if max_model_len is not None:
            if not 1 <= max_model_len <= bert_config.max_position_embeddings:
                raise ValueError(
                    f"max_model_len: {max_model_len} is outside [1, max_position_embeddings="
                    f"{bert_config.max_position_embeddings}]"
                )
            limit = max_model_len
        if max_num_batched_tokens < limit:
            raise ValueError(
                f"max_num_batched_tokens: {max_num_batched_tokens} is below max_model_len {limit}"
            )

        self.device = torch.device(device)
        # The one dtype resolver (models/config.py), except that 'auto' is float32 here: encoders are small
        # and embeddings are compared across systems.
        torch_dtype = torch.float32 if dtype == "auto" else resolve_dtype(dtype, None, self.device)
        self.model = BertEncoder.from_pretrained(model_dir, torch_dtype, self.device, prepack_weights)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer = tokenizer
        self.model_config = EncoderModelConfig(
            model_path=str(model_dir),
            architecture=bert_config.architecture,
            max_model_len=limit,
            vocab_size=bert_config.vocab_size,
            hidden_size=bert_config.hidden_size,
            embedding_size=pooling.output_dim(bert_config.hidden_size),
            dtype=torch_dtype,
            device=self.device,
            pooling=pooling,
        )
        raw_config = json.loads((model_dir / "config.json").read_text())
        dims = raw_config.get("matryoshka_dimensions")
        self.model_config.matryoshka_dimensions = [int(d) for d in dims] if dims else None
        self.model_config.is_matryoshka = bool(raw_config.get("is_matryoshka", False) or dims)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        # Scratch KV cache shared by all layers: a batch never needs more blocks than its tokens fill
        # plus one partly filled block per sequence.
        self.num_blocks = -(-max_num_batched_tokens // block_size) + max_num_seqs
        shape = (self.num_blocks, block_size, bert_config.num_attention_heads, bert_config.head_size)
        self.key_cache = torch.zeros(shape, dtype=torch_dtype, device=self.device)
        self.value_cache = torch.zeros(shape, dtype=torch_dtype, device=self.device)
        self._num_embedded = 0
        self._num_embedded_tokens = 0
        self._num_forwards = 0

    @classmethod
    def from_engine_args(cls, args) -> "EncoderEngine":
        """From the LLMEngine's EngineArgs (LLM(...) and the CLI): the options an encoder has a use for."""
        from .config import resolve_device

        kwargs = {}
        if args.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
        tokenizer = None
        if args.tokenizer is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        return cls(
            args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            block_size=args.block_size,
            device=resolve_device(args.device),
            tokenizer=tokenizer,
            **kwargs,
        )

    @property
    def num_total_blocks(self) -> int:
        return self.num_blocks

    # ---- embeddings -----------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids with the model's special tokens ([CLS] ... [SEP]), as sentence-transformers makes them."""
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def tokenize_batch(self, texts: list[str], truncate_prompt_tokens: int | None = None) -> list[list[int]]:
        """Token ids of many texts; truncate_prompt_tokens cuts each to that length, special tokens kept."""
        return encode_texts(self.tokenizer, texts, self.model_config.max_model_len, truncate_prompt_tokens)

    def embed(
        self, token_id_lists: list[list[int]], truncate_prompt_tokens: int | None = None
    ) -> torch.Tensor:
        """Pooled (and, when the model says so, normalized) embeddings: float32 [len(token_id_lists), D].
        truncate_prompt_tokens cuts long inputs, keeping a final [SEP] (see intake.check_embedding_inputs)."""
        token_id_lists = check_embedding_inputs(
            token_id_lists,
            vocab_size=self.model_config.vocab_size,
            max_model_len=self.model_config.max_model_len,
            truncate_prompt_tokens=truncate_prompt_tokens,
            end_token_id=getattr(self.tokenizer, "sep_token_id", None),
        )
        lens = [len(ids) for ids in token_id_lists]
        flat = torch.tensor([t for ids in token_id_lists for t in ids], dtype=torch.int64)
        out = torch.empty(len(lens), self.model_config.embedding_size, dtype=torch.float32)
        offset = 0  # token offset of token_id_lists[start] in flat
        for start, end in packed_batches(lens, self.max_num_batched_tokens, self.max_num_seqs):
            tokens = sum(lens[start:end])
            out[start:end] = self._forward(flat[offset : offset + tokens], lens[start:end])
            offset += tokens
        self._num_embedded += len(lens)
        self._num_embedded_tokens += offset
        return out

    def _forward(self, input_ids: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """One forward over a packed batch: int64 [sum(lens)] ids -> float32 [len(lens), D]."""
        # Each sequence gets its own run of scratch blocks, from block 0 on.
        bs = self.block_size
        tables = []
        first = 0
        for n in lens:
            num_blocks = -(-n // bs)
            tables.append(list(range(first, first + num_blocks)))
            first += num_blocks
        dev = self.device
        positions, meta = build_metadata(tables, [0] * len(lens), lens, bs, dev, causal=False)
        hidden = self.model.forward(input_ids.to(dev), positions, meta, self.key_cache, self.value_cache)
        self._num_forwards += 1
        return pool(hidden, meta.cu_query_lens.long(), self.model_config.pooling).cpu()

    # ---- the engine surface shared with LLMEngine -------------------------------------------------

    def add_request(self, *args, **kwargs):
        raise ValueError(
            f"this model serves embeddings only; {self.model_config.architecture} at "
            f"{self.model_config.model_path} cannot generate text (use /v1/embeddings or LLM.embed)"
        )

    def abort_request(self, request_id) -> None:
        """Nothing to abort: embed() finishes before it returns."""

    def has_unfinished_requests(self) -> bool:
        return False

    def step(self) -> list:
        return []

    def stats(self) -> dict:
        return {
            "num_running": 0,
            "num_waiting": 0,
            "num_free_blocks": self.num_blocks,
            "num_total_blocks": self.num_blocks,
            "kv_cache_usage": 0.0,
            "num_embedded_inputs": self._num_embedded,
            "num_embedded_tokens": self._num_embedded_tokens,
            "num_forwards": self._num_forwards,
        }
