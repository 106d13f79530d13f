"""fast_inference: an LLM inference engine and OpenAI-compatible server."""

import os
import sys

__version__ = "0.1.0"


def _openmp_wait_policy() -> dict[str, str]:
    """How libgomp's workers wait between parallel regions, chosen from the machine's load when this process
    starts (the user's OMP_WAIT_POLICY / GOMP_SPINCOUNT win). A decode step runs ~120 short parallel regions
    a few microseconds apart. On an idle machine a worker that spins briefly (GOMP_SPINCOUNT=20000, well under
    a millisecond) is there for the next region, where one that sleeps must be woken each time: measured on 2
    idle cores (Xeon, SmolLM2 Q4_1, batch 1), 9.4 ms per step spinning vs 13.5 passive. On a busy machine a
    spinning worker takes the core from the thread it waits for: with two CPU-bound neighbours on those cores,
    80-105 ms spinning vs 17-19 passive (and libgomp's default, 300k spins, was 6x slower still at load 10).
    So: spin when under half the machine's CPU time is busy over 30 ms now (Linux /proc/stat, steal time counts
    as busy; the load average would count the last minute's work, e.g. a benchmark's previous round), else
    sleep (OMP_WAIT_POLICY=PASSIVE). Elsewhere: sleep."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return {}
    busy = _busy_fraction(0.03)
    return {"GOMP_SPINCOUNT": "20000"} if busy is not None and busy < 0.5 else {"OMP_WAIT_POLICY": "PASSIVE"}


def _busy_fraction(seconds: float) -> float | None:
    """The fraction of all CPUs' time that was busy over the next `seconds` (None: no /proc/stat)."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # total (user .. steal), idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


# libgomp reads these when torch loads it, so they only apply when fast_inference is imported first.
if "torch" not in sys.modules:
    os.environ.update(_openmp_wait_policy())

__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "__version__",
]


def __getattr__(name: str):
    # Lazy, so `import fast_inference` (e.g. for the CLI's --help) does not pay for torch + transformers.
    if name in ("LLM",):
        from .engine.llm import LLM

        return LLM
    if name in ("SamplingParams", "StructuredOutputsParams"):
        from .engine import sampling_params

        return getattr(sampling_params, name)
    if name in ("RequestOutput", "CompletionOutput"):
        from .engine import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'fast_inference' has no attribute {name!r}")
