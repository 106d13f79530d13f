"""Python wrappers for the CPU norm and fused elementwise ops (RMSNorm, RoPE, SiLU-and-mul): one kernel each."""

import torch


def rms_norm(
    x: torch.Tensor,  # [T, H], unit stride along H
    weight: torch.Tensor,  # [H]
    eps: float,
) -> torch.Tensor:  # [T, H]
    """weight * (x * rsqrt(mean(x^2) + eps)): statistics in float32, x * rstd rounded to x's dtype before
    the weight multiply (the transformers arithmetic). CPU only."""
    return torch.ops.fast_inference.rms_norm(x, weight, float(eps))


def add_rms_norm(
    x: torch.Tensor,  # [T, H], unit stride along H
    residual: torch.Tensor,  # [T, H] contiguous; updated in place
    weight: torch.Tensor,  # [H]
    eps: float,
) -> torch.Tensor:  # [T, H]
    """residual += x (rounded to its dtype), then return rms_norm(residual, weight, eps). CPU only."""
    return torch.ops.fast_inference.add_rms_norm(x, residual, weight, float(eps))


def rotary_embedding(
    x: torch.Tensor,  # [T, H, D], unit stride along D; rotated in place
    cos: torch.Tensor,  # [T, D] contiguous: [c, c]
    sin: torch.Tensor,  # [T, D] contiguous: [-s, s]
) -> None:
    """Neox RoPE in place: x = x * cos + roll(x, D/2) * sin, rounded like those three torch ops. CPU only."""
    torch.ops.fast_inference.rotary_embedding(x, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] = [gate | up] -> [T, I]
    """silu(gate) * up, rounded like the two torch ops (silu then mul). CPU only."""
    return torch.ops.fast_inference.silu_and_mul(x)
