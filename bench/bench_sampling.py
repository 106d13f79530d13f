"""Benchmark of ops.sample against the torch baseline (softmax, sort, cumsum mask, multinomial).

Mixed rows as a serving batch has them: half top-k 50, half top-p 0.9, temperature 0.8. Logits are
Gaussian with standard deviation 2 (a fairly flat distribution: top-p 0.9 keeps tens of thousands of
tokens, the hard case for a sort-free sampler). Prints JSON lines: times, ratio to the baseline
measured in the same run (on CPU the faster of the
all-threads and one-thread baselines), GB/s of logits read and % of the streaming read bandwidth measured now.

    python bench/bench_sampling.py [--device cpu|cuda] [--vocab 131072]

CPU: batch 64 mixed, then batch 1 with a top-k row and with a top-p row; CUDA: batch 128 mixed, then batch 1.
"""

import argparse

import torch

from bench.common import emit, environment, median_time, streaming_read_bandwidth
from fast_inference import ops


def torch_baseline(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
    keep = ranks < torch.where(top_k > 0, top_k, logits.shape[1])[:, None]
    cum = torch.cumsum(sorted_probs * keep, dim=-1)
    keep &= (cum - sorted_probs) < top_p[:, None] * cum[:, -1:]
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(1, choice).view(-1)


ROWS = {
    "mixed": "half top_k=50, half top_p=0.9, T=0.8",
    "top_k": "top_k=50, T=0.8",
    "top_p": "top_p=0.9, T=0.8",
}


def bench(batch: int, rows: str, vocab: int, device: torch.device, bandwidth: float) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, vocab, device=device, generator=gen) * 2.0
    index = torch.arange(batch, device=device)
    half = {"mixed": index % 2 == 0, "top_k": index >= 0, "top_p": index < 0}[rows]
    temperature = torch.full((batch,), 0.8, device=device)
    top_k = torch.where(half, 50, 0).to(torch.int32)
    top_p = torch.where(half, 1.0, 0.9).float()
    min_p = torch.zeros(batch, device=device)
    seeds = torch.arange(batch, device=device, dtype=torch.int64)
    offsets = torch.zeros(batch, device=device, dtype=torch.int64)

    iters = 20 if device.type == "cuda" or batch == 1 else 5
    # ops.sample includes its value checks (on CUDA: one small copy to the host), as the engine runs it.
    t_ops = median_time(
        lambda: ops.sample(logits, temperature, top_k, top_p, min_p, seeds, offsets),
        device,
        iters=iters,
    )
    t_base = median_time(lambda: torch_baseline(logits, temperature, top_k, top_p, gen), device, iters=iters)
    extra = {}
    if device.type == "cpu":
        # On a loaded machine torch's multi-threaded ops can stall at thread barriers; the baseline
        # counts as its faster variant, all threads or one thread, so the ratio never flatters us.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t_base_1 = median_time(
            lambda: torch_baseline(logits, temperature, top_k, top_p, gen), device, iters=iters
        )
        torch.set_num_threads(threads)
        extra = {
            "torch_baseline_all_threads_ms": round(t_base * 1e3, 3),
            "torch_baseline_1_thread_ms": round(t_base_1 * 1e3, 3),
        }
        t_base = min(t_base, t_base_1)
    gbps = logits.numel() * logits.element_size() / t_ops / 1e9
    emit(
        {
            "bench": "sample",
            "batch": batch,
            "vocab": vocab,
            "dtype": "float32",
            "rows": ROWS[rows],
            "ops_ms": round(t_ops * 1e3, 3),
            "torch_baseline_ms": round(t_base * 1e3, 3),
            "speedup_vs_torch": round(t_base / t_ops, 2),
            **extra,
            "logits_read_GBps": round(gbps, 2),
            "pct_of_streaming_read": round(100 * gbps * 1e9 / bandwidth, 1),
            **environment(device),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=131072)
    args = parser.parse_args()
    device = torch.device(args.device)
    big = 128 if device.type == "cuda" else 64
    bandwidth = streaming_read_bandwidth(device)
    emit({"bench": "streaming_read_bandwidth", "GBps": round(bandwidth / 1e9, 2), **environment(device)})
    for batch, rows in ((big, "mixed"), (1, "top_k"), (1, "top_p")):
        bench(batch, rows, args.vocab, device, bandwidth)


if __name__ == "__main__":
    main()
