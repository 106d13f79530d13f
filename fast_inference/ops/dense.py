"""The dense projection op (own CPU GEMV / blocked-GEMM kernels for bf16 and f32) and the one CPU bf16 gate."""

import torch

import fast_inference._C

# ops.linear's GEMV (weight rows streamed once for all rows of x) covers up to this many rows.
GEMV_MAX_ROWS = 8


def cpu_bf16_native() -> bool:
    """The capability gate of the CPU bfloat16 paths that need native bf16 (encoders' oneDNN GEMM).

    True when the CPU computes bf16 natively (AVX512_BF16, what our AVX-512 kernels and oneDNN's fast
    bf16 GEMM need): bf16 encoders may then use oneDNN's prepacked GEMM. False on AVX2-only CPUs
    (Zen 1/2/3, Haswell..Skylake client), and whenever FI_CPU_ISA=avx2|portable lowers our kernels (how
    tests and benchmarks emulate such a CPU): then every bf16 projection runs ops.linear's own kernels,
    and nothing calls oneDNN's bf16 weight reorder, which raises on those CPUs."""
    return fast_inference._C.cpu_isa() == "avx512" and torch.cpu._is_avx512_bf16_supported()


def cpu_amx() -> bool:
    """True when bf16 projections on VNNI tiles (vnni_tiles) run on AMX now: a Sapphire Rapids or later CPU
    that grants the tile state, and FI_CPU_ISA unset or "amx" (any other value turns AMX off)."""
    return fast_inference._C.cpu_amx()


def vnni_tiles(weight: torch.Tensor) -> torch.Tensor:  # bf16 [N, K] -> [N / 16, K / 32, 512]
    """The layout ops.linear's native-bf16 paths read (AMX, AVX512_BF16): tile (j, t) = rows 16j.., columns
    32t.. of the weight as 16 k-pairs x 16 rows x 2 (the B operand of AMX's bf16 tile multiply, and of
    vdpbf16ps per k-pair). Needs N % 16 == 0, K % 32 == 0."""
    n, k = weight.shape
    if weight.dtype != torch.bfloat16 or n % 16 or k % 32:
        raise ValueError(
            f"weight must be bf16 [N, K] with N % 16 == 0 and K % 32 == 0, got {weight.dtype} {[n, k]}"
        )
    return (
        weight.view(n // 16, 16, k // 32, 16, 2)
        .permute(0, 2, 3, 1, 4)
        .contiguous()
        .view(n // 16, k // 32, 512)
    )


def linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K], or bf16 VNNI tiles [N / 16, K / 32, 512] (vnni_tiles)
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N]
    """x W^T + b. CPU: bf16 or f32 weights with M <= GEMV_MAX_ROWS stream each weight row once, widened
    to f32 in registers (AVX2+FMA, or AVX512_BF16 dot products); bf16 with more rows runs a blocked GEMM
    (weight slabs widened to f32 in cache + torch's f32 GEMM) unless cpu_bf16_native(), where torch's own
    bf16 GEMM is the fast one. Tiles, every M: AMX when cpu_amx(), AVX512_BF16 register tiles when
    cpu_bf16_native(), AVX2 FMA register tiles (above 128 rows widened tile slabs + torch's f32 GEMM), and
    the row paths on the untiled weight in the portable build. Other cases and CUDA: torch's linear."""
    return torch.ops.fast_inference.linear(x, weight, bias)
