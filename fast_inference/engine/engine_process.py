"""An engine in its own process: EngineSpec (a picklable engine factory), the engine process (EngineLoop
behind a Unix socket that any number of front-ends connect to), and the supervisor that spawns such
processes, restarts the ones that die and stops them all."""

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .async_engine import EngineDeadError, EngineLoop
from .config import EngineArgs
from .intake import InvalidRequestError
from .outputs import RequestOutput

logger = logging.getLogger("fast_inference.engine")

# Wire format, both directions: a 4-byte big-endian length, then a pickle of one tuple (kind, ...).
# The socket lives in a directory only this user can enter, so only our own processes can connect.
#
# front-end -> engine: ("add", request_id, prompt, params, arrival, max_tokens_must_fit)
#                      ("abort", request_id)  ("embed", token, token_id_lists, truncate)  ("stats", token)
# engine -> front-end: ("state", info)  on connect and whenever the state changes (info: state_info())
#                      ("step", outputs, stats)  once per engine step: this front-end's deltas + stats
#                      ("accepted", request_ids)  ("failed", request_ids, error)  ("result", token, value, error)
FRAME_HEADER = struct.Struct("!I")
# An engine process stops on this signal from its supervisor and ignores SIGINT and SIGTERM: a signal sent
# to the whole process group (Ctrl-C, `timeout`, systemd) must not stop the engines while the front-ends
# still drain their in-flight requests.
ENGINE_STOP_SIGNAL = signal.SIGUSR1
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL


def encode_frame(message: tuple) -> bytes:
    payload = pickle.dumps(message, protocol=PICKLE_PROTOCOL)
    return FRAME_HEADER.pack(len(payload)) + payload


def error_to_wire(error: BaseException) -> tuple:
    """Exceptions cross the socket as (kind, message, param, code): InvalidRequestError does not pickle."""
    if isinstance(error, InvalidRequestError):
        return ("invalid", str(error), error.param, error.code)
    if isinstance(error, EngineDeadError):
        return ("dead", str(error), None, None)
    if isinstance(error, ValueError):
        return ("value", str(error), None, None)
    return ("runtime", f"{type(error).__name__}: {error}", None, None)


def error_from_wire(wire: tuple) -> BaseException:
    kind, message, param, code = wire
    if kind == "invalid":
        return InvalidRequestError(message, param, code)
    if kind == "dead":
        return EngineDeadError(message)
    if kind == "value":
        return ValueError(message)
    return RuntimeError(message)


