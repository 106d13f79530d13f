"""Raw-socket HTTP behaviour: malformed requests, limits, slow clients, pipelining, disconnects, drain."""

import json
import socket
import threading
import time

import pytest

from fast_inference.server.http import Limits

from .conftest import MODEL_NAME, start_server
from .rawhttp import RawConn, call, request


def gen_body(**kw):
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0, **kw}


@pytest.fixture(scope="module")
def strict(model_dir):
    """A server with tight limits so the tests run fast."""
    limits = Limits(
        max_body_bytes=4096,
        max_header_bytes=2048,
        max_header_count=20,
        header_timeout=0.5,
        body_timeout=0.5,
        idle_timeout=1.0,
        max_connections=8,
    )
    thread = start_server(model_dir, limits=limits, max_pending_requests=4)
    yield thread
    thread.stop()


def assert_serving(port):
    assert call(port, "GET", "/health").status == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # a TLS hello
    ],
)
def test_malformed_gets_400_and_close(server, raw):
    conn = RawConn(server.port)
    conn.send(raw)
    r = conn.read_response()
    assert r.status == 400
    assert json.loads(r.body)["error"]["type"] == "invalid_request_error"
    assert conn.is_closed()
    conn.close()
    assert_serving(server.port)


def test_body_limits(strict):
    r = call(strict.port, "POST", "/v1/completions", b"x" * 5000)
    assert r.status == 413 and "limit" in r.json()["error"]["message"]
    # chunked body that grows past the limit
    conn = RawConn(strict.port)
    conn.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        conn.send(b"800\r\n" + b"a" * 0x800 + b"\r\n")
    assert conn.read_response().status == 413
    assert conn.is_closed()
    conn.close()
    assert_serving(strict.port)


def test_chunked_request_body(server):
    body = json.dumps(gen_body()).encode()
    conn = RawConn(server.port)
    conn.send(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n"
    )
    for i in range(0, len(body), 7):
        piece = body[i : i + 7]
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    conn.send(b"0\r\n\r\n")
    r = conn.read_response()
    assert r.status == 200 and r.json()["object"] == "text_completion"
    conn.close()


def test_expect_100_continue(server):
    body = json.dumps(gen_body()).encode()
    conn = RawConn(server.port)
    conn.send(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
        % len(body)
    )
    assert conn._read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 100")
    conn.send(body)
    assert conn.read_response().status == 200
    conn.close()


def test_header_limits(strict):
    r = call(strict.port, "GET", "/health", headers={"X-Big": "y" * 4000})
    assert r.status == 431
    r = call(strict.port, "GET", "/health", headers={f"X-H{i}": "1" for i in range(30)})
    assert r.status == 431
    assert_serving(strict.port)


def test_slow_header_timeout(strict):
    conn = RawConn(strict.port)
    conn.send(b"GET /health HTTP/1.1\r\n")
    time.sleep(0.3)
    conn.send(b"X-Slow: 1\r\n")  # still trickling: the deadline is for the whole head
    t0 = time.monotonic()
    r = conn.read_response()
    assert r.status == 408
    assert time.monotonic() - t0 < 3
    assert conn.is_closed()
    conn.close()
    assert_serving(strict.port)


def test_slow_body_timeout(strict):
    conn = RawConn(strict.port)
    conn.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    assert conn.read_response().status == 408
    conn.close()


def test_idle_keep_alive_closed(strict):
    conn = RawConn(strict.port)
    conn.send(request("GET", "/health"))
    assert conn.read_response().status == 200
    assert conn.is_closed(timeout=5.0)  # idle_timeout is 1 s
    conn.close()


def test_pipelined_keep_alive(server):
    conn = RawConn(server.port)
    conn.send(
        request("GET", "/ping")
        + request("POST", "/v1/completions", gen_body())
        + request("GET", "/v1/models")
        + request("POST", "/tokenize", {"prompt": "abc"})
    )
    first = conn.read_response()
    second = conn.read_response()
    third = conn.read_response()
    fourth = conn.read_response()
    assert first.body == b"pong"
    assert second.json()["object"] == "text_completion"
    assert third.json()["object"] == "list"
    assert fourth.json()["count"] > 0
    # still open for more
    conn.send(request("GET", "/health"))
    assert conn.read_response().status == 200
    conn.close()


