"""A tiny raw-socket HTTP/1.1 client for tests that need exact bytes (malformed, pipelined, slow, SSE)."""

import json
import socket
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class RawConn:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before {marker!r}; got {self.buf[:200]!r}")
        head, self.buf = self.buf.split(marker, 1)
        return head

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed mid-body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_head(self) -> tuple[int, dict[str, str]]:
        while True:
            head = self._read_until(b"\r\n\r\n").decode("latin-1")
            lines = head.split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if status != 100:
                return status, headers

    def iter_chunks(self):
        """Yield the decoded chunks of a chunked body as they arrive."""
        while True:
            size = int(self._read_until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                self._read_until(b"\r\n")
                return
            data = self._read_exact(size)
            self._read_exact(2)
            yield data

    def read_response(self) -> RawResponse:
        status, headers = self.read_head()
        if "content-length" in headers:
            body = self._read_exact(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b"".join(self.iter_chunks())
        else:
            while self._fill():
                pass
            body, self.buf = self.buf, b""
        return RawResponse(status, headers, body)

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True if the server closed the connection (EOF) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def request(
    method: str,
    path: str,
    body: bytes | dict | None = None,
    headers: dict | None = None,
    version: str = "1.1",
) -> bytes:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
        if not any(k.lower() == "content-type" for k in (headers or {})):
            lines.append("Content-Type: application/json")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def call(port: int, method: str, path: str, body=None, headers=None) -> RawResponse:
    conn = RawConn(port)
    try:
        conn.send(request(method, path, body, headers))
        return conn.read_response()
    finally:
        conn.close()


def sse_events(port: int, path: str, body: dict, headers: dict | None = None) -> tuple[int, list]:
    """POST a streaming request; returns (status, events) where events are dicts, or 'DONE'."""
    conn = RawConn(port, timeout=60)
    try:
        conn.send(request("POST", path, body, headers))
        status, head = conn.read_head()
        if status != 200:
            body_bytes = conn._read_exact(int(head["content-length"]))
            return status, [json.loads(body_bytes)]
        assert head["content-type"].startswith("text/event-stream")
        data = b"".join(conn.iter_chunks()).decode()
    finally:
        conn.close()
    events = []
    assert data.endswith("\n\n")
    for block in data.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append("DONE" if payload == "[DONE]" else json.loads(payload))
    return 200, events
