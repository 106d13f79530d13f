"""Tensor parallelism: what a step communicates and what that costs, measured on CPU (gloo) and modelled on NVLink.

Prints JSON lines, then the paper model as a table:
  environment: CPU model, ISA the kernels run, torch, threads (the machine may be shared: read ratios)
  gloo_floor: two bare processes on loopback, the time of one all-reduce of a decode step's hidden
    state [B, hidden] and of one step-message broadcast (the latency floor under every TP step here)
  decode_step: a Llama-shaped random model (hidden 1024, 8 layers, 16 / 8 heads, intermediate 2816) decoding
    B sequences, TP=1 and TP=2 (gloo, one process per rank): per step the collectives rank 0 made (count,
    payload bytes, time inside them, which includes waiting for the slower rank), the step's wall time, and
    the step minus the collectives (compute + host work)
  rank_share_alone: the forward of the whole model and of one rank's TP=2 share run alone (one process,
    one thread): the compute each TP=2 rank has to do per step, without the waiting
  nvlink_model: TP=2/4/8 of Llama-2-7B and Llama-2-70B shapes on H100 SXM (NVLink 900 GB/s bidirectional =
    450 GB/s each way per GPU, HBM 3.35 TB/s), bf16 decode: bytes per step (2 all-reduces per layer of
    B x hidden x 2 bytes, plus the vocab-parallel embedding's all-reduce and the logits all-gather), ring
    all-reduce time (latency term + 2(N-1)/N x payload / link bandwidth) against the step's weight-streaming
    time (weight bytes / N / HBM bandwidth)
Run: PYTHONPATH=. python bench/bench_parallel.py [--batches 1,16] [--steps 30] [--latency-us 8]
"""

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, environment  # noqa: E402

MEASURED_SHAPE = dict(hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=8, intermediate_size=2816)

# Llama-2 shapes (untied embeddings, vocab 32000).
PAPER_MODELS = {
    "llama-7b": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "llama-70b": dict(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000),
}
NVLINK_ONE_WAY = 450e9  # bytes/s per GPU per direction (H100 SXM: 900 GB/s bidirectional)
HBM = 3.35e12  # bytes/s (H100 SXM)
GPU_MEMORY = 80e9


