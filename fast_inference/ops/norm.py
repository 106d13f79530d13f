"""Python wrappers for the RMSNorm ops (CPU): one kernel per norm instead of torch's chain of small ops."""

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
