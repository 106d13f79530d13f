"""Benchmark of the KV-cache ops: time, GB/s moved, % of the measured bandwidth, ratio to a torch baseline.

Usage: python bench/bench_cache_ops.py [--device cpu|cuda] [--dtype bfloat16]

Bytes moved count what is read plus what is written. Baselines: index_copy_ into the flattened
cache (reshape_and_cache), index_select + index_copy_ per cache (copy_blocks, swap_blocks). On CUDA,
swap_blocks copies GPU -> pinned CPU memory.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, environment, median_time, streaming_read_bandwidth  # noqa: E402
from fast_inference import ops  # noqa: E402

BLOCK_SIZE, KV_HEADS, HEAD_SIZE = 16, 8, 128


def record(
    name: str, device: torch.device, bandwidth: float, nbytes: int, t: float, t_base: float, shape: dict
) -> None:
    emit(
        {
            "bench": name,
            **environment(device),
            **shape,
            "median_ms": round(t * 1e3, 4),
            "baseline_ms": round(t_base * 1e3, 4),
            "speedup_vs_baseline": round(t_base / t, 3),
            "gb_per_s": round(nbytes / t / 1e9, 2),
            "bandwidth_gb_per_s": round(bandwidth / 1e9, 2),
            "pct_of_bandwidth": round(100 * nbytes / t / bandwidth, 1),
        }
    )


def bench_reshape_and_cache(device, dtype, bandwidth, num_tokens: int, num_blocks: int) -> None:
    key = torch.randn(num_tokens, KV_HEADS, HEAD_SIZE, device=device).to(dtype)
    value = torch.randn_like(key)
    key_cache = torch.zeros(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_SIZE, device=device, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:num_tokens]

    def kernel():
        ops.reshape_and_cache(key, value, key_cache, value_cache, slots)

    def baseline():
        key_cache.view(-1, KV_HEADS, HEAD_SIZE).index_copy_(0, slots, key)
        value_cache.view(-1, KV_HEADS, HEAD_SIZE).index_copy_(0, slots, value)

    nbytes = 2 * 2 * key.numel() * key.element_size()  # read key+value, write both into the caches
    t, t_base = median_time(kernel, device, min_seconds=0.3), median_time(baseline, device, min_seconds=0.3)
    record(
        "reshape_and_cache",
        device,
        bandwidth,
        nbytes,
        t,
        t_base,
        {
            "dtype": str(dtype).removeprefix("torch."),
            "num_tokens": num_tokens,
            "num_kv_heads": KV_HEADS,
            "head_size": HEAD_SIZE,
            "block_size": BLOCK_SIZE,
        },
    )


def bench_copy_blocks(device, dtype, bandwidth, num_layers: int, num_blocks: int, num_pairs: int) -> None:
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
    key_caches = [torch.randn(shape, device=device).to(dtype) for _ in range(num_layers)]
    value_caches = [torch.randn(shape, device=device).to(dtype) for _ in range(num_layers)]
    ids = torch.randperm(num_blocks, device=device)[: 2 * num_pairs]
    mapping = ids.view(num_pairs, 2).contiguous()
    src, dst = mapping[:, 0].contiguous(), mapping[:, 1].contiguous()

    def kernel():
        ops.copy_blocks(key_caches, value_caches, mapping)

    def baseline():
        for cache in (*key_caches, *value_caches):
            cache.index_copy_(0, dst, cache.index_select(0, src))

    block_bytes = key_caches[0][0].numel() * key_caches[0].element_size()
    nbytes = 2 * 2 * num_layers * num_pairs * block_bytes  # key+value caches, read + write
    t, t_base = median_time(kernel, device, min_seconds=0.3), median_time(baseline, device, min_seconds=0.3)
    record(
        "copy_blocks",
        device,
        bandwidth,
        nbytes,
        t,
        t_base,
        {
            "dtype": str(dtype).removeprefix("torch."),
            "num_layers": num_layers,
            "num_pairs": num_pairs,
            "block_bytes": block_bytes,
        },
    )


def bench_swap_blocks(device, dtype, bandwidth, num_blocks: int, num_pairs: int) -> None:
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
    src = torch.randn(shape, device=device).to(dtype)
    # On CUDA the swap goes to pinned host memory, as a preempted sequence's blocks do.
    dst = torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")
    mapping = torch.stack(
        [torch.randperm(num_blocks)[:num_pairs], torch.randperm(num_blocks)[:num_pairs]], dim=1
    )
    src_ids, dst_ids = mapping[:, 0].to(device), mapping[:, 1]

    def kernel():
        ops.swap_blocks(src, dst, mapping)

    def baseline():
        dst.index_copy_(0, dst_ids, src.index_select(0, src_ids).to(dst.device))

    block_bytes = src[0].numel() * src.element_size()
    nbytes = 2 * num_pairs * block_bytes
    t, t_base = median_time(kernel, device, min_seconds=0.3), median_time(baseline, device, min_seconds=0.3)
    record(
        "swap_blocks",
        device,
        bandwidth,
        nbytes,
        t,
        t_base,
        {
            "dtype": str(dtype).removeprefix("torch."),
            "direction": f"{device.type}->cpu",
            "num_pairs": num_pairs,
            "block_bytes": block_bytes,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    bandwidth = streaming_read_bandwidth(device)
    emit({"bench": "bandwidth", **environment(device), "bandwidth_gb_per_s": round(bandwidth / 1e9, 2)})
    big = device.type == "cuda"
    bench_reshape_and_cache(device, dtype, bandwidth, num_tokens=16384 if big else 4096, num_blocks=4096)
    # a decode step: the working set fits in the last-level cache, so % of DRAM bandwidth can exceed 100
    bench_reshape_and_cache(device, dtype, bandwidth, num_tokens=64 if big else 16, num_blocks=4096)
    bench_copy_blocks(device, dtype, bandwidth, num_layers=32 if big else 8, num_blocks=512, num_pairs=64)
    bench_swap_blocks(device, dtype, bandwidth, num_blocks=2048, num_pairs=1024)


if __name__ == "__main__":
    main()
