"""Server life cycle: listener first, engine loaded in its thread, start-up log, signals, graceful drain."""

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from ..engine.async_engine import AsyncEngine
from .http import HTTPServer, Limits
from .routes import OpenAIApp, ServerConfig

logger = logging.getLogger("fast_inference.server")


class Server:
    """HTTP server + AsyncEngine. /health answers 503 while the engine factory runs, 200 once ready."""

    def __init__(
        self,
        engine_factory: Callable[[], Any],
        config: ServerConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        limits: Limits | None = None,
        drain_timeout: float = 30.0,
        is_demo: bool = False,
    ) -> None:
        self.engine = AsyncEngine(engine_factory)
        self.config = config
        self.host = host
        self.port = port
        self.drain_timeout = drain_timeout
        self.limits = limits or Limits()
        self.is_demo = is_demo
        self.app: OpenAIApp | None = None
        self.http: HTTPServer | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        http_box: list[HTTPServer] = []
        self.app = OpenAIApp(self.engine, self.config, connections=lambda: http_box[0].num_connections)
        self.http = HTTPServer(self.app, self.limits, on_error_headers=self.app.cors_headers)
        http_box.append(self.http)
        self.port = await self.http.start(self.host, self.port)
        logger.info("Listening on http://%s:%d (health: 503 until the model is loaded)", self.host, self.port)
        self.engine.start(self._loop)
        return self.port

    async def wait_ready(self, timeout: float | None = None) -> None:
        await self.engine.wait_ready(timeout)
        self._log_ready()

    def _log_ready(self) -> None:
        cfg = self.engine.model_config
        blocks, block_size = self.engine.kv_cache_blocks
        what = (
            "the built-in demo model (tiny random-weight Llama, made locally)"
            if self.is_demo
            else cfg.model_path
        )
        logger.info("Model ready: serving %s as %s", what, ", ".join(self.config.served_model_names))
        logger.info(
            "  URL: http://%s:%d/v1  device=%s dtype=%s max_model_len=%d architecture=%s",
            self.host,
            self.port,
            cfg.device,
            str(cfg.dtype).replace("torch.", ""),
            cfg.max_model_len,
            cfg.architecture,
        )
        logger.info("  KV cache: %d blocks x %d tokens = %d tokens", blocks, block_size, blocks * block_size)
        if self.config.api_key:
            logger.info("  API key required on all routes except /health and /ping")

    def request_stop(self) -> None:
        """Thread-safe: begin a graceful shutdown."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop is not None and self._stop.is_set():
            logger.warning("%s again: exiting now without draining", sig.name)
            os._exit(1)
        logger.info("%s received (send it again to exit at once)", sig.name)
        self.request_stop()

    async def serve_until_stopped(self) -> None:
        ready = asyncio.ensure_future(self.wait_ready())
        stop = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait((ready, stop), return_when=asyncio.FIRST_COMPLETED)
        if ready in done and ready.exception() is not None:
            logger.error("%s", ready.exception())  # keep serving /health (503) so operators see the state
        await stop
        ready.cancel()
        with contextlib.suppress(BaseException):
            await ready
        await self.shutdown()

    async def shutdown(self) -> None:
        logger.info("Shutting down: draining in-flight requests (deadline %.0f s)", self.drain_timeout)
        if self.http is not None:
            await self.http.shutdown(self.drain_timeout)
        await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)
        if self.app is not None:
            self.app.close()
        logger.info("Stopped")


def run(server: Server) -> None:
    """Run until SIGINT/SIGTERM, then drain and exit."""

    async def main() -> None:
        await server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, server._on_signal, sig)
        await server.serve_until_stopped()

    asyncio.run(main())


class ServerThread:
    """A server on its own event loop in a background thread (tests, benchmarks). stop() joins everything."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fast-inference-server", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._started.set()
                return
            self._started.set()
            await self.server.serve_until_stopped()

        asyncio.run(main())

    def start(self, ready_timeout: float | None = 120.0) -> "ServerThread":
        """Start listening; then wait up to `ready_timeout` s for the engine (None: do not wait)."""
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        if ready_timeout is not None and not self.server.engine._ready.wait(ready_timeout):
            raise TimeoutError("engine did not load in time")
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def call(self, coro_fn: Callable, timeout: float = 30.0):
        """Run a coroutine on the server's loop (e.g. engine.get_stats) and return its result."""
        future = asyncio.run_coroutine_threadsafe(coro_fn(), self.server._loop)
        return future.result(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        self.server.request_stop()
        self._thread.join(timeout)