def test_connection_close_and_http10(server):
    conn = RawConn(server.port)
    conn.send(request("GET", "/ping", headers={"Connection": "close"}))
    assert conn.read_response().body == b"pong"
    assert conn.is_closed()
    conn.close()
    conn = RawConn(server.port)
    conn.send(request("GET", "/ping", version="1.0"))
    assert conn.read_response().body == b"pong"
    assert conn.is_closed()
    conn.close()


def test_max_connections(strict):
    conns = [RawConn(strict.port) for _ in range(8)]
    for c in conns:  # make sure each is registered (a full request round trip)
        c.send(request("GET", "/ping"))
        assert c.read_response().status == 200
    extra = RawConn(strict.port)
    r = extra.read_response()
    assert r.status == 503 and r.json()["error"]["code"] == "server_overloaded"
    extra.close()
    for c in conns:
        c.close()
    time.sleep(0.2)
    assert_serving(strict.port)


def test_queue_limit_429(strict):
    # max_pending_requests=4: five long generations at once -> at least one 429 with an OpenAI body
    results = []

    def one():
        results.append(
            call(strict.port, "POST", "/v1/completions", gen_body(max_tokens=200, ignore_eos=True))
        )

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status for r in results)
    assert 429 in statuses and 200 in statuses
    for r in results:
        if r.status == 429:
            assert r.json()["error"]["code"] == "server_overloaded"


def test_internal_error_has_no_traceback(server, monkeypatch):
    app = server.server.app

    async def boom(request):
        raise RuntimeError("secret internal detail")

    monkeypatch.setitem(app.routes["/version"], "GET", boom)
    r = call(server.port, "GET", "/version")
    assert r.status == 500
    assert "secret" not in r.body.decode() and "Traceback" not in r.body.decode()
    assert r.json()["error"]["type"] == "server_error"
    assert_serving(server.port)


def test_graceful_shutdown_drains(model_dir):
    thread = start_server(model_dir, drain_timeout=30.0)
    port = thread.port
    conn = RawConn(port, timeout=60)
    conn.send(request("POST", "/v1/completions", gen_body(max_tokens=120, ignore_eos=True, stream=True)))
    status, _ = conn.read_head()
    assert status == 200
    chunks = conn.iter_chunks()
    next(chunks)
    stopper = threading.Thread(target=thread.stop)
    stopper.start()
    time.sleep(0.2)
    # new connections are refused while draining ...
    with pytest.raises(OSError):
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.sendall(request("GET", "/health"))
        if not s.recv(100):
            raise ConnectionResetError("closed")
    # ... and the in-flight stream still runs to the end
    data = b"".join(chunks)
    assert data.endswith(b"data: [DONE]\n\n")
    assert b'"finish_reason":"length"' in data
    conn.close()
    stopper.join(30)
    assert not stopper.is_alive()


def test_health_503_while_loading_then_200(model_dir):
    from .conftest import engine_factory

    release = threading.Event()
    real = engine_factory(model_dir)

    def slow_factory():
        release.wait(30)
        return real()

    thread = start_server(model_dir, factory=slow_factory, wait=False)
    try:
        r = call(thread.port, "GET", "/health")
        assert r.status == 503 and r.json()["error"]["code"] == "model_loading"
        busy = call(thread.port, "POST", "/v1/completions", gen_body())
        assert busy.status == 503
        assert call(thread.port, "GET", "/ping").status == 200
        release.set()
        deadline = time.monotonic() + 30
        while call(thread.port, "GET", "/health").status != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert call(thread.port, "POST", "/v1/completions", gen_body()).status == 200
    finally:
        release.set()
        thread.stop()


def test_failed_engine_reports_unhealthy(model_dir):
    def broken():
        raise RuntimeError("weights are corrupt")

    thread = start_server(model_dir, factory=broken)
    try:
        r = call(thread.port, "GET", "/health")
        assert r.status == 503 and "corrupt" in r.json()["error"]["message"]
        assert call(thread.port, "POST", "/v1/completions", gen_body()).status == 503
    finally:
        thread.stop()


def test_http10_stream_is_close_delimited(server):
    conn = RawConn(server.port)
    conn.send(request("POST", "/v1/completions", gen_body(stream=True), version="1.0"))
    r = conn.read_response()  # no content-length, no chunking: the body ends when the server closes
    conn.close()
    assert r.status == 200 and "transfer-encoding" not in r.headers
    assert r.body.startswith(b"data: {") and r.body.endswith(b"data: [DONE]\n\n")
