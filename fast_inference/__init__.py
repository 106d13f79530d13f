"""fast_inference: an LLM inference engine and OpenAI-compatible server."""

__version__ = "0.1.0"

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
