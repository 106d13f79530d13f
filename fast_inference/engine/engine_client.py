"""EngineClient: one engine process seen from a front-end's event loop, with AsyncEngine's request surface
(add_request -> RequestStream, abort, embed, get_stats); it reconnects when the process is restarted."""

import asyncio
import itertools
import logging
import pickle
import time
from collections.abc import Callable
from typing import Any

from .async_engine import EngineDeadError, RequestStream
from .engine_process import FRAME_HEADER, encode_frame, error_from_wire
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger("fast_inference.engine")

_RECONNECT_DELAY = 0.1  # seconds between connection attempts while the process is (re)starting
_LARGE_FRAME = 256 * 1024  # frames this big (the tokenizer, once per connection) unpickle off the loop


class EngineClient:
    """The front-end's end of one engine process's socket.

    state: connecting (no connection yet) | loading | ready | failed (the engine could not load, or
    failed repeatedly) | dead (the process went away: its requests failed with EngineDeadError; the
    supervisor restarts it and this client reconnects) | stopped (closed by us)."""

    def __init__(self, address: str, replica: int, on_change: Callable[["EngineClient"], None]) -> None:
        self.address = address
        self.replica = replica
        self.state = "connecting"
        self.error: str | None = None
        self.pid: int | None = None
        self.incarnation = 0  # how many times the supervisor restarted the process
        self.info: dict | None = None  # model_config, tokenizer, ... from the first 'ready'
        self.stats_snapshot: dict = {}
        self.routed_requests = 0  # requests this front-end sent to it
        self.inflight_tokens = 0  # prompt tokens of this front-end's requests still running on it
        self._on_change = on_change
        self._streams: dict[str, RequestStream] = {}
        self._prompt_tokens: dict[str, int] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    # -- connection ------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._connect_forever())

    async def _connect_forever(self) -> None:
        while not self._closing:
            try:
                reader, writer = await asyncio.open_unix_connection(self.address, limit=1 << 20)
            except OSError:
                await asyncio.sleep(_RECONNECT_DELAY)
                continue
            self._writer = writer
            try:
                await self._read(reader)
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                pass
            self._writer = None
            writer.close()
            if self._closing:
                return
            what = f"engine replica {self.replica} (pid {self.pid}) went away"
            logger.error("%s: failing its %d request(s); waiting for its restart", what, len(self._streams))
            self.state = "dead"
            self.error = what
            self.stats_snapshot = {}
            self._fail_everything(EngineDeadError(f"{what} while serving this request"))
            self._on_change(self)
            await asyncio.sleep(_RECONNECT_DELAY)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            header = await reader.readexactly(FRAME_HEADER.size)
            payload = await reader.readexactly(FRAME_HEADER.unpack(header)[0])
            if len(payload) >= _LARGE_FRAME:
                message = await loop.run_in_executor(None, pickle.loads, payload)
            else:
                message = pickle.loads(payload)
            self._handle(message)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            _, outputs, stats = message
            self.stats_snapshot = stats
            self._deliver(outputs)
        elif kind == "accepted":
            for request_id in message[1]:
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream._accept()
        elif kind == "failed":
            _, request_ids, wire = message
            for request_id in request_ids:
                stream = self._forget(request_id)
                if stream is not None:
                    stream._fail(error_from_wire(wire))
        elif kind == "result":
            _, token, value, wire = message
            future = self._replies.pop(token, None)
            if future is not None and not future.done():
                if wire is None:
                    future.set_result(value)
                else:
                    future.set_exception(error_from_wire(wire))
        elif kind == "state":
            info = message[1]
            self.state = info["state"]
            self.error = info["error"]
            self.pid = info["pid"]
            self.incarnation = info["incarnation"]
            self.stats_snapshot = info["stats"]
            if "model_config" in info and self.info is None:
                self.info = info
            self._on_change(self)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        streams = self._streams
        for output in outputs:
            stream = streams.get(output.request_id)
            if stream is None:
                continue
            stream._put(output)
            if output.finished:
                self._forget(output.request_id)

    def _forget(self, request_id: str) -> RequestStream | None:
        self.inflight_tokens -= self._prompt_tokens.pop(request_id, 0)
        return self._streams.pop(request_id, None)

    def _fail_everything(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        self._prompt_tokens.clear()
        self.inflight_tokens = 0
        for stream in streams.values():
            stream._fail(error)
        replies, self._replies = self._replies, {}
        for future in replies.values():
            if not future.done():
                future.set_exception(error)

    def _send(self, message: tuple) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise EngineDeadError(f"engine replica {self.replica} is not connected ({self.state})")
        writer.write(encode_frame(message))

    async def close(self) -> None:
        """Fail what is in flight ("shutting down") and drop the connection."""
        self._closing = True
        self.state = "stopped"
        self._fail_everything(EngineDeadError("the server is shutting down"))
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    # -- AsyncEngine's request surface -------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        max_tokens_must_fit: bool = False,
    ) -> RequestStream:
        if self.state != "ready":
            raise EngineDeadError(f"engine replica {self.replica} is not ready ({self.state})")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._send(("add", request_id, prompt, params, time.time(), max_tokens_must_fit))
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        tokens = len(prompt)
        self._prompt_tokens[request_id] = tokens
        self.inflight_tokens += tokens
        self.routed_requests += 1
        try:
            await stream._accepted
        except BaseException:
            stream.finished = True
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        if self._forget(request_id) is None:
            return
        try:
            self._send(("abort", request_id))
        except EngineDeadError:
            pass  # the process is gone, and the request with it

    async def _ask(self, message: tuple) -> Any:
        token = next(self._tokens)
        future = asyncio.get_running_loop().create_future()
        self._replies[token] = future
        try:
            self._send((message[0], token, *message[1:]))
        except EngineDeadError:
            self._replies.pop(token, None)
            raise
        return await future

    async def embed(
        self, token_id_lists: list[list[int]], truncate_prompt_tokens: int | None = None
    ) -> list[list[float]]:
        if self.state != "ready":
            raise EngineDeadError(f"engine replica {self.replica} is not ready ({self.state})")
        return await self._ask(("embed", token_id_lists, truncate_prompt_tokens))

    async def get_stats(self) -> dict:
        if self.state == "ready":
            self.stats_snapshot = {**self.stats_snapshot, **await self._ask(("stats",))}
        return dict(self.stats_snapshot)