@dataclass
class EngineSpec:
    """What an engine process builds: EngineArgs plus the process-wide torch thread count and, for a
    data-parallel replica on a CUDA machine, the GPUs it may see. Picklable, so the spawn start method
    can send it; calling it builds the engine (LLMEngine, or EncoderEngine for a BERT-family directory)."""

    engine_args: EngineArgs
    num_threads: int | None = None
    cuda_visible_devices: str | None = None  # set before CUDA starts in the replica (and its TP workers)

    def __call__(self):
        if self.cuda_visible_devices is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        if self.num_threads is not None:
            import torch

            torch.set_num_threads(self.num_threads)
        from .encoder_engine import EncoderEngine, is_encoder_model
        from .llm_engine import LLMEngine

        engine_cls = EncoderEngine if is_encoder_model(self.engine_args.model) else LLMEngine
        return engine_cls.from_engine_args(self.engine_args)

    def for_replica(self, replica: int, num_replicas: int) -> "EngineSpec":
        """Data-parallel replicas on a CUDA machine each see their own GPUs: one per tensor-parallel rank,
        replica i the i-th group of them (cuda:0 inside the replica is its first)."""
        if num_replicas == 1 or self.engine_args.device not in ("auto", "cuda"):
            return self
        import torch

        if not torch.cuda.is_available():
            return self
        gpus = replica_gpus(
            replica,
            self.engine_args.tensor_parallel_size // self.engine_args.nnodes,  # this node's ranks
            torch.cuda.device_count(),
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
        return replace(self, cuda_visible_devices=gpus)


def replica_gpus(replica: int, gpus_per_replica: int, device_count: int, visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for one replica: GPUs [replica * per, (replica + 1) * per) of the ones this
    process sees (wrapping around when there are fewer than replicas x per, so replicas then share),
    named as the parent's CUDA_VISIBLE_DEVICES names them."""
    names = (
        [v.strip() for v in visible.split(",") if v.strip()]
        if visible
        else [str(i) for i in range(device_count)]
    )
    names = names[:device_count]
    if gpus_per_replica > len(names):
        raise ValueError(
            f"a replica needs {gpus_per_replica} GPUs (--tensor-parallel-size) but {len(names)} are visible"
        )
    return ",".join(names[(replica * gpus_per_replica + k) % len(names)] for k in range(gpus_per_replica))


# ---- inside the engine process -------------------------------------------------------------------------


class _Peer:
    """One connected front-end: its socket (sends serialized by a lock) and the requests it added."""

    __slots__ = ("sock", "lock", "alive", "requests")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.alive = True
        self.requests: set[str] = set()

    def send_bytes(self, frame: bytes) -> None:
        if not self.alive:
            return
        try:
            with self.lock:
                self.sock.sendall(frame)
        except OSError:
            self.alive = False  # its reader thread sees the close and aborts its requests

    def send(self, message: tuple) -> None:
        self.send_bytes(encode_frame(message))


class EngineService(EngineLoop):
    """EngineLoop whose events go to the front-end that owns each request, one frame per step each."""

    def __init__(self, factory: Callable[[], Any], replica: int, incarnation: int) -> None:
        super().__init__(factory)
        self.replica = replica
        self.incarnation = incarnation
        self._peers: list[_Peer] = []
        self._owner: dict[str, _Peer] = {}
        self._lock = threading.Lock()  # peers, owners, and state announcements

    # -- connections (accept thread, one reader thread per front-end) ----------------------------------
    def accept_forever(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # the listener was closed: shutting down
            peer = _Peer(sock)
            with self._lock:
                self._peers.append(peer)
                peer.send(("state", self.state_info()))
            threading.Thread(target=self._read_peer, args=(peer,), daemon=True).start()

    def _read_peer(self, peer: _Peer) -> None:
        sock = peer.sock
        try:
            while True:
                header = _recv_exactly(sock, FRAME_HEADER.size)
                if header is None:
                    break
                payload = _recv_exactly(sock, FRAME_HEADER.unpack(header)[0])
                if payload is None:
                    break
                message = pickle.loads(payload)
                kind = message[0]
                if kind == "add":
                    with self._lock:
                        self._owner[message[1]] = peer
                        peer.requests.add(message[1])
                    self._commands.put(message)
                elif kind == "abort":
                    with self._lock:  # the front-end has forgotten it: no output of it is sent any more
                        if self._owner.get(message[1]) is peer:
                            del self._owner[message[1]]
                        peer.requests.discard(message[1])
                    self._commands.put(message)
                elif kind == "embed":
                    _, token, lists, truncate = message
                    self._commands.put(("embed", lists, (peer, token), truncate))
                elif kind == "stats":
                    self._commands.put(("stats", (peer, message[1])))
        except (OSError, EOFError, pickle.UnpicklingError):
            pass
        # The front-end went away: nobody reads these requests any more, so free their blocks.
        peer.alive = False
        with self._lock:
            if peer in self._peers:
                self._peers.remove(peer)
            orphans = list(peer.requests)
            for request_id in orphans:
                self._owner.pop(request_id, None)
            peer.requests.clear()
        for request_id in orphans:
            self._commands.put(("abort", request_id))
        sock.close()

    def close_peers(self) -> None:
        with self._lock:
            peers, self._peers = self._peers, []
        for peer in peers:
            peer.alive = False
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            peer.sock.close()

    # -- state -----------------------------------------------------------------------------------------
    def state_info(self) -> dict:
        info = {
            "state": self.state,
            "error": self.error,
            "pid": os.getpid(),
            "replica": self.replica,
            "incarnation": self.incarnation,
            "stats": self.stats(),
        }
        if self.state == "ready":
            engine = self.engine
            info["model_config"] = engine.model_config
            info["tokenizer"] = engine.tokenizer
            info["supports_generation"] = engine.supports_generation
            info["kv_cache_blocks"] = (engine.num_total_blocks, engine.block_size)
        return info

    def stats(self) -> dict:
        return {**self.stats_snapshot, "num_steps": self.step_count}

    # -- EngineLoop's events ---------------------------------------------------------------------------
    def _send_state(self) -> None:
        with self._lock:
            frame = encode_frame(("state", self.state_info()))
            for peer in self._peers:
                peer.send_bytes(frame)
        if self.state == "ready":
            logger.info("engine replica %d ready (pid %d)", self.replica, os.getpid())

    def _by_owner(self, request_ids, forget: bool) -> dict[_Peer, list]:
        grouped: dict[_Peer, list] = {}
        with self._lock:
            for request_id in request_ids:
                peer = self._owner.pop(request_id, None) if forget else self._owner.get(request_id)
                if peer is None:
                    continue
                if forget:
                    peer.requests.discard(request_id)
                grouped.setdefault(peer, []).append(request_id)
        return grouped

    def _send_step(self, outputs: list[RequestOutput]) -> None:
        per_peer: dict[_Peer, list[RequestOutput]] = {}
        finished = []
        with self._lock:
            for output in outputs:
                peer = self._owner.get(output.request_id)
                if peer is not None:
                    per_peer.setdefault(peer, []).append(output)
                    if output.finished:
                        finished.append(output.request_id)
            for request_id in finished:
                peer = self._owner.pop(request_id)
                peer.requests.discard(request_id)
            peers = list(self._peers)
        stats = self.stats()
        idle_frame = None
        for peer in peers:  # every front-end gets the stats (load, /metrics); owners get their deltas
            mine = per_peer.get(peer)
            if mine:
                peer.send(("step", mine, stats))
            else:
                idle_frame = idle_frame or encode_frame(("step", [], stats))
                peer.send_bytes(idle_frame)

    def _send_accepted(self, request_ids: list[str]) -> None:
        for peer, ids in self._by_owner(request_ids, forget=False).items():
            peer.send(("accepted", ids))

    def _send_failed(self, request_ids: list[str], error: BaseException) -> None:
        wire = error_to_wire(error)
        for peer, ids in self._by_owner(request_ids, forget=True).items():
            peer.send(("failed", ids, wire))

    def _send_fail_all(self, error: BaseException) -> None:
        with self._lock:
            ids = list(self._owner)
        self._send_failed(ids, error)

    def _send_result(self, reply_to: Any, result: Any, error: BaseException | None) -> None:
        peer, token = reply_to
        peer.send(("result", token, result, None if error is None else error_to_wire(error)))


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def configure_child_logging(level: str, name: str) -> None:
    """Spawned children log to stderr like the parent, with their role in each line."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s %(levelname)s %(name)s[{name}]: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def watch_parent(parent_pid: int, on_orphaned: Callable[[], None]) -> None:
    """Call on_orphaned (once, on a daemon thread) if the parent dies, so no child outlives its server."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        on_orphaned()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def engine_process_main(
    spec: Callable[[], Any], address: str, replica: int, log_level: str, incarnation: int, parent_pid: int
) -> None:
    """The engine process: listen first (front-ends see 'loading' at once), load, then serve until
    ENGINE_STOP_SIGNAL or until the parent dies (SIGINT and SIGTERM are the parent's to handle: it drains
    the front-ends first, then stops the engines)."""
    configure_child_logging(log_level, f"engine-{replica}")
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(ENGINE_STOP_SIGNAL, lambda *_: stop.set())
    watch_parent(parent_pid, stop.set)
    service = EngineService(spec, replica, incarnation)
    if os.path.exists(address):
        os.unlink(address)  # a previous incarnation's socket
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    threading.Thread(target=service.accept_forever, args=(listener,), daemon=True).start()
    loop = threading.Thread(target=_run_logged, args=(service,), name="engine-loop", daemon=True)
    loop.start()
    stop.wait()
    if service.state in ("ready", "failed") and loop.is_alive():
        service._commands.put(("stop",))  # fails what is still in flight with "shutting down"
        loop.join(10.0)
    close = getattr(service.engine, "close", None)  # tensor-parallel workers, if any
    if close is not None:
        try:
            close()
        except Exception:
            logger.exception("closing the engine failed")
    listener.close()
    service.close_peers()
    try:
        os.unlink(address)
    except OSError:
        pass
    logging.shutdown()
    os._exit(0)  # torch's and the tokenizer's worker threads must not hold the exit


def _run_logged(service: EngineService) -> None:
    try:
        service._run()
    except BaseException:
        logger.error("engine loop crashed:\n%s", traceback.format_exc())
        os._exit(1)  # the supervisor sees the exit and restarts the replica


# ---- in the parent: spawning and supervising -------------------------------------------------------------


class SupervisedProcess:
    """One child process that is restarted when it dies: target(*args, incarnation, parent_pid);
    stop_signal asks it to exit."""

    def __init__(
        self, name: str, target: Callable, args: tuple, stop_signal: signal.Signals = signal.SIGTERM
    ) -> None:
        self.name = name
        self.stop_signal = stop_signal
        self.target = target
        self.args = args
        self.incarnation = 0
        self.process: multiprocessing.Process | None = None
        self.started_at = 0.0
        self.quick_deaths = 0  # consecutive deaths soon after start: back off

    def start(self) -> None:
        # spawn, not fork: the parent may hold threads, an event loop and torch state.
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(
            target=self.target,
            args=(*self.args, self.incarnation, os.getpid()),
            name=self.name,
            daemon=False,  # an engine may start worker processes of its own (tensor parallelism)
        )
        self.process.start()
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    """Starts the children, restarts any that dies (logged, with back-off on crash loops), and stops
    them all: each its stop signal, then SIGKILL for whatever has not exited by the deadline."""

    def __init__(self, children: list[SupervisedProcess]) -> None:
        self.children = children
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for child in self.children:
            child.start()
        self._thread = threading.Thread(target=self._watch, name="fast-inference-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            by_sentinel = {c.process.sentinel: c for c in self.children if c.process is not None}
            for sentinel in multiprocessing.connection.wait(list(by_sentinel), timeout=0.5):
                if self._stopping.is_set():
                    return
                child = by_sentinel[sentinel]
                child.process.join()
                lived = time.monotonic() - child.started_at
                child.quick_deaths = child.quick_deaths + 1 if lived < 10.0 else 0
                delay = min(30.0, 0.5 * 2**child.quick_deaths) if child.quick_deaths else 0.2
                logger.error(
                    "%s (pid %d) %s after %.1f s; restarting it in %.1f s",
                    child.name,
                    child.process.pid,
                    describe_exit(child.process.exitcode),
                    lived,
                    delay,
                )
                child.process = None
                if self._stopping.wait(delay):
                    return
                child.incarnation += 1
                child.start()

    def stop(self, timeout: float = 10.0, children: list[SupervisedProcess] | None = None) -> None:
        """Stop restarting, then signal the children (all, or the ones given) and wait for them."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        targets = [c for c in (children or self.children) if c.process is not None]
        for child in targets:
            if child.process.is_alive():
                os.kill(child.process.pid, child.stop_signal)
        deadline = time.monotonic() + timeout
        for child in targets:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                logger.warning("%s (pid %d) did not stop in time: killing it", child.name, child.process.pid)
                child.process.kill()
                child.process.join(5.0)
