"""fast_inference: an LLM inference engine and OpenAI-compatible server."""

import os
import sys

__version__ = "0.1.0"

# OpenMP workers sleep when they run out of work instead of spinning (libgomp's default spins ~300k
# iterations). On a shared or small CPU a spinning worker takes the core from the thread it waits for (the
# server's event loop, the tokenizer, another process): measured on 2 shared cores, a batch-1 decode step
# took 1130 ms spinning vs 179 ms passive (load 10), 192 vs 59 ms (load 6). libgomp reads this when torch
# loads it, so it only applies when fast_inference is imported first; the user's own setting wins.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
