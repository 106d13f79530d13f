"""Server life cycle: listener first, engine loaded in its thread (or engine replica processes), start-up
log, signals, graceful drain; and the process layouts of --data-parallel-size / --api-server-count."""

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..engine.async_engine import AsyncEngine
from ..engine.data_parallel import DataParallelEngine, socket_dir
from ..engine.engine_process import (
    ENGINE_STOP_SIGNAL,
    SupervisedProcess,
    Supervisor,
    configure_child_logging,
    engine_process_main,
    watch_parent,
)
from .http import HTTPServer, Limits
from .routes import OpenAIApp, ServerConfig

logger = logging.getLogger("fast_inference.server")


class Server:
    """HTTP server + engine. /health answers 503 while the engine loads, 200 once ready.

    `engine`: an object with AsyncEngine's surface (a DataParallelEngine over engine processes), or a
    factory of an engine to run in this process on AsyncEngine's thread."""

    def __init__(
        self,
        engine: Callable[[], Any] | DataParallelEngine,
        config: ServerConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        limits: Limits | None = None,
        drain_timeout: float = 30.0,
        is_demo: bool = False,
        reuse_port: bool = False,
    ) -> None:
        self.engine = engine if isinstance(engine, DataParallelEngine) else AsyncEngine(engine)
        self.reuse_port = reuse_port
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
        self.port = await self.http.start(self.host, self.port, reuse_port=self.reuse_port)
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
        replicas = self.engine.replica_states()
        if replicas:
            logger.info(
                "  Engine replicas: %d (%s)",
                len(replicas),
                ", ".join(f"{r['replica']}: pid {r['pid']} {r['state']}" for r in replicas),
            )
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


def run(server: Server, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Run until one of `signals`, then drain and exit."""

    async def main() -> None:
        await server.start()
        loop = asyncio.get_running_loop()
        for sig in signals:
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


# ---- several processes: --data-parallel-size N, --api-server-count N --------------------------------------


def serve_replicas(
    engine_spec: Callable[[], Any],
    config: ServerConfig,
    *,
    data_parallel_size: int,
    api_server_count: int,
    host: str,
    port: int,
    limits: Limits,
    drain_timeout: float,
    is_demo: bool,
    log_level: str,
) -> None:
    """Engine replicas in their own processes (each on a Unix socket in a private directory), with one
    API server in this process, or `api_server_count` API server processes sharing the port
    (SO_REUSEPORT) while this process supervises them all. `engine_spec` must pickle (EngineSpec)."""
    workdir = socket_dir()
    addresses = [os.path.join(workdir, f"engine-{i}.sock") for i in range(data_parallel_size)]
    engine_for = getattr(engine_spec, "for_replica", lambda i, n: engine_spec)
    engines = [
        SupervisedProcess(
            f"engine replica {i}",
            engine_process_main,
            (engine_for(i, data_parallel_size), addresses[i], i, log_level),
            stop_signal=ENGINE_STOP_SIGNAL,
        )
        for i in range(data_parallel_size)
    ]
    server_kwargs = dict(host=host, port=port, limits=limits, drain_timeout=drain_timeout, is_demo=is_demo)
    try:
        if api_server_count == 1:
            run(Server(DataParallelEngine(addresses, Supervisor(engines)), config, **server_kwargs))
        else:
            _run_api_servers(engines, addresses, config, server_kwargs, api_server_count, log_level)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket: it fixes the port (port 0: a free one) for the API
    server processes, which bind it too; the kernel only hands connections to listening sockets."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _run_api_servers(
    engines: list[SupervisedProcess],
    addresses: list[str],
    config: ServerConfig,
    server_kwargs: dict,
    count: int,
    log_level: str,
) -> None:
    """This process only supervises: engines and API servers are children, restarted when they die.
    SIGINT/SIGTERM: the API servers drain first (SIGTERM each, up to the shutdown timeout), then the
    engines stop; a second signal kills every child at once."""
    reserved = _reserve_port(server_kwargs["host"], server_kwargs["port"])
    port = reserved.getsockname()[1]
    apis = [
        SupervisedProcess(
            f"API server {i}",
            api_server_main,
            (
                {**server_kwargs, "port": port, "config": dataclasses.replace(config, api_server_index=i)},
                addresses,
                i,
                log_level,
            ),
        )
        for i in range(count)
    ]
    supervisor = Supervisor(engines + apis)
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stop.is_set():
            logger.warning("%s again: killing every child process now", signal.Signals(signum).name)
            for child in engines + apis:
                if child.process is not None and child.process.is_alive():
                    child.process.kill()
            os._exit(1)
        logger.info("%s received (send it again to exit at once)", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        supervisor.start()
        logger.info(
            "Listening on http://%s:%d: %d API server processes (SO_REUSEPORT) over %d engine replica(s)",
            server_kwargs["host"],
            port,
            count,
            len(engines),
        )
        while not stop.wait(0.5):
            pass
        logger.info("Shutting down: the API servers drain (deadline %.0f s), then the engines stop",
                    server_kwargs["drain_timeout"])  # fmt: skip
        supervisor.stop(server_kwargs["drain_timeout"] + 5.0, children=apis)
        supervisor.stop(10.0, children=engines)
        logger.info("Stopped")
    finally:
        supervisor.stop(5.0)  # whatever is left after an error
        reserved.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def api_server_main(
    server_kwargs: dict, addresses: list[str], index: int, log_level: str, incarnation: int, parent_pid: int
) -> None:
    """One of several API server processes: HTTP on the shared port, a DataParallelEngine over the
    engine processes (which the parent owns). SIGTERM drains; SIGINT is the parent's."""
    configure_child_logging(log_level, f"api-server-{index}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = server_kwargs.pop("config")
    server = Server(DataParallelEngine(addresses), config, reuse_port=True, **server_kwargs)
    watch_parent(parent_pid, server.request_stop)
    run(server, signals=(signal.SIGTERM,))
