"""Benchmark of ops.linear (our CPU GEMV / blocked GEMM / VNNI tiles) against torch's F.linear, bf16 and f32 weights.

Usage: python bench/bench_linear.py [--rows 1,4,32,512] [--shapes smollm2,1.5b] [--iters 10]

Per (shape, M, dtype): median time, weight GB/s, % of bench.common's streaming-read bandwidth measured
in the same run, the ratio to F.linear in the same dtype and to ops.linear with f32 weights. On a CPU with
native bf16 (ops.cpu_bf16_native(): AVX512_BF16, or AMX) a third row, dtype "bfloat16_vnni_tiles":
ops.linear on ops.vnni_tiles(w), the layout the engine runs there (shapes with N % 16 == 0 and
K % 32 == 0), also against oneDNN's GEMM on its own prepacked weight (what the engine ran before).
FI_CPU_ISA=avx2 forces our AVX2 kernels. F.linear still uses this CPU's full ISA unless oneDNN and ATen
are lowered too (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2): set both for the AVX2-only baseline.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, environment, median_time, streaming_read_bandwidth  # noqa: E402
from fast_inference import ops  # noqa: E402

# (name, out_features N, in_features K)
SHAPES = {
    "smollm2": [("smollm2_up", 1536, 576), ("smollm2_down", 576, 1536), ("smollm2_lm_head", 49152, 576)],
    "1.5b": [("qwen2_1.5b_up", 8960, 1536)],
}


def time_linear(fn, x: torch.Tensor, w: torch.Tensor, iters: int) -> float:
    return median_time(lambda: fn(x, w), torch.device("cpu"), iters=iters, min_seconds=0.3)


def run(name: str, n: int, k: int, m: int, bandwidth: float, iters: int) -> None:
    g = torch.Generator().manual_seed(n + k + m)
    w32 = torch.randn(n, k, generator=g) / k**0.5
    x32 = torch.randn(m, k, generator=g)
    w16, x16 = w32.bfloat16(), x32.bfloat16()
    t_op16 = time_linear(ops.linear, x16, w16, iters)
    t_torch16 = time_linear(F.linear, x16, w16, iters)
    t_op32 = time_linear(ops.linear, x32, w32, iters)
    t_torch32 = time_linear(F.linear, x32, w32, iters)
    err = (ops.linear(x16, w16).float() - F.linear(x32, w32)).abs().max().item()
    rows = [("bfloat16", t_op16, t_torch16, w16), ("float32", t_op32, t_torch32, w32)]
    t_prepacked = None
    if ops.cpu_bf16_native() and n % 16 == 0 and k % 32 == 0:
        rows.append(
            ("bfloat16_vnni_tiles", time_linear(ops.linear, x16, ops.vnni_tiles(w16), iters), t_torch16, w16)
        )
        packed = torch.ops.mkldnn._reorder_linear_weight(w16, m)
        t_prepacked = time_linear(
            lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), x16, packed, iters
        )
    for dtype, t_op, t_torch, w in rows:
        nbytes = w.numel() * w.element_size()
        emit(
            {
                "bench": "linear",
                **environment(torch.device("cpu")),
                "isa": ops.cpu_isa(),
                "shape": name,
                "M": m,
                "N": n,
                "K": k,
                "dtype": dtype,
                "median_ms": round(t_op * 1e3, 4),
                "torch_ms": round(t_torch * 1e3, 4),
                "weight_gb_per_s": round(nbytes / t_op / 1e9, 2),
                "pct_of_bandwidth": round(100 * nbytes / t_op / bandwidth, 1),
                "speedup_vs_torch_same_dtype": round(t_torch / t_op, 3),
                "speedup_vs_ops_f32": round(t_op32 / t_op, 3),
                "bf16_max_abs_err_vs_f32": err if dtype == "bfloat16" else 0.0,
            }
            | (
                {"speedup_vs_onednn_prepacked": round(t_prepacked / t_op, 3)}
                if dtype == "bfloat16_vnni_tiles"
                else {}
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1,4,32,512", help="comma-separated M values")
    parser.add_argument("--shapes", default="smollm2,1.5b", help=f"comma-separated from {list(SHAPES)}")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    bandwidth = streaming_read_bandwidth(torch.device("cpu"))
    emit({"bench": "bandwidth", "isa": ops.cpu_isa(), "bandwidth_gb_per_s": round(bandwidth / 1e9, 2)})
    for group in args.shapes.split(","):
        for name, n, k in SHAPES[group]:
            for m in rows:
                run(name, n, k, m, bandwidth, args.iters)


if __name__ == "__main__":
    main()
