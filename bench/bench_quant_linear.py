"""Quantized linear (ops.quant_linear) per ggml format: weight GB/s, % of the streaming read, ratio to dequantize + matmul.

    python bench/bench_quant_linear.py [--formats Q4_1,Q8_0] [--m 1,4,32,512] [--shapes smollm2,1.5b] [--threads 1]
        [--layout engine|plain]

Decode (M <= 8) is bound by weight bytes: the figure to read is % of the streaming-read bandwidth measured in this
run. Each call reads a different copy of the weight, from a set of copies twice the size of the last-level cache,
so the weight comes from memory as in a model's decode step (a single copy of a 1.5B layer's projection would sit
in a 100 MiB L3 and read at cache speed). The baseline is what a quantized model costs without our kernels:
dequantize the weight, then torch's matmul. Times are the fastest of the repeats (`us`, what the kernel can do:
on a shared machine a median mostly measures the neighbours) and the median (`median_us`); --threads 1 measures
one core against a one-thread streaming read, which a busy machine disturbs least.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from common import emit, environment

from fast_inference import ops
from fast_inference.ops import quant

SHAPES = {  # (name, N, K): the projections of one layer and the head
    "smollm2": [("qkv", 960, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)],
    "1.5b": [("qkv", 2048, 1536), ("gate_up", 17920, 1536), ("down", 1536, 8960)],
}
NAMES = {name: qtype for qtype, name in quant.QTYPE_NAMES.items()}


def random_qweight(qtype: int, n: int, k: int) -> torch.Tensor:
    if qtype in quant.WRITABLE_QTYPES:
        return ops.quantize(torch.randn(n, k) * 0.05, qtype)
    _, nbytes = quant.BLOCK_LAYOUT[qtype]
    blocks = torch.randint(0, 256, (n, quant.row_bytes(qtype, k) // nbytes, nbytes), dtype=torch.uint8)
    scale = torch.full(blocks.shape[:2], 1e-3, dtype=torch.float16).unsqueeze(-1).view(torch.uint8)
    if qtype == quant.Q6_K:
        blocks[..., 208:210] = scale
    else:
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    return blocks.reshape(n, -1)


def last_level_cache_bytes() -> int:
    """The largest cache's size from sysfs (32 MiB when it cannot be read)."""
    from pathlib import Path

    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


def rotating(calls: list) -> callable:
    """One function that runs the next of `calls` each time it is called."""
    state = {"i": 0}

    def run():
        state["i"] = (state["i"] + 1) % len(calls)
        return calls[state["i"]]()

    return run


def timings(fn, iters: int) -> tuple[float, float]:
    """(fastest, median) seconds of fn() over iters calls after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


def streaming_read_best(nbytes: int = 1 << 30) -> float:
    """Bytes/s of the fastest of 10 streaming reads (a sum over 1 GiB, all threads), on ordinary and on 2 MiB
    pages, the better of the two: the same fastest-of statistic as the kernel times it is compared with."""
    from fast_inference.models.hugepages import huge_page_buffer

    best = 0.0
    for make in (lambda: torch.ones(nbytes // 4, dtype=torch.float32), lambda: huge_page_buffer(nbytes)):
        buffer = make().view(torch.float32)
        buffer.fill_(1.0)
        best = max(best, nbytes / timings(buffer.sum, 10)[0])
        del buffer
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--formats", default="Q4_0,Q4_1,Q8_0,Q4_K,Q5_K,Q6_K")
    parser.add_argument("--m", default="1,4,32,512")
    parser.add_argument("--shapes", default="smollm2,1.5b")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activations")
    parser.add_argument(
        "--layout",
        default="engine",
        choices=["engine", "plain"],
        help="engine: the layout the engine keeps on CPU (interleaved tiles of 16 rows); plain: ggml's rows",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    limit = streaming_read_best()
    llc = last_level_cache_bytes()
    emit(
        {
            "bench": "quant_linear",
            **environment(device),
            "streaming_read_GBps": round(limit / 1e9, 1),
            "llc_MiB": llc >> 20,
            "note": "shared machine: noisy",
        }
    )
    for shape_set in args.shapes.split(","):
        for name, n, k in SHAPES[shape_set]:
            for fmt in args.formats.split(","):
                qtype = NAMES[fmt]
                qw = random_qweight(qtype, n, k)
                interleaved = args.layout == "engine"
                if interleaved:
                    qw = ops.interleave_rows(qw, qtype)
                copies = [qw] + [qw.clone() for _ in range(-(-2 * llc // qw.numel()) - 1)]
                for m in (int(v) for v in args.m.split(",")):
                    x = torch.randn(m, k).to(getattr(torch, args.dtype))
                    ours, ours_median = timings(
                        rotating([lambda x=x, w=w, qt=qtype: ops.quant_linear(x, w, qt) for w in copies]),
                        max(args.iters, 2 * len(copies))
                        if m <= 8
                        else args.iters,  # big M: compute-bound, few
                    )
                    base, _ = timings(
                        rotating(
                            [
                                lambda x=x, w=w, qt=qtype, k=k: F.linear(x, ops.dequantize(w, qt, k, x.dtype))
                                for w in copies
                            ]
                        ),
                        args.iters,
                    )
                    emit(
                        {
                            "shape": f"{shape_set}.{name}",
                            "dtype": args.dtype,
                            "N": n,
                            "K": k,
                            "format": fmt,
                            "layout": "interleaved" if interleaved else "plain",
                            "M": m,
                            "us": round(ours * 1e6, 1),
                            "median_us": round(ours_median * 1e6, 1),
                            "weight_GBps": round(qw.numel() / ours / 1e9, 2),
                            "pct_of_stream": round(100 * qw.numel() / ours / limit, 1),
                            "vs_dequant_matmul": round(base / ours, 2),
                        }
                    )


if __name__ == "__main__":
    main()
