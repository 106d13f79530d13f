"""TokenizerPool: the server's own tokenizer copies (one for the event loop, one for its tokenizer thread),
so request tokenization never shares a Rust tokenizer with the engine thread's detokenizer."""

import asyncio
import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

# Requests with larger bodies are tokenized (and chat-templated) off the event loop.
INLINE_TOKENIZE_BYTES = 16 * 1024


class TokenizerPool:
    def __init__(self, engine, require_ready: Callable[[], None]) -> None:
        self._engine = engine
        self._require_ready = require_ready  # raises the 503 while the engine is loading or dead
        self._tokenizer = None
        self._pool: ThreadPoolExecutor | None = None  # the tokenizer thread, started on first need
        self._pool_tokenizer = None

    @property
    def tokenizer(self):
        """The event loop's private copy (made on first use, once the engine is ready)."""
        if self._tokenizer is None:
            self._require_ready()
            try:
                self._tokenizer = copy.deepcopy(self._engine.tokenizer)
            except Exception:
                self._tokenizer = self._engine.tokenizer
        return self._tokenizer

    async def run(self, request, fn: Callable):
        """fn(tokenizer): in line for small requests; for large ones on the tokenizer thread, with that
        thread's own tokenizer copy, so a long prompt never stalls the event loop and every other stream."""
        tokenizer = self.tokenizer
        if len(request.body) <= INLINE_TOKENIZE_BYTES:
            return fn(tokenizer)
        if self._pool is None:
            try:
                self._pool_tokenizer = copy.deepcopy(tokenizer)
            except Exception:  # cannot get a private copy: sharing one across threads is not safe
                return fn(tokenizer)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fast-inference-tokenizer")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, self._pool_tokenizer)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
