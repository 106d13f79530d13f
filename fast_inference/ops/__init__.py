"""fast_inference.ops: typed wrappers over the torch.ops.fast_inference.* kernels (CPU and CUDA).

Every op has a pure-PyTorch reference with the same signature in fast_inference.ops.reference.
"""

import torch

import fast_inference._C  # noqa: F401  (loads the kernels and registers torch.ops.fast_inference)

from . import _fake  # noqa: F401  (fake kernels for torch.compile / opcheck)
from .attention import paged_attention
from .cache import copy_blocks, reshape_and_cache, swap_blocks
from .dense import cpu_amx, cpu_bf16_native, linear, vnni_tiles
from .norm import add_rms_norm, rms_norm, rotary_embedding, silu_and_mul
from .quant import dequantize, interleave_rows, quant_linear, quantize
from .sampling import apply_logit_bias, apply_penalties, apply_token_bitmask, compute_logprobs, sample

__all__ = [
    "add_rms_norm",
    "apply_logit_bias",
    "apply_penalties",
    "apply_token_bitmask",
    "compute_logprobs",
    "copy_blocks",
    "cpu_amx",
    "cpu_bf16_native",
    "dequantize",
    "interleave_rows",
    "linear",
    "paged_attention",
    "quant_linear",
    "quantize",
    "reshape_and_cache",
    "rms_norm",
    "rotary_embedding",
    "sample",
    "silu_and_mul",
    "swap_blocks",
    "vnni_tiles",
    "cpu_isa",
    "cuda_ops_available",
]


def cpu_isa() -> str:
    """The instruction set the CPU kernels run now: "avx512", "avx2" or "portable" (FI_CPU_ISA lowers it)."""
    return fast_inference._C.cpu_isa()


def cuda_ops_available() -> bool:
    """True when this build of the extension has CUDA kernels registered."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fast_inference::paged_attention", "CUDA")
