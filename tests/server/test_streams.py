"""Disconnects abort engine work and free KV blocks; 64 concurrent streams equal their greedy answers."""

import asyncio
import time

import openai

from .conftest import MODEL_NAME
from .rawhttp import RawConn, call, request


def wait_idle(server, timeout: float = 10.0) -> dict:
    """Engine stats once nothing runs or waits (polled on the engine thread)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.call(server.server.engine.get_stats)
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy: {stats}")
        time.sleep(0.02)


def _long(stream: bool) -> dict:
    return {
        "model": MODEL_NAME,
        "prompt": "The quick brown fox",
        "max_tokens": 200,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def test_disconnect_mid_stream_frees_blocks(server):
    before = wait_idle(server)
    conn = RawConn(server.port, timeout=30)
    conn.send(request("POST", "/v1/completions", _long(True)))
    status, _ = conn.read_head()
    assert status == 200
    chunks = conn.iter_chunks()
    for _ in range(3):
        next(chunks)
    busy = server.call(server.server.engine.get_stats)
    assert busy["num_running"] + busy["num_waiting"] == 1
    conn.close()
    after = wait_idle(server)
    assert after["num_free_blocks"] == before["num_free_blocks"]
    assert server.server.app.inflight == 0


def test_disconnect_non_streaming_aborts(server):
    before = wait_idle(server)
    steps = server.server.engine.step_count
    conn = RawConn(server.port, timeout=30)
    conn.send(request("POST", "/v1/completions", _long(False)))
    deadline = time.monotonic() + 10
    while server.server.engine.step_count < steps + 3:  # the request is generating
        assert time.monotonic() < deadline
        time.sleep(0.005)
    conn.close()
    after = wait_idle(server)
    assert after["num_free_blocks"] == before["num_free_blocks"]
    assert server.server.app.inflight == 0


def test_64_concurrent_streams_match_greedy(server):
    prompts = [f"Request {i}: the number is {i * 7}" for i in range(64)]

    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120
        ) as client:

            async def streamed(prompt):
                stream = await client.completions.create(
                    model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True
                )
                parts, finishes = [], 0
                async for chunk in stream:
                    for c in chunk.choices:
                        parts.append(c.text)
                        finishes += c.finish_reason is not None
                assert finishes == 1
                return "".join(parts)

            streams = await asyncio.gather(*(streamed(p) for p in prompts))
            singles = [
                (await client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=24, temperature=0))
                .choices[0]
                .text
                for p in prompts
            ]
            return streams, singles

    streams, singles = asyncio.run(main())
    assert len(streams) == 64
    for i, (a, b) in enumerate(zip(streams, singles)):
        assert a == b, f"stream {i} differs from its non-streamed greedy answer"
    wait_idle(server)


def test_fault_mid_stream_sends_error_then_done(model_dir, schemas):
    import json

    from .conftest import start_server

    thread = start_server(model_dir)
    try:
        engine = thread.server.engine.engine
        real_step = engine.step
        conn = RawConn(thread.port, timeout=30)
        conn.send(
            request(
                "POST",
                "/v1/chat/completions",
                {
                    "model": MODEL_NAME,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 200,
                    "ignore_eos": True,
                    "stream": True,
                },
            )
        )
        status, _ = conn.read_head()
        assert status == 200
        chunks = conn.iter_chunks()
        next(chunks)
        next(chunks)

        def broken_step():
            raise RuntimeError("device fault")

        engine.step = broken_step  # the next engine step fails
        rest = b"".join(chunks).decode()
        conn.close()
        events = [block[len("data: ") :] for block in rest.split("\n\n") if block]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])
        schemas.validate("ErrorResponse", error)
        assert error["error"]["type"] == "server_error" and "device fault" not in error["error"]["message"]
        engine.step = real_step
        # the server keeps serving
        r = call(
            thread.port, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2}
        )
        assert r.status == 200
    finally:
        thread.stop()


def test_persistent_engine_fault_marks_unhealthy(model_dir):
    from .conftest import start_server

    thread = start_server(model_dir)
    try:
        engine = thread.server.engine.engine

        def broken_step():
            raise RuntimeError("device lost")

        engine.step = broken_step
        r = call(
            thread.port, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 5}
        )
        assert r.status == 503 and "device lost" not in r.body.decode()
        deadline = time.monotonic() + 30
        while call(thread.port, "GET", "/health").status != 503:
            assert time.monotonic() < deadline, "engine never marked unhealthy"
            time.sleep(0.05)
        assert (
            "consecutive engine steps failed"
            in call(thread.port, "GET", "/health").json()["error"]["message"]
        )
        r = call(
            thread.port, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 5}
        )
        assert r.status == 503
    finally:
        thread.stop()
