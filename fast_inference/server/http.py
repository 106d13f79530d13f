"""HTTP/1.1 on asyncio streams + h11: keep-alive, request bodies, chunked responses, limits, timeouts, drain."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import h11

from .errors import APIError

logger = logging.getLogger("fast_inference.server")

_READ_SIZE = 65536
_WRITE_HIGH_WATER = 256 * 1024
_PIPELINE_BUFFER_LIMIT = 1 << 20
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


@dataclass(slots=True)
class Limits:
    """Per-server protection against oversized and slow clients (slowloris) and overload."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 16 * 1024  # request line + all headers
    max_header_count: int = 100
    header_timeout: float = 10.0  # from the first byte of a request to the end of its head
    body_timeout: float = 30.0  # longest gap between two reads of a request body
    idle_timeout: float = 60.0  # keep-alive: longest wait for the next request on an open connection
    write_timeout: float = 60.0  # longest a client may leave our writes unread
    max_connections: int = 1024


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    client: str
    http_version: str = "1.1"
    started: float = 0.0  # perf_counter() when the app began handling it


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    logged_by_job: bool = False  # the handler already wrote this request's log line


@dataclass(slots=True)
class StreamingResponse:
    """A chunked response: `chunks` yields ready-to-send bytes (e.g. SSE events)."""

    status: int
    chunks: AsyncIterator[bytes]
    content_type: str = "text/event-stream"
    headers: list[tuple[str, str]] = field(default_factory=list)
    # Always called once the response is over, also when it never started (the generator's own
    # `finally` does not run if it was never iterated).
    on_close: Callable[[], None] | None = None


App = Callable[[Request], Awaitable[Response | StreamingResponse]]


