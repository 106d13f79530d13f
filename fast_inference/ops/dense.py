"""Python wrapper for the dense projection op (a weight-streaming bf16 kernel for decode-sized batches on CPU)."""

import torch


def linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N]
    """x W^T + b. On an AVX-512 BF16 CPU, bf16 with M <= 4 reads each weight row once at close to the
    memory bandwidth (batch-1 decode is bound by it); every other case is torch's own linear."""
    return torch.ops.fast_inference.linear(x, weight, bias)