# ---- gloo floor ---------------------------------------------------------------------------------------
def _floor_rank(rank: int, port: int, shapes: list[tuple[int, int]], dtype, iters: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for batch, hidden in shapes:
        x = torch.randn(batch, hidden).to(dtype)
        for _ in range(5):
            dist.all_reduce(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        results[f"all_reduce_{batch}x{hidden}"] = statistics.median(times)
    from fast_inference.engine.distributed import MESSAGE_WORDS

    msg = torch.zeros(MESSAGE_WORDS, dtype=torch.int32)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dist.broadcast(msg, src=0)
        times.append(time.perf_counter() - t0)
    results["step_message"] = statistics.median(times)
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def gloo_floor(shapes: list[tuple[int, int]], dtype: torch.dtype, iters: int = 200) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_floor_rank, args=(r, port, shapes, dtype, iters, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = out.get(timeout=300)
    for p in procs:
        p.join(60)
    return results


# ---- measured decode steps ----------------------------------------------------------------------------
class CollectiveMeter:
    """Wraps torch.distributed's collectives in this process (rank 0): count, payload bytes, time inside."""

    NAMES = ("all_reduce", "broadcast", "gather", "all_gather_into_tensor")

    def __init__(self) -> None:
        self.originals = {name: getattr(dist, name) for name in self.NAMES}
        self.reset()

    def reset(self) -> None:
        self.stats = {name: [0, 0, 0.0] for name in self.NAMES}

    def install(self) -> None:
        for name, fn in self.originals.items():
            setattr(dist, name, self._wrap(name, fn))

    def uninstall(self) -> None:
        for name, fn in self.originals.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def timed(tensor, *args, **kwargs):
            t0 = time.perf_counter()
            result = fn(tensor, *args, **kwargs)
            entry = self.stats[name]
            entry[0] += 1
            entry[1] += tensor.numel() * tensor.element_size()
            entry[2] += time.perf_counter() - t0
            return result

        return timed


def _decode_steps(llm, batch: int, steps: int, meter: CollectiveMeter | None) -> dict:
    from fast_inference import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", [(11 * i + j) % 500 + 3 for j in range(32)], params)
    while any(seq.num_computed < seq.num_prompt_tokens for seq in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()  # prefill
    for _ in range(3):
        engine.step()
    if meter is not None:
        meter.reset()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    engine.abort_request([f"b{batch}-{i}" for i in range(batch)])
    engine.step()
    record = {"step_ms": round(statistics.median(times) * 1e3, 3), "mean_step_ms": sum(times) / steps * 1e3}
    if meter is not None:
        comm_s = 0.0
        for name, (count, nbytes, seconds) in meter.stats.items():
            if count:
                record[name] = {
                    "per_step": count / steps,
                    "bytes_per_step": nbytes // steps,
                    "us_per_step": round(seconds / steps * 1e6, 1),
                }
                comm_s += seconds
        record["comm_ms_per_step"] = round(comm_s / steps * 1e3, 3)
        record["comm_share_of_step"] = round(comm_s / sum(times), 3)
        record["compute_ms_per_step"] = round(record["mean_step_ms"] - comm_s / steps * 1e3, 3)
    record["mean_step_ms"] = round(record["mean_step_ms"], 3)
    return record


def measured(args, model_dir: str) -> None:
    from fast_inference import LLM

    batches = [int(b) for b in args.batches.split(",")]
    common = dict(dtype=args.dtype, device="cpu", kv_cache_memory="256MiB", max_num_seqs=max(batches))
    results: dict[tuple, dict] = {}
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        single = LLM(model_dir, **common)
        for b in batches:
            results[(1, threads, b)] = _decode_steps(single, b, args.steps, None)
        del single
    torch.set_num_threads(1)  # one thread per rank: two ranks use the machine's two cores
    meter = CollectiveMeter()
    with LLM(model_dir, tensor_parallel_size=2, **common) as parallel:
        meter.install()
        try:
            for b in batches:
                results[(2, 1, b)] = _decode_steps(parallel, b, args.steps, meter)
        finally:
            meter.uninstall()
    for (tp, threads, b), record in results.items():
        base = results[(1, 1, b)]["step_ms"]
        emit(
            {
                "bench": "decode_step",
                "tp": tp,
                "threads_per_rank": threads,
                "batch": b,
                **record,
                "speedup_vs_tp1_1thread": round(base / record["step_ms"], 2),
            }
        )


def share_alone(model_dir: str, dtype: str, batches: list[int]) -> None:
    """The forward (no head) of the whole model and of rank 0's TP=2 share alone, one thread, its
    all-reduces over a one-rank gloo group (~15 us each): the compute a TP=2 step has to wait for."""
    import socket

    from fast_inference.models.config import load_model_config
    from fast_inference.models.loader import load_model
    from fast_inference.models.parallel_layers import TensorParallel
    from fast_inference.ops.attention_metadata import build_metadata

    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    cfg = load_model_config(model_dir, dtype, torch.device("cpu"), None)
    times = {}
    for label, tp in (("whole", None), ("share", TensorParallel(0, 2))):
        model = load_model(cfg, tp)
        model.prepack()
        shape = (max(batches), 16, model.config.num_kv_heads, cfg.head_dim)
        caches = [torch.zeros(shape, dtype=cfg.dtype) for _ in range(2 * cfg.num_layers)]
        model.bind_kv_cache(caches[: cfg.num_layers], caches[cfg.num_layers :])
        for b in batches:
            pos, meta = build_metadata([[i] for i in range(b)], [5] * b, [1] * b, 16, torch.device("cpu"))
            ids = torch.full((b,), 7)
            with torch.inference_mode():
                for _ in range(5):
                    model(ids, pos, meta)
                samples = []
                for _ in range(30):
                    t0 = time.perf_counter()
                    model(ids, pos, meta)
                    samples.append(time.perf_counter() - t0)
            times[(label, b)] = statistics.median(samples)
    dist.destroy_process_group()
    for b in batches:
        emit(
            {
                "bench": "rank_share_alone",
                "batch": b,
                "whole_model_forward_ms": round(times[("whole", b)] * 1e3, 3),
                "tp2_share_forward_ms": round(times[("share", b)] * 1e3, 3),
                "share_over_whole": round(times[("share", b)] / times[("whole", b)], 3),
            }
        )


# ---- the NVLink paper model ---------------------------------------------------------------------------
def weight_bytes(m: dict, dtype_bytes: int = 2) -> int:
    head_dim = m["hidden"] // m["heads"]
    attn = m["hidden"] * (2 * m["heads"] + 2 * m["kv_heads"]) * head_dim
    mlp = 3 * m["hidden"] * m["intermediate"]
    return (m["layers"] * (attn + mlp) + 2 * m["vocab"] * m["hidden"]) * dtype_bytes


def nvlink_rows(latency_s: float, batches: list[int]) -> list[dict]:
    rows = []
    for name, m in PAPER_MODELS.items():
        weights = weight_bytes(m)
        for batch in batches:
            t1 = weights / HBM
            for n in (1, 2, 4, 8):
                payload = batch * m["hidden"] * 2  # one all-reduce: [B, hidden] bf16
                ring = 2 * (n - 1) / n
                num_ar = 2 * m["layers"] + 1  # o_proj and down_proj per layer, the embedding lookup
                logits = batch * m["vocab"] * 4 * (n - 1) / n  # fp32 logits all-gathered, received per GPU
                wire = num_ar * payload * ring + logits if n > 1 else 0.0
                comm = (num_ar + 1) * latency_s + wire / NVLINK_ONE_WAY if n > 1 else 0.0
                stream = weights / n / HBM
                step = stream + comm  # no overlap assumed: each all-reduce waits for its layer's GEMM
                rows.append(
                    {
                        "bench": "nvlink_model",
                        "model": name,
                        "tp": n,
                        "batch": batch,
                        "weights_GB_per_gpu": round(weights / n / 1e9, 1),
                        "fits_80GB": weights / n < GPU_MEMORY,
                        "allreduce_payload_MB_per_step": round(num_ar * payload / 1e6, 3),
                        "wire_MB_per_gpu_per_step": round(wire / 1e6, 3),
                        "comm_us": round(comm * 1e6, 1),
                        "weight_stream_us": round(stream * 1e6, 1),
                        "comm_over_stream": round(comm / stream, 3),
                        "speedup_vs_tp1": round(t1 / step, 2),
                    }
                )
    return rows


def print_table(rows: list[dict]) -> None:
    cols = [
        ("model", "model"),
        ("tp", "TP"),
        ("batch", "batch"),
        ("weights_GB_per_gpu", "weights/GPU GB"),
        ("allreduce_payload_MB_per_step", "all-reduce payload MB/step"),
        ("wire_MB_per_gpu_per_step", "wire MB/GPU/step"),
        ("comm_us", "comm us"),
        ("weight_stream_us", "weight stream us"),
        ("comm_over_stream", "comm/stream"),
        ("speedup_vs_tp1", "speed-up"),
    ]
    print("| " + " | ".join(h for _, h in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [
            str(r[k]) + ("" if k != "weights_GB_per_gpu" or r["fits_80GB"] else " (>80)") for k, _ in cols
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,16", help="decode batch sizes measured on CPU")
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed per batch size")
    parser.add_argument("--threads", type=int, default=2, help="threads of the second TP=1 baseline")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--latency-us", type=float, default=8.0, help="NVLink model: fixed cost per collective"
    )
    parser.add_argument("--paper-batches", default="1,32,256")
    parser.add_argument("--skip-measured", action="store_true", help="print the paper model only")
    args = parser.parse_args()

    emit(
        {
            "bench": "environment",
            **environment(torch.device("cpu")),
            "load_average": os.getloadavg()[0],
        }
    )
    if not args.skip_measured:
        from fast_inference.models.config import cpu_has_native_bf16
        from fast_inference.models.demo import build_model_dir

        dtype = (
            torch.bfloat16
            if args.dtype == "bfloat16" or (args.dtype == "auto" and cpu_has_native_bf16())
            else torch.float32
        )
        batches = [int(b) for b in args.batches.split(",")]
        floor = gloo_floor([(b, MEASURED_SHAPE["hidden_size"]) for b in batches], dtype)
        emit(
            {
                "bench": "gloo_floor",
                "dtype": str(dtype),
                **{k: round(v * 1e6, 1) for k, v in floor.items()},
                "unit": "us",
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = str(build_model_dir(Path(tmp) / "m", seed=1, **MEASURED_SHAPE))
            measured(args, model_dir)
            share_alone(model_dir, args.dtype, batches)
    rows = nvlink_rows(args.latency_us * 1e-6, [int(b) for b in args.paper_batches.split(",")])
    for row in rows:
        emit(row)
    print_table(rows)


if __name__ == "__main__":
    main()
