"""Benchmark of paged_attention: time, K/V GB/s, % of the measured bandwidth, ratio to gather + SDPA.

Usage: python bench/bench_paged_attention.py [--device cpu|cuda] [--dtype bfloat16] [--cases decode,...]

The baseline gathers each sequence's K/V contiguously out of the paged cache and runs torch's
scaled_dot_product_attention (GQA via enable_gqa). The hardware limit is bench.common's bandwidth,
measured in the same run: a streaming read on CPU, a device-to-device copy on CUDA.
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, environment, median_time, streaming_read_bandwidth  # noqa: E402
from fast_inference import ops  # noqa: E402


@dataclass(slots=True)
class Case:
    name: str
    batch: int
    context: int
    query_len: int  # query tokens per sequence: 1 = decode, == context = prefill, else chunked prefill
    num_heads: int = 32
    num_kv_heads: int = 8
    head_size: int = 128
    block_size: int = 16


CPU_CASES = {
    "decode": Case("decode", batch=16, context=2048, query_len=1),  # the acceptance shape
    "decode_small_batch": Case("decode_small_batch", batch=1, context=4096, query_len=1),
    "decode_mqa": Case("decode_mqa", batch=8, context=1024, query_len=1, num_kv_heads=1),
    # A serving step of SmolLM2-135M (9 / 3 heads, d 64) at concurrency 32 with short chats.
    "decode_short": Case(
        "decode_short", batch=32, context=192, query_len=1, num_heads=9, num_kv_heads=3, head_size=64
    ),
    "prefill": Case("prefill", batch=1, context=512, query_len=512),
    "chunked_prefill": Case("chunked_prefill", batch=2, context=1024, query_len=128),
}
CUDA_CASES = {
    "decode": Case("decode", batch=64, context=4096, query_len=1),  # the acceptance shape
    "decode_small_batch": Case("decode_small_batch", batch=4, context=8192, query_len=1),
    "prefill": Case("prefill", batch=4, context=2048, query_len=2048),
    "chunked_prefill": Case("chunked_prefill", batch=8, context=4096, query_len=512),
}


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = (case.context + case.block_size - 1) // case.block_size
    num_blocks = case.batch * blocks_per_seq
    shape = (num_blocks, case.block_size, case.num_kv_heads, case.head_size)
    key_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    value_cache = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
    # Shuffled blocks, as a block manager hands them out after some churn.
    block_tables = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(case.batch, blocks_per_seq)
    seq_lens = torch.full((case.batch,), case.context, dtype=torch.int32)
    cu = torch.arange(case.batch + 1, dtype=torch.int32) * case.query_len
    query = torch.randn(case.batch * case.query_len, case.num_heads, case.head_size, generator=gen)
    return (
        query.to(dtype=dtype, device=device),
        key_cache,
        value_cache,
        block_tables.to(device),
        seq_lens.to(device),
        cu.to(device),
    )


def gather_sdpa(query, key_cache, value_cache, block_tables, case: Case, scale: float) -> torch.Tensor:
    """The baseline: gather every sequence's K/V contiguously, then one batched SDPA call."""
    b, q_len, ctx = case.batch, case.query_len, case.context
    k = key_cache[block_tables.long()].flatten(1, 2)[:, :ctx]  # [B, ctx, kv_heads, D]
    v = value_cache[block_tables.long()].flatten(1, 2)[:, :ctx]
    q = query.view(b, q_len, case.num_heads, case.head_size).transpose(1, 2)  # [B, H, q_len, D]
    if q_len == 1:
        mask = None
    else:  # query j sits at position ctx - q_len + j
        pos = torch.arange(ctx, device=query.device)
        q_pos = ctx - q_len + torch.arange(q_len, device=query.device)
        mask = pos[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(
        q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(b * q_len, case.num_heads, case.head_size)


def run_case(case: Case, dtype: torch.dtype, device: torch.device, bandwidth: float, iters: int) -> None:
    query, key_cache, value_cache, block_tables, seq_lens, cu = make_inputs(case, dtype, device)
    scale = case.head_size**-0.5
    out = torch.empty_like(query)

    def kernel():
        ops.paged_attention(
            query, key_cache, value_cache, block_tables, seq_lens, cu, scale, causal=True, out=out
        )

    def baseline():
        return gather_sdpa(query, key_cache, value_cache, block_tables, case, scale)

    kernel()
    expected = baseline()
    max_error = (out.float() - expected.float()).abs().max().item()
    t_kernel = median_time(kernel, device, iters=iters, min_seconds=0.5)
    t_base = median_time(baseline, device, iters=max(3, iters // 2), min_seconds=0.5)
    kv_bytes = 2 * case.batch * case.context * case.num_kv_heads * case.head_size * key_cache.element_size()
    gbps = kv_bytes / t_kernel / 1e9
    record = {
        "bench": "paged_attention",
        **environment(device),
        "case": case.name,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": case.batch,
        "context": case.context,
        "query_len": case.query_len,
        "num_heads": case.num_heads,
        "num_kv_heads": case.num_kv_heads,
        "head_size": case.head_size,
        "block_size": case.block_size,
        "median_ms": round(t_kernel * 1e3, 4),
        "baseline_ms": round(t_base * 1e3, 4),
        "speedup_vs_baseline": round(t_base / t_kernel, 3),
        "kv_gb_per_s": round(gbps, 2),
        "bandwidth_gb_per_s": round(bandwidth / 1e9, 2),
        "pct_of_bandwidth": round(100 * kv_bytes / t_kernel / bandwidth, 1),
        "max_abs_err_vs_baseline": max_error,
    }
    emit(record)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--cases", default=None, help="comma-separated case names (default: all for the device)"
    )
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    cases = CUDA_CASES if device.type == "cuda" else CPU_CASES
    names = args.cases.split(",") if args.cases else list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(cases)}")
    bandwidth = streaming_read_bandwidth(device)
    emit({"bench": "bandwidth", **environment(device), "bandwidth_gb_per_s": round(bandwidth / 1e9, 2)})
    for name in names:
        run_case(cases[name], getattr(torch, args.dtype), device, bandwidth, args.iters)


if __name__ == "__main__":
    main()
