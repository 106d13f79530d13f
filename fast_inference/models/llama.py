"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache: fused QKV and gate/up."""

import math
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fast_inference import ops
from fast_inference.ops.attention_metadata import AttentionMetadata

from .config import ModelConfig
from .hugepages import move_to_huge_pages


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised: every parameter is overwritten by the checkpoint loader, which checks none is missed.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class _DirectCall(nn.Module):
    """A module whose call goes straight to forward. The model registers no hooks, and nn.Module.__call__'s
    hook bookkeeping costs ~2 us per call: a batch-1 decode step makes ~270 module calls."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


def _tiles_fit(weight: torch.Tensor) -> bool:
    """A CPU bf16 weight [N, K] that ops.linear runs as VNNI tiles for every M, one copy: on AMX, AVX512_BF16
    (1.1-1.6x oneDNN's prepacked GEMM at M = 8..32, parity at 512, the GEMV's speed at M = 1) and AVX2 + FMA
    (1.1-1.9x the row layout's blocked GEMM at M = 4..128, its GEMV's speed at M = 1); measured on an AMD
    EPYC Zen 4, the AVX2 figures with the kernels and torch lowered to AVX2."""
    if weight.dim() != 2:
        return False  # tiled already
    n, k = weight.shape
    return (
        ops.cpu_isa() != "portable"
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and not (n % 16 or k % 32)
    )


def _rows_of_tiles(tiles: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the weight that VNNI tiles [N / 16, K / 32, 512] hold (ops.vnni_tiles) -> [len(ids), K]."""
    blocks, k_tiles, _ = tiles.shape
    per_column = tiles.view(blocks, k_tiles, 16, 16, 2)  # [block, k-tile, k-pair, column, pair element]
    return per_column[ids // 16, :, :, ids % 16].reshape(ids.shape[0], k_tiles * 32)


class Linear(_DirectCall):
    """y = x W^T (+ b). On CPU, after prepack(): inputs of at most `op_rows` rows go through ops.linear
    (our kernels: a weight-streaming GEMV for decode batches, for bf16 a blocked GEMM above); f32 above the
    GEMV size is F.linear. With AVX2 or better a bf16 weight becomes VNNI tiles (ops.vnni_tiles), one copy
    that ops.linear runs for every M; a bf16 weight whose shape does not tile (N % 16, K % 32) goes through
    ops.linear for every M in its row layout."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None
        self.op_rows = 0  # inputs with at most this many rows use ops.linear

    def prepack(self) -> None:
        if self.weight.device.type != "cpu":
            return
        if self.weight.dtype == torch.float32:
            self.op_rows = ops.dense.GEMV_MAX_ROWS
            return
        if self.weight.dtype != torch.bfloat16 or self.weight.dim() != 2:
            return  # not bf16, or tiled already
        if _tiles_fit(self.weight):
            self.weight = nn.Parameter(ops.vnni_tiles(self.weight.data), requires_grad=False)
        self.op_rows = sys.maxsize  # our kernels for every size, one weight copy

    def projection(self) -> torch.ScriptObject:
        """This module's forward as a C++ fast_inference.Projection (for DecoderStack), over the same tensors."""
        return torch.classes.fast_inference.Projection([self.weight], [-1], self.bias, self.op_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.op_rows:
            return ops.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(_DirectCall):
    """RMSNorm, optionally fused with the residual add before it (residual += x, then norm the sum).

    float32: exactly the transformers arithmetic (bit-exact outputs). bf16/fp16 on CPU: the one-pass
    ops.rms_norm / ops.add_rms_norm kernels (same rounding points; torch's fused norm is ~8 ops, and a
    batch-1 decode step runs 61 norms). Elsewhere torch's fused norm."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = _param(size, dtype=dtype, device=device)
        self.eps = eps
        self.use_op = device.type == "cpu" and dtype != torch.float32

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> norm(x); with residual [T, H] -> (norm(residual + x), residual + x)."""
        if self.use_op and x.dim() == 2:
            if residual is None:
                return ops.rms_norm(x, self.weight, self.eps)
            return ops.add_rms_norm(x, residual, self.weight, self.eps), residual  # residual updated in place
        if residual is not None:
            residual = residual + x
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op (f32 inside)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] for the default, linear and llama3 RoPE variants."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    factor = float(scaling.get("factor", 1.0))
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_len / low
        high_freq_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(_DirectCall):
    """Neox-style RoPE from precomputed float32 tables indexed by absolute position.

    The tables are full head width: cos = [c, c] and a signed sin = [-s, s], so that rotating is
    x * cos + roll(x, D/2) * sin: four ops per call instead of seven, and bit-identical to transformers'
    x * cos + rotate_half(x) * sin (negating s and swapping the halves are exact)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # Positions stay below max_model_len (the scheduler enforces it): a table for the model's whole
        # max_position_embeddings (8192 x 64 x 2 floats for SmolLM2) would be resident for nothing.
        freqs = torch.outer(torch.arange(cfg.max_model_len, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer(
            "cos", torch.cat((cos, cos), -1).to(cfg.device), persistent=False
        )  # [max_model_len, D]
        self.register_buffer("sin", torch.cat((-sin, sin), -1).to(cfg.device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [T, head_dim] for the step's positions (int64 [T]), looked up once per forward."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # roll by half the head width swaps the halves: [x2, x1]; the signed sin supplies the minus.
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin


# make_linear(name, in_features, out_features, bias) -> a module computing x W^T (+ b). The default builds
# Linear; a quantized checkpoint's loader passes one that builds its weights in their block format.
LinearFactory = Callable[[str, int, int, bool], nn.Module]


def dense_linear_factory(cfg: ModelConfig) -> LinearFactory:
    return lambda name, in_features, out_features, bias: Linear(
        in_features, out_features, bias, cfg.dtype, cfg.device
    )


class Attention(_DirectCall):
    def __init__(self, cfg: ModelConfig, prefix: str, make_linear: LinearFactory):
        super().__init__()
        dt, dev = cfg.dtype, cfg.device
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = make_linear(
            f"{prefix}.qkv_proj", cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias
        )
        self.o_proj = make_linear(f"{prefix}.o_proj", self.q_size, cfg.hidden_size, False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt, dev) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt, dev) if cfg.qk_norm else None
        # bf16/fp16 on CPU: RoPE as one kernel (float32 keeps the torch ops, bit-exact with transformers).
        self.fused_rope = dev.type == "cpu" and dt != torch.float32
        # Bound by the model runner once the cache is allocated: [num_blocks, block_size, num_kv_heads, head_dim]
        self.key_cache = torch.empty(0)
        self.value_cache = torch.empty(0)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        tokens = x.shape[0]
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        cos, sin = rope
        if self.fused_rope and self.q_norm is None:
            # One in-place op on the q and k heads of the fused projection; q, k, v stay views of qkv
            # (the ops accept strided rows): as few ops as possible, a decode step runs this 30 times.
            qkv_heads = qkv.view(tokens, heads + 2 * kv_heads, d)
            ops.rotary_embedding(qkv_heads[:, : heads + kv_heads], cos, sin)
            q = qkv_heads[:, :heads]
            k = qkv_heads[:, heads : heads + kv_heads]
            v = qkv_heads[:, heads + kv_heads :]
        else:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
            if self.q_norm is None:
                # q and k rotated together: one pass over [T, heads + kv_heads, D].
                qk = _rotate(qkv[:, : self.q_size + self.kv_size].view(tokens, heads + kv_heads, d), cos, sin)
                q, k = qk[:, :heads], qk[:, heads:]
            else:
                q, k = qkv[:, : self.q_size], qkv[:, self.q_size : self.q_size + self.kv_size]
                q = _rotate(self.q_norm(q.view(tokens, heads, d)), cos, sin)
                k = _rotate(self.k_norm(k.view(tokens, kv_heads, d)), cos, sin)
            v = qkv[:, self.q_size + self.kv_size :].view(tokens, kv_heads, d)
        ops.reshape_and_cache(k, v, self.key_cache, self.value_cache, meta.slot_mapping)
        out = ops.paged_attention(
            q,
            self.key_cache,
            self.value_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.cu_query_lens,
            self.scale,
            causal=meta.causal,
        )
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(_DirectCall):
    def __init__(self, cfg: ModelConfig, prefix: str, make_linear: LinearFactory):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = make_linear(
            f"{prefix}.gate_up_proj", cfg.hidden_size, 2 * cfg.intermediate_size, False
        )
        self.down_proj = make_linear(f"{prefix}.down_proj", cfg.intermediate_size, cfg.hidden_size, False)
        # bf16/fp16 on CPU: silu(gate) * up as one kernel (float32 keeps the torch ops, bit-exact).
        self.fused_act = cfg.device.type == "cpu" and cfg.dtype != torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused_act:
            return self.down_proj(ops.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(_DirectCall):
    def __init__(self, cfg: ModelConfig, prefix: str, make_linear: LinearFactory):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, cfg.device)
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", make_linear)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, cfg.device)
        self.mlp = MLP(cfg, f"{prefix}.mlp", make_linear)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (h, residual): each residual add is fused into the norm that follows it, and
        the MLP output's add into the next layer's input norm (None: h is the embedding, first layer)."""
        if residual is None:
            residual = h.clone()  # updated in place by the fused norms; the embedding output stays intact
            h = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, rope, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Serves LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (qkv bias), Qwen3ForCausalLM (q/k norm)."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory | None = None):
        """make_linear: None builds plain weights; a quantized loader's factory also builds the token
        embedding ("embed_tokens": a module with embed(ids)) and the head ("lm_head")."""
        super().__init__()
        self.config = cfg
        factory = make_linear or dense_linear_factory(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, f"layers.{i}", factory) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, cfg.device)
        self.rope = RotaryEmbedding(cfg)
        if make_linear is not None:
            self.embedding = make_linear("embed_tokens", cfg.hidden_size, cfg.vocab_size, False)
            tied = cfg.tie_word_embeddings
            self.head = (
                self.embedding if tied else make_linear("lm_head", cfg.hidden_size, cfg.vocab_size, False)
            )
            return
        # Instance attributes (a class-level None would shadow nn.Module's submodule lookup).
        self.embedding: nn.Module | None = None  # a factory's table module, else embed_tokens is the table
        self.head: nn.Module | None = None  # a factory's head module, else lm_head is the weight
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, device=cfg.device)
        self.lm_head = (
            self.embed_tokens
            if cfg.tie_word_embeddings
            else _param(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, device=cfg.device)
        )

    lm_head_tiles: torch.Tensor | None = None  # CPU bf16 with AVX2 or better: the head as VNNI tiles
    weight_bytes: int = 0  # bytes of the checkpoint weights as loaded (each read once per decode step)
    # On CPU after prepack(): the layers as one C++ fast_inference.DecoderStack (csrc/cpu/decoder_stack.cpp),
    # the same ops without ~450 Python calls per step; None runs the Python layers (CUDA, tensor parallel).
    layer_stack: torch.ScriptObject | None = None
    # On CPU with a quantized head: the head as a C++ Projection run one decode-GEMV row group at a time, so each
    # sampled row's logits are computed the same whatever the batch (see Projection::forward).
    head_projection: torch.ScriptObject | None = None

    def prepack(self) -> None:
        """After loading: re-lay out the layer weights for the device's fastest GEMM (CPU bf16: VNNI tiles with
        AVX2 or better, one copy), and on CPU build the layer stack."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack()
        if self.head is None:
            self._prepack_dense_head()
        self.layer_stack = self._build_layer_stack()
        quantized_head = self.head is not None and hasattr(self.head, "projection")
        self.head_projection = (
            self.head.projection() if quantized_head and self.layer_stack is not None else None
        )

    def _build_layer_stack(self) -> torch.ScriptObject | None:
        cfg = self.config
        projections = [
            (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            for layer in self.layers
        ]
        own = all(hasattr(p, "projection") for group in projections for p in group)  # not tensor-parallel
        if self.norm.weight.device.type != "cpu" or not own:
            return None
        stack = torch.classes.fast_inference.DecoderStack(
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.rms_norm_eps,
            self.layers[0].self_attn.scale,
        )
        for layer, group in zip(self.layers, projections, strict=True):
            attn = layer.self_attn
            stack.add_layer(
                layer.input_layernorm.weight,
                layer.post_attention_layernorm.weight,
                None if attn.q_norm is None else attn.q_norm.weight,
                None if attn.k_norm is None else attn.k_norm.weight,
                *(p.projection() for p in group),
            )
        if self.layers[0].self_attn.key_cache.numel():  # prepacked again after the cache was bound
            attns = [layer.self_attn for layer in self.layers]
            stack.bind_kv_cache([a.key_cache for a in attns], [a.value_cache for a in attns])
        return stack

    def _prepack_dense_head(self) -> None:
        cpu_bf16 = self.lm_head.device.type == "cpu" and self.lm_head.dtype == torch.bfloat16
        if _tiles_fit(self.lm_head):
            # One copy: the head's rows go, and a tied table's lookups gather from the tiles (_rows_of_tiles).
            self.lm_head_tiles = ops.vnni_tiles(self.lm_head.data)
            self.lm_head.data = self.lm_head.data.new_empty(0)
        # The weights the batch-1 kernel streams every decode step move onto huge pages (see hugepages.py).
        streamed = [
            m.weight
            for m in self.modules()
            if isinstance(m, Linear) and m.op_rows and m.weight.numel() and m.weight.dtype == torch.bfloat16
        ]
        if streamed and cpu_bf16:
            # The head the step streams too: its tiles, or the embedding's Parameter itself (tied, so lookups follow).
            tiled_head = self.lm_head_tiles is not None
            head = self.lm_head_tiles if tiled_head else self.lm_head.data
            *moved, moved_head = move_to_huge_pages([p.data for p in streamed] + [head])
            for param, tensor in zip(streamed, moved, strict=True):
                param.data = tensor
            if tiled_head:
                self.lm_head_tiles = moved_head
            else:
                self.lm_head.data = moved_head

    def bind_kv_cache(self, key_caches: list[torch.Tensor], value_caches: list[torch.Tensor]) -> None:
        for layer, kc, vc in zip(self.layers, key_caches, value_caches, strict=True):
            layer.self_attn.key_cache = kc
            layer.self_attn.value_cache = vc
        if self.layer_stack is not None:
            self.layer_stack.bind_kv_cache(key_caches, value_caches)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions: int64 [num_tokens] (all sequences flattened) -> final hidden [num_tokens, hidden]."""
        if self.embedding is not None:
            h = self.embedding.embed(input_ids)
        elif self.embed_tokens.numel() == 0:  # tied, and its one copy is the head's tiles
            h = _rows_of_tiles(self.lm_head_tiles, input_ids)
        else:
            h = F.embedding(input_ids, self.embed_tokens)
        rope = self.rope(positions, h.dtype)
        if self.layer_stack is not None:
            h, residual = self.layer_stack.forward(
                h, *rope, meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.cu_query_lens, meta.causal
            )
            return self.norm(h, residual)[0]
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, rope, meta)
        return self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> float32 logits [B, vocab]."""
        if self.head_projection is not None:
            return self.head_projection.forward(hidden, hidden.shape[0]).float()  # every row by the GEMV
        if self.head is not None:
            return self.head(hidden).float()
        on_cpu = hidden.device.type == "cpu"
        if on_cpu and self.lm_head_tiles is not None:
            return ops.linear(hidden, self.lm_head_tiles).float()
        if on_cpu and hidden.dtype == torch.bfloat16:
            return ops.linear(hidden, self.lm_head).float()
        if on_cpu and hidden.dtype == torch.float32 and hidden.shape[0] <= ops.dense.GEMV_MAX_ROWS:
            return ops.linear(hidden, self.lm_head).float()
        return F.linear(hidden, self.lm_head).float()
