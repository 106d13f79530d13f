"""AsyncEngine: runs LLMEngine on its own thread and hands each request's outputs to asyncio consumers."""

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger("fast_inference.engine")

_MAX_CONSECUTIVE_FAILURES = 10


class EngineDeadError(RuntimeError):
    """The engine thread failed; the request cannot complete."""


class RequestStream:
    """The outputs of one request, consumed on the event loop.

    The engine sends deltas; a consumer slower than the engine gets the deltas it missed folded into
    one (RequestOutput.add), so it never falls behind by more than one output and never re-derives them.
    """

    __slots__ = ("request_id", "_engine", "_latest", "_error", "_waiter", "_accepted", "finished")

    def __init__(self, request_id: str, engine: "AsyncEngine") -> None:
        self.request_id = request_id
        self._engine = engine
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.finished = False

    # engine thread -> loop (always called on the loop thread)
    def _put(self, output: RequestOutput) -> None:
        if self._latest is None:
            self._latest = output
        else:
            self._latest.add(output)
        if output.finished:
            self.finished = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self.finished = True
        if not self._accepted.done():
            self._accepted.set_exception(error)
        self._wake()

    def _accept(self) -> None:
        if not self._accepted.done():
            self._accepted.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # consumer side
    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        while self._latest is None:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self.finished:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        output, self._latest = self._latest, None
        return output

    def abort(self) -> None:
        """Stop the request in the engine (client went away); a no-op once it has finished."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)
            self._wake()  # a consumer waiting on it (another task cancelled it) ends instead of hanging


class EngineLoop:
    """The engine thread's loop: it owns the engine, applies queued commands (add, abort, embed -- pending
    ones batched into one call --, stats, stop) between steps and reports what happened through the
    _send_* methods. AsyncEngine sends onto its event loop; the engine process sends over its socket."""

    def __init__(self, engine_factory: Callable[[], Any]) -> None:
        self._factory = engine_factory
        self.engine: Any = None
        self.state = "loading"  # loading | ready | failed | stopped
        self.error: str | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self.stats_snapshot: dict = {}
        self.step_count = 0
        self._failures = 0  # consecutive failed steps
        self._active: set[str] = set()  # engine thread only: ids added and not yet finished or aborted

    # -- where events go (called on the engine thread) -------------------------------------------------
    def _send_state(self) -> None:
        """The engine loaded (state ready) or failed to (failed), or was marked failed later."""
        raise NotImplementedError

    def _send_step(self, outputs: list[RequestOutput]) -> None:
        """One step ran; stats_snapshot holds the stats after it."""
        raise NotImplementedError

    def _send_accepted(self, request_ids: list[str]) -> None:
        raise NotImplementedError

    def _send_failed(self, request_ids: list[str], error: BaseException) -> None:
        """These requests end with `error` (refused by the intake, step failure, shutdown)."""
        raise NotImplementedError

    def _send_fail_all(self, error: BaseException) -> None:
        raise NotImplementedError

    def _send_result(self, reply_to: Any, result: Any, error: BaseException | None) -> None:
        """The answer to an embed or stats command (reply_to is what the command carried)."""
        raise NotImplementedError

    # -- the loop ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._factory()
            self.stats_snapshot = self.engine.stats()
            self.state = "ready"
        except BaseException as exc:  # report any load failure through /health
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            logger.error("engine failed to load: %s\n%s", self.error, traceback.format_exc())
            self._send_state()
            return
        self._send_state()
        engine = self.engine
        commands = self._commands
        while True:
            batch = []
            if self.state != "ready" or not engine.has_unfinished_requests():
                batch.append(commands.get())  # idle (or failed): sleep until there is a command
            while True:
                try:
                    batch.append(commands.get_nowait())
                except queue.Empty:
                    break
            if not self._apply(batch):
                self.state = "stopped"
                # Whatever was queued with or after the stop gets an answer instead of waiting forever.
                while True:
                    try:
                        batch.append(commands.get_nowait())
                    except queue.Empty:
                        break
                self._reject(batch)
                return
            if self.state == "ready" and engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception as exc:
                    self._step_failed(exc)
                    continue
                self.step_count += 1
                self._failures = 0
                self.stats_snapshot = engine.stats()
                for output in outputs:
                    if output.finished:
                        self._active.discard(output.request_id)
                self._send_step(outputs)

    def _reject(self, batch: list[tuple]) -> None:
        error = EngineDeadError("the server is shutting down")
        for command in batch:
            if command[0] == "add":
                self._send_failed([command[1]], error)
            elif command[0] == "embed":
                self._send_result(command[2], None, error)
            elif command[0] == "stats":
                self._send_result(command[1], dict(self.stats_snapshot), None)

    def _apply(self, batch: list[tuple]) -> bool:
        """Run queued commands on the engine thread; False once asked to stop."""
        engine = self.engine
        embeds = []
        accepted: list[str] = []
        for command in batch:
            kind = command[0]
            if kind == "add":
                _, request_id, prompt, params, arrival, must_fit = command
                if self.state != "ready":
                    self._send_failed([request_id], EngineDeadError(f"engine is {self.state}: {self.error}"))
                    continue
                try:
                    engine.add_request(
                        request_id, prompt, params, arrival_time=arrival, max_tokens_must_fit=must_fit
                    )
                    accepted.append(request_id)
                    self._active.add(request_id)
                except Exception as exc:
                    self._send_failed([request_id], exc)
            elif kind == "abort":
                if command[1] not in self._active:
                    continue
                self._active.discard(command[1])
                try:
                    engine.abort_request(command[1])
                except Exception:  # already finished or never added: nothing to free
                    pass
            elif kind == "embed":
                embeds.append(command)
            elif kind == "stats":
                self._send_result(command[1], engine.stats(), None)
            elif kind == "stop":
                self._abort_all()
                self._send_fail_all(EngineDeadError("the server is shutting down"))
                self._reject(embeds)
                return False
        if accepted:
            self._send_accepted(accepted)
        if embeds:
            self._embed_batch(embeds)
        return True

    def _embed_batch(self, embeds: list[tuple]) -> None:
        """Pending embed requests with the same truncation in one engine call; when that call refuses an
        input, each request again on its own, so one bad request does not fail its neighbours."""
        groups: dict[int | None, list[tuple]] = {}
        for command in embeds:
            groups.setdefault(command[3], []).append(command)
        for truncate, group in groups.items():
            flat: list[list[int]] = [ids for _, lists, _, _ in group for ids in lists]
            try:
                vectors = (
                    (self.engine.embed(flat) if truncate is None else self.engine.embed(flat, truncate))
                    .float()
                    .cpu()
                    .tolist()
                )
            except Exception as exc:
                if len(group) == 1:
                    self._send_result(group[0][2], None, exc)
                else:
                    for command in group:
                        self._embed_batch([command])
                continue
            start = 0
            for _, lists, reply_to, _ in group:
                self._send_result(reply_to, vectors[start : start + len(lists)], None)
                start += len(lists)

    def _step_failed(self, exc: Exception) -> None:
        """Fail the requests in flight (not later ones); after repeated failures mark the engine failed."""
        self._failures += 1
        if self._failures <= 3:
            logger.error("engine step failed: %s\n%s", exc, traceback.format_exc())
        ids = list(self._active)
        self._abort_all()
        fatal = getattr(exc, "fatal", False)  # e.g. a tensor-parallel worker died: no later step can run
        detail = f": {exc}" if fatal else ""
        self._send_failed(ids, EngineDeadError(f"engine step failed: {type(exc).__name__}{detail}"))
        if fatal:
            self._failures = _MAX_CONSECUTIVE_FAILURES
        if self._failures >= _MAX_CONSECUTIVE_FAILURES:
            self.error = (
                f"{type(exc).__name__}: {exc}"
                if fatal
                else f"{_MAX_CONSECUTIVE_FAILURES} consecutive engine steps failed, last: {type(exc).__name__}"
            )
            self.state = "failed"  # /health answers 503 from now on; new requests are refused
            logger.error("engine marked failed: %s", self.error)
            self._send_state()
        time.sleep(min(0.5, 0.005 * 2**self._failures))  # do not spin on a persistent fault

    def _abort_all(self) -> None:
        for request_id in list(self._active):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                pass
        self._active.clear()


class AsyncEngine(EngineLoop):
    """Owns the engine thread. The event loop only enqueues commands and receives outputs; it never
    waits on model compute."""

    def __init__(self, engine_factory: Callable[[], Any]) -> None:
        super().__init__(engine_factory)
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="fast-inference-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def wait_ready(self, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, self._ready.wait, timeout)
        if not ok:
            raise TimeoutError("engine did not become ready in time")
        if self.state != "ready":
            raise EngineDeadError(f"engine failed to start: {self.error}")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything and stop the engine thread (blocking; call from a worker or after the loop)."""
        if self._thread is None:
            return
        self._commands.put(("stop",))
        self._thread.join(timeout)
        self._thread = None
        close = getattr(self.engine, "close", None)  # tensor-parallel workers, if any
        if close is not None:
            close()

    # -- the served model, for the server (read once the engine is ready; nothing else reaches inside) --
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        """max_model_len, vocab_size, dtype, device, architecture, model_path, ... of the served model."""
        return self.engine.model_config

    @property
    def supports_generation(self) -> bool:
        """False for an embedding-only engine (EncoderEngine): the server answers generation with 400."""
        return self.engine.supports_generation

    @property
    def kv_cache_blocks(self) -> tuple[int, int]:
        """(number of KV-cache blocks, tokens per block)."""
        return self.engine.num_total_blocks, self.engine.block_size

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def replica_states(self) -> list[dict]:
        """One entry per engine replica process (data_parallel.py); an in-process engine has none."""
        return []

    # -- loop-side API -------------------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        max_tokens_must_fit: bool = False,
    ) -> RequestStream:
        """Queue a request; returns once the engine has accepted it (raises the engine's
        InvalidRequestError if it refused)."""
        if self.state != "ready":
            raise EngineDeadError(f"engine is not ready ({self.state})")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt, params, time.time(), max_tokens_must_fit))
        if self.state == "stopped":  # the engine thread may have drained its queue already
            self._fail_one(request_id, EngineDeadError("the server is shutting down"))
        try:
            await stream._accepted
        except BaseException:
            # Refused, or cancelled while waiting for the ack: make sure it does not run.
            stream.finished = True
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))

    async def embed(
        self, token_id_lists: list[list[int]], truncate_prompt_tokens: int | None = None
    ) -> list[list[float]]:
        if self.state != "ready":
            raise EngineDeadError(f"engine is not ready ({self.state})")
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("embed", token_id_lists, future, truncate_prompt_tokens))
        if self.state == "stopped":
            _resolve(future, None, EngineDeadError("the server is shutting down"))
        return await future

    async def get_stats(self) -> dict:
        """Fresh engine stats, read on the engine thread."""
        if self.state != "ready":
            return dict(self.stats_snapshot)
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("stats", future))
        if self.state == "stopped":
            _resolve(future, dict(self.stats_snapshot), None)
        return await future

    # -- engine thread -> loop -----------------------------------------------------------------------
    def _call(self, fn: Callable, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closed between the check and the call
                pass

    def _send_state(self) -> None:
        self._ready.set()

    def _send_step(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            self._call(self._deliver, outputs)

    def _send_accepted(self, request_ids: list[str]) -> None:
        self._call(self._accept_many, request_ids)

    def _send_failed(self, request_ids: list[str], error: BaseException) -> None:
        self._call(self._fail_ids, request_ids, error)

    def _send_fail_all(self, error: BaseException) -> None:
        self._call(self._fail_all, error)

    def _send_result(self, reply_to: Any, result: Any, error: BaseException | None) -> None:
        self._call(_resolve, reply_to, result, error)

    # -- loop thread callbacks ------------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        deliver_outputs(self._streams, outputs)

    def _accept_many(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream._accept()

    def _fail_one(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._fail(exc)

    def _fail_ids(self, request_ids: list[str], exc: BaseException) -> None:
        for request_id in request_ids:
            self._fail_one(request_id, exc)

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(exc)


def deliver_outputs(streams: dict[str, RequestStream], outputs: list[RequestOutput]) -> None:
    """Hand one step's deltas to their streams (on the loop thread); finished ones leave `streams`."""
    for output in outputs:
        stream = streams.get(output.request_id)
        if stream is None:
            continue
        stream._put(output)
        if output.finished:
            del streams[output.request_id]


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
