"""Shared benchmark plumbing: timing, the hardware limits measured in the same run, JSON-line output."""

import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

import fast_inference.ops


def environment(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info.update(cpu_description())
    return info


def cpu_description() -> dict:
    """The CPU model as lscpu names it, its vector ISA flags and the kernel ISA picked at run time
    (FI_CPU_ISA overrides it). platform.processor() says only "x86_64" on Linux."""
    model, flags, fields = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags":
                    flags = set(value.split())
                    break  # the first processor's block is enough
                fields.setdefault(key, value.strip())
    except OSError:
        pass
    model = fields.get("model name", model)
    # A VM's model name can be just "AMD EPYC": family / model tell Zen 1 (23 / 1) from Zen 4 (25 / 17).
    if "cpu family" in fields:
        model += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return {"cpu": model, "cpu_flags": isa, "kernel_isa": fast_inference.ops.cpu_isa()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 3,
    iters: int = 20,
    min_seconds: float = 0.0,
) -> float:
    """Median wall time of fn() in seconds, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    started = time.perf_counter()
    while len(times) < iters or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def streaming_read_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """The memory bandwidth limit in bytes/s, measured now.

    CPU: a streaming read (a sum over a buffer far larger than the last-level cache, all threads), the
    faster of 4 KiB and 2 MiB pages.
    CUDA: a device-to-device copy (bytes read + bytes written per second).
    """
    if device.type == "cuda":
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        seconds = median_time(lambda: dst.copy_(src), device, iters=20)
        return 2 * nbytes / seconds
    # CPU: the best of ordinary and 2 MiB huge pages (the engine keeps its streamed weights on huge
    # pages, which read faster: the limit must be measured the same way).
    from fast_inference.models.hugepages import huge_page_buffer

    best = 0.0
    for make in (lambda: torch.ones(nbytes // 4, dtype=torch.float32), lambda: huge_page_buffer(nbytes)):
        buffer = make().view(torch.float32)
        buffer.fill_(1.0)  # touched: pages are faulted in before timing
        seconds = median_time(buffer.sum, device, warmup=2, iters=10)
        best = max(best, nbytes / seconds)
        del buffer  # one 1 GiB buffer at a time
    return best


def emit(record: dict) -> None:
    print(json.dumps(record, sort_keys=False), flush=True)
