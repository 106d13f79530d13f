"""The engine: requests in, scheduling over a paged KV cache, model runs, sampling, output deltas out (LLMEngine, AsyncEngine, LLM)."""