def error_response(err: APIError, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(err.status, err.to_json(), headers=list(headers or []))


class _Close(Exception):
    """Stop serving this connection (after an optional final response has been written)."""


class HTTPServer:
    """Serves `app` on a listening socket; one _Connection (one coroutine) per client, requests in order."""

    def __init__(
        self,
        app: App,
        limits: Limits | None = None,
        on_error_headers: Callable[[Request | None], list[tuple[str, str]]] | None = None,
    ) -> None:
        self.app = app
        self.limits = limits or Limits()
        # Extra headers (CORS) for responses the HTTP layer writes itself (400, 413, 408...).
        self.on_error_headers = on_error_headers or (lambda _req: [])
        self._server: asyncio.base_events.Server | None = None
        self._connections: dict[asyncio.Task, _Connection] = {}
        self.draining = False
        self.port: int | None = None

    @property
    def num_connections(self) -> int:
        return len(self._connections)

    async def start(self, host: str, port: int, sock=None, reuse_port: bool = False) -> int:
        """reuse_port: SO_REUSEPORT, so that several API server processes listen on one port and the
        kernel spreads the connections over them."""
        if sock is not None:
            self._server = await asyncio.start_server(self._on_connection, sock=sock, backlog=2048)
        else:
            self._server = await asyncio.start_server(
                self._on_connection,
                host,
                port,
                backlog=2048,
                reuse_address=True,
                reuse_port=reuse_port or None,
            )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, close idle keep-alive connections, let in-flight requests finish up to `timeout`."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for task, connection in list(self._connections.items()):
            if connection.idle:
                task.cancel()
        pending = [t for t in self._connections if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            for task in still:
                task.cancel()
            if still:
                logger.warning("shutdown deadline reached: cancelled %d in-flight connection(s)", len(still))
                await asyncio.wait(still, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.draining or len(self._connections) >= self.limits.max_connections:
            err = APIError(
                503,
                "The server is overloaded: too many open connections"
                if not self.draining
                else "The server is shutting down",
                code="server_overloaded",
            )
            body = err.to_json()
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), 1.0)
            writer.close()
            return
        task = asyncio.current_task()
        connection = _Connection(self, reader, writer)
        self._connections[task] = connection
        try:
            await connection.serve()
        finally:
            self._connections.pop(task, None)


class _Connection:
    """One client connection: its h11 state machine, its streams and whether it sits idle between requests."""

    __slots__ = ("server", "limits", "reader", "writer", "client", "h11", "idle")

    def __init__(
        self, server: HTTPServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.limits = server.limits
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        self.idle = True  # waiting for the first byte of the next request (safe to drop on shutdown)

    async def serve(self) -> None:
        conn = self.h11
        try:
            while True:
                request = await self._read_request()
                if request is None:
                    break
                keep_alive = await self._dispatch(request)
                if not keep_alive or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                if self.server.draining:
                    break
                conn.start_next_cycle()
        except (_Close, ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # never let one connection's fault reach the event loop
            logger.exception("connection %s failed", self.client)
        finally:
            with contextlib.suppress(Exception):
                self.writer.close()

    async def _send_error_and_close(self, err: APIError, request: Request | None = None) -> None:
        """Answer a protocol-level fault (400/408/413/431) if the state allows, then close."""
        logger.info("%s HTTP %d: %s", request.client if request else "-", err.status, err.message)
        conn, reader, writer = self.h11, self.reader, self.writer
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = err.to_json()
            headers = [
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                ("connection", "close"),
                *self.server.on_error_headers(request),
            ]
            with contextlib.suppress(Exception):
                data = conn.send(
                    h11.Response(
                        status_code=err.status, headers=headers, reason=_REASONS.get(err.status, b"")
                    )
                )
                data += conn.send(h11.Data(data=body))
                data += conn.send(h11.EndOfMessage())
                writer.write(data)
                await asyncio.wait_for(writer.drain(), 1.0)
            # Lingering close: swallow what the client is still sending (e.g. the rest of an oversized
            # body) for a moment, so that closing with unread data does not reset the connection
            # before the client has read our answer.
            with contextlib.suppress(Exception):
                writer.write_eof()
                async with asyncio.timeout(1.0):
                    swallowed = 0
                    while swallowed < _PIPELINE_BUFFER_LIMIT:
                        data = await reader.read(_READ_SIZE)
                        if not data:
                            break
                        swallowed += len(data)
        raise _Close()

    async def _receive(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            data = await self.reader.read(_READ_SIZE)
        self.h11.receive_data(data)

    async def _read_request(self) -> Request | None:
        conn = self.h11
        limits = self.limits
        loop = asyncio.get_running_loop()
        head_deadline = loop.time() + limits.header_timeout if conn.trailing_data[0] else None
        self.idle = head_deadline is None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if head_deadline is None:
                        try:
                            await self._receive(limits.idle_timeout)
                        except TimeoutError:
                            return None  # an idle keep-alive connection: close quietly
                        self.idle = False
                        head_deadline = loop.time() + limits.header_timeout
                    else:
                        remaining = head_deadline - loop.time()
                        if remaining <= 0:
                            raise TimeoutError
                        await self._receive(remaining)
                    continue
                if isinstance(event, h11.Request):
                    break
                return None  # ConnectionClosed (or anything else before a request): done
        except TimeoutError:
            await self._send_error_and_close(APIError(408, "Timed out reading the request head"))
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in (400, 413, 414, 431) else 400
            await self._send_error_and_close(APIError(status, f"Malformed HTTP request: {exc}"))
        self.idle = False
        if len(event.headers) > limits.max_header_count:
            await self._send_error_and_close(
                APIError(431, f"Too many request headers (limit {limits.max_header_count})")
            )
        # h11 bounds only a head still incomplete in its buffer; one that arrived whole is checked here.
        head_size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
        if head_size > limits.max_header_bytes:
            await self._send_error_and_close(
                APIError(431, f"Request head exceeds the limit of {limits.max_header_bytes} bytes")
            )
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1")
            val = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {val}" if key in headers else val
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        request = Request(
            event.method.decode("ascii"),
            path,
            query,
            headers,
            b"",
            self.client,
            event.http_version.decode("ascii"),
        )
        request.body = await self._read_body(request)
        return request

    async def _read_body(self, request: Request) -> bytes:
        conn = self.h11
        limits = self.limits
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            await self._send_error_and_close(
                APIError(
                    413, f"Request body of {length} bytes exceeds the limit of {limits.max_body_bytes} bytes"
                ),
                request,
            )
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if conn.client_is_waiting_for_100_continue:
                        self.writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                    await self._receive(limits.body_timeout)
                    continue
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > limits.max_body_bytes:
                        await self._send_error_and_close(
                            APIError(413, f"Request body exceeds the limit of {limits.max_body_bytes} bytes"),
                            request,
                        )
                    parts.append(event.data)
                    continue
                if isinstance(event, h11.EndOfMessage):
                    break
                raise _Close()  # ConnectionClosed mid-body
        except TimeoutError:
            await self._send_error_and_close(APIError(408, "Timed out reading the request body"), request)
        except h11.RemoteProtocolError as exc:
            await self._send_error_and_close(APIError(400, f"Malformed HTTP request body: {exc}"), request)
        return b"".join(parts) if len(parts) != 1 else parts[0]

    # -- one request ---------------------------------------------------------------------------------
    async def _dispatch(self, request: Request) -> bool:
        if request.method != "POST":
            # Cheap requests (health, models, metrics) are answered in line: no disconnect watch needed.
            return await self._respond(request)
        # Work that may wait on the engine: watch the socket so that a client that goes away cancels
        # the handler (whose cleanup aborts the engine request).
        respond = asyncio.ensure_future(self._respond(request))
        pipelined: list[bytes] = []
        watch = asyncio.ensure_future(self._watch_disconnect(pipelined))
        try:
            done, _ = await asyncio.wait((respond, watch), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            respond.cancel()
            watch.cancel()
            with contextlib.suppress(BaseException):
                await respond
            raise
        if respond in done:
            watch.cancel()
            with contextlib.suppress(BaseException):
                await watch
            for data in pipelined:
                self.h11.receive_data(data)
            return respond.result()
        # The client closed (or reset) its side: abandon the request.
        with contextlib.suppress(BaseException):
            watch.result()  # a reset surfaces here; retrieve it so it is not reported as unhandled
        respond.cancel()
        with contextlib.suppress(BaseException):
            await respond
        return False

    async def _watch_disconnect(self, pipelined: list[bytes]) -> None:
        buffered = 0
        while buffered < _PIPELINE_BUFFER_LIMIT:
            data = await self.reader.read(_READ_SIZE)
            if not data:
                return
            pipelined.append(data)  # a pipelined next request: keep it for the next cycle
            buffered += len(data)
        await asyncio.Event().wait()  # enough buffered: stop reading (back-pressure) until cancelled

    async def _respond(self, request: Request) -> bool:
        server = self.server
        try:
            response = await server.app(request)
        except APIError as err:
            response = error_response(err, server.on_error_headers(request))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("unhandled error in %s %s", request.method, request.path)
            response = error_response(
                APIError(500, "Internal server error"), server.on_error_headers(request)
            )
        extra = [("connection", "close")] if server.draining else []
        if isinstance(response, Response):
            conn = self.h11
            headers = [
                ("content-type", response.content_type),
                ("content-length", str(len(response.body))),
                *response.headers,
                *extra,
            ]
            data = conn.send(
                h11.Response(
                    status_code=response.status, headers=headers, reason=_REASONS.get(response.status, b"")
                )
            )
            if response.body and request.method != "HEAD":
                data += conn.send(h11.Data(data=response.body))
            data += conn.send(h11.EndOfMessage())
            self.writer.write(data)
            if self.writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                await self._drain()
            return True
        return await self._stream(response, extra)

    async def _stream(self, response: StreamingResponse, extra: list[tuple[str, str]]) -> bool:
        conn, writer = self.h11, self.writer
        headers = [
            ("content-type", response.content_type),
            ("cache-control", "no-cache"),
            *response.headers,
            *extra,
        ]
        chunks = response.chunks
        try:
            head = conn.send(
                h11.Response(
                    status_code=response.status, headers=headers, reason=_REASONS.get(response.status, b"")
                )
            )
            writer.write(head)
            # h11 picked the framing; for chunked (every HTTP/1.1 client) frame the hot path ourselves,
            # h11 keeps no per-chunk state for it and still writes the terminating chunk below.
            chunked = b"transfer-encoding: chunked" in head.lower()
            transport = writer.transport
            async for chunk in chunks:
                writer.write(
                    b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else conn.send(h11.Data(data=chunk))
                )
                if transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                    await self._drain()
            writer.write(conn.send(h11.EndOfMessage()))
        finally:
            # Runs the generator's cleanup (engine abort) now, also on disconnect or cancellation.
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()
            if response.on_close is not None:
                response.on_close()
        return True

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(self.limits.write_timeout):
                await self.writer.drain()
        except TimeoutError:
            raise _Close() from None
