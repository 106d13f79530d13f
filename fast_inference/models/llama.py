"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache: fused QKV and gate/up."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from fast_inference import ops
from fast_inference.ops.attention_metadata import AttentionMetadata

from .config import ModelConfig


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised: every parameter is overwritten by the checkpoint loader, which checks none is missed.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight multiply (as Hugging Face does)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = _param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


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


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE from a precomputed float32 cos/sin table indexed by absolute position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos().to(cfg.device), persistent=False)  # [max_pos, head_dim // 2]
        self.register_buffer("sin", freqs.sin().to(cfg.device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D], k: [T, KV, D], positions: int64 [T]
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dt, dev = cfg.dtype, cfg.device
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj_weight = _param(self.q_size + 2 * self.kv_size, cfg.hidden_size, dtype=dt, device=dev)
        self.qkv_proj_bias = (
            _param(self.q_size + 2 * self.kv_size, dtype=dt, device=dev) if cfg.attention_bias else None
        )
        self.o_proj_weight = _param(cfg.hidden_size, self.q_size, dtype=dt, device=dev)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt, dev) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt, dev) if cfg.qk_norm else None
        # Bound by the model runner once the cache is allocated: [num_blocks, block_size, num_kv_heads, head_dim]
        self.key_cache = torch.empty(0)
        self.value_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = F.linear(x, self.qkv_proj_weight, self.qkv_proj_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim).contiguous()
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = rope(positions, q, k)
        ops.reshape_and_cache(k, v, self.key_cache, self.value_cache, meta.slot_mapping)
        out = ops.paged_attention(q, self.key_cache, self.value_cache, meta.block_tables, meta.seq_lens,
                                  meta.cu_query_lens, self.scale, causal=meta.causal)
        return F.linear(out.view(tokens, self.q_size), self.o_proj_weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj_weight = _param(2 * cfg.intermediate_size, cfg.hidden_size, dtype=cfg.dtype,
                                          device=cfg.device)
        self.down_proj_weight = _param(cfg.hidden_size, cfg.intermediate_size, dtype=cfg.dtype, device=cfg.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj_weight).split(self.intermediate, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj_weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, cfg.device)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, cfg.device)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, rope, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    """Serves LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (qkv bias), Qwen3ForCausalLM (q/k norm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, device=cfg.device)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, cfg.device)
        self.rope = RotaryEmbedding(cfg)
        self.lm_head = (
            self.embed_tokens if cfg.tie_word_embeddings
            else _param(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, device=cfg.device)
        )

    def bind_kv_cache(self, key_caches: list[torch.Tensor], value_caches: list[torch.Tensor]) -> None:
        for layer, kc, vc in zip(self.layers, key_caches, value_caches, strict=True):
            layer.self_attn.key_cache = kc
            layer.self_attn.value_cache = vc

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: int64 [num_tokens] (all sequences flattened) -> final hidden [num_tokens, hidden]."""
        h = F.embedding(input_ids, self.embed_tokens)
        for layer in self.layers:
            h = layer(h, positions, self.rope, meta)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> float32 logits [B, vocab]."""
        return F.linear(hidden, self.lm_head).float()
