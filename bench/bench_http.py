"""HTTP-layer costs of the server: CPU per SSE chunk, GET /health req/s vs uvicorn+FastAPI, TTFT vs prefill.

    python bench/bench_http.py [--seconds 3] [--skip-fastapi]

1. sse_chunk: CPU time per streamed token chunk. `format_write` times the server's own hot path (an engine
   delta through ResponseBuilder.delta_chunk + chunk framing + transport write) on the event-loop thread;
   baselines: the naive path (build the chunk dict, json.dumps it, h11 framing, write) and the floor
   (pre-framed bytes into the transport).
   `server_loop` is the whole event-loop CPU per chunk of a live server streaming 20k tokens from an
   instant synthetic engine over TCP loopback (wake-up, delivery, deltas, format, write; the kernel's
   loopback send runs in the server thread and is included), with 1 and with 64 concurrent streams.
2. health: GET /health requests/s, one keep-alive load generator process with 16 connections against
   (a) this server and (b) a uvicorn + FastAPI app (same h11 parser, same asyncio loop, access log off)
   answering the same route; each server alone in its own process, measured in the same run.
3. ttft: time to first token at concurrency 1 (a client process streaming /v1/completions with max_tokens=1)
   against the engine's own time for the same work (LLMEngine.add_request + step in process), demo model.
FastAPI and uvicorn are benchmark-only dependencies (pip install fastapi uvicorn).
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONNECTIONS = 16
STEP_SECONDS = 0.0005  # the synthetic engine's step time (GIL released, like a real step's kernels)


# -- an instant engine with LLMEngine's interface (no model compute), for HTTP-only measurements -----------
class SyntheticEngine:
    supports_generation = True

    def __init__(self, model_dir: str) -> None:
        import torch
        from transformers import AutoTokenizer

        from fast_inference.engine.outputs import CompletionOutput, RequestOutput

        self._types = (CompletionOutput, RequestOutput)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model_config = SimpleNamespace(
            max_model_len=1 << 20,
            vocab_size=len(self.tokenizer),
            eos_token_ids=[],
            dtype=torch.float32,
            device=torch.device("cpu"),
            architecture="synthetic",
            hidden_size=8,
            model_path=model_dir,
        )
        self.num_total_blocks, self.block_size = 1024, 16
        self._token = self.tokenizer.encode(" the", add_special_tokens=False)[0]
        self._requests: dict[str, list] = {}

    def add_request(self, request_id, prompt, params, arrival_time=None, max_tokens_must_fit=False):
        self._requests[request_id] = [prompt, params.max_tokens, []]

    def abort_request(self, request_id):
        self._requests.pop(request_id, None)

    def has_unfinished_requests(self):
        return bool(self._requests)

    def step(self):
        completion_output, request_output = self._types
        outputs = []
        for rid, state in list(self._requests.items()):
            prompt, max_tokens, tokens = state
            tokens.append(self._token)
            done = len(tokens) >= max_tokens
            outputs.append(  # a delta, as the engine emits: this step's token and text
                request_output(
                    rid,
                    None,
                    prompt,
                    [completion_output(0, " the", [self._token], None, None, "length" if done else None)],
                    done,
                )
            )
            if done:
                del self._requests[rid]
        time.sleep(STEP_SECONDS)  # a step's kernels run without the GIL: the loop thread gets it meanwhile
        return outputs

    def stats(self):
        return {
            "num_running": len(self._requests),
            "num_waiting": 0,
            "num_free_blocks": 1024,
            "num_total_blocks": 1024,
            "kv_cache_usage": 0.0,
            "prefix_cache_hit_rate": 0.0,
        }

    def embed(self, token_id_lists):
        raise NotImplementedError


def _demo_dir() -> str:
    from fast_inference.models.demo import ensure_demo_model

    return str(ensure_demo_model())


def _synthetic_server():
    from fast_inference.server.routes import ServerConfig
    from fast_inference.server.serve import Server

    model_dir = _demo_dir()
    return Server(
        lambda: SyntheticEngine(model_dir),
        ServerConfig(["synthetic"], model_path=model_dir),
        host="127.0.0.1",
        port=0,
    )


# -- subprocess roles ---------------------------------------------------------------------------------------
def serve_ours() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    from fast_inference.server.serve import run

    server = _synthetic_server()
    orig_start = server.start

    async def start():
        port = await orig_start()
        print(port, flush=True)
        return port

    server.start = start
    run(server)


def serve_fastapi() -> None:
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(app, http="h11", loop="asyncio", access_log=False, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


def load(port: int, seconds: float, connections: int) -> None:
    """Keep-alive GET /health from `connections` sockets, one request in flight on each; prints req/s."""
    import selectors

    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    marker = b"HTTP/1.1 200"
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, [b""])
        socks.append(s)
    for s in socks:
        s.send(request)
    done = 0
    total = 0
    warm_until = time.perf_counter() + 0.5
    counting = False
    end = warm_until + seconds
    while True:
        now = time.perf_counter()
        if not counting and now >= warm_until:
            counting, done, start = True, 0, now
        if now >= end:
            break
        for key, _ in sel.select(0.5):
            s = key.fileobj
            data = key.data[0] + s.recv(65536)
            # A complete /health response is short and ends with an empty body: count status lines.
            got = data.count(marker)
            key.data[0] = data[data.rfind(b"\r\n\r\n") + 4 :] if got else data
            for _ in range(got):
                done += 1
                total += 1
                s.send(request)
    print(json.dumps({"rps": done / (time.perf_counter() - start), "total": total}))


def ttft_client(port: int, prompts: list[str]) -> None:
    """Stream /v1/completions (max_tokens 1) one request at a time; prints [(request id, TTFT s)]."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for prompt in prompts:
        body = json.dumps(
            {"model": "demo", "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
        ).encode()
        req = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        buf = b""
        t0 = time.perf_counter()
        s.sendall(req)
        first = None
        while b"data: [DONE]" not in buf:
            buf += s.recv(65536)
            if first is None and b'"text"' in buf:
                first = time.perf_counter() - t0
        while not buf.endswith(b"0\r\n\r\n"):
            buf += s.recv(65536)
        request_id = buf.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode()
        times.append((request_id, first))
    print(json.dumps(times))


# -- measurements -------------------------------------------------------------------------------------------
def _spawn(role: list[str]) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, __file__, *role], stdout=subprocess.PIPE, text=True, env=env)
    port = int(proc.stdout.readline())
    deadline = time.time() + 120
    while time.time() < deadline:  # ready = /health answers 200
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{role} did not become healthy")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _run_load(proc: subprocess.Popen, port: int, seconds: float) -> tuple[float, float]:
    """(requests/s, server CPU microseconds per request)."""
    cpu0 = _cpu_seconds(proc.pid)
    out = subprocess.run(
        [sys.executable, __file__, "--role", "load", "--port", str(port), "--seconds", str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    cpu = _cpu_seconds(proc.pid) - cpu0
    result = json.loads(out.stdout)
    return result["rps"], cpu / result["total"] * 1e6


def bench_health(seconds: float, skip_fastapi: bool) -> None:
    from bench.common import emit

    rps: dict[str, list[float]] = {"fast_inference": [], "uvicorn_fastapi": []}
    cpu: dict[str, list[float]] = {"fast_inference": [], "uvicorn_fastapi": []}
    roles = [("fast_inference", ["--role", "serve-ours"])]
    if not skip_fastapi:
        roles.append(("uvicorn_fastapi", ["--role", "serve-fastapi"]))
    for _ in range(3):  # alternate, so slow drifts on a shared machine hit both
        for name, role in roles:
            proc, port = _spawn(role)
            try:
                r, c = _run_load(proc, port, seconds)
                rps[name].append(r)
                cpu[name].append(c)
            finally:
                proc.terminate()
                proc.wait(30)
    ours = max(rps["fast_inference"])
    record = {
        "bench": "http_health",
        "connections": CONNECTIONS,
        "seconds": seconds,
        "fast_inference_rps": round(ours),
        "fast_inference_cpu_us_per_req": round(min(cpu["fast_inference"]), 1),
        "runs_rps": {k: [round(v) for v in vs] for k, vs in rps.items()},
    }
    if rps["uvicorn_fastapi"]:
        theirs = max(rps["uvicorn_fastapi"])
        record.update(
            uvicorn_fastapi_rps=round(theirs),
            uvicorn_fastapi_cpu_us_per_req=round(min(cpu["uvicorn_fastapi"]), 1),
            ratio_vs_fastapi=round(ours / theirs, 2),
            cpu_ratio_vs_fastapi=round(min(cpu["uvicorn_fastapi"]) / min(cpu["fast_inference"]), 2),
            target_ratio=1.5,
        )
    emit(record)


def bench_sse_format_write(n: int = 50000) -> None:
    import h11

    from bench.common import emit
    from fast_inference.engine.outputs import CompletionOutput
    from fast_inference.server.response_builder import ChoiceState, ResponseBuilder

    async def run(mode: str) -> float:
        rsock, wsock = socket.socketpair()
        stop = threading.Event()

        def drain():
            rsock.settimeout(0.2)
            while not stop.is_set():
                try:
                    if not rsock.recv(1 << 20):
                        return
                except (TimeoutError, OSError):
                    continue

        reader_thread = threading.Thread(target=drain, daemon=True)
        reader_thread.start()
        _, writer = await asyncio.open_connection(sock=wsock)
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        conn.next_event()
        conn.next_event()
        writer.write(
            conn.send(h11.Response(status_code=200, headers=[("content-type", "text/event-stream")]))
        )
        builder = ResponseBuilder(
            chat=True,
            request_id="chatcmpl-0123456789abcdef0123456789abcdef",
            created=int(time.time()),
            model="fast-inference-demo",
            fingerprint="fp_x",
        )
        head = {
            "id": "chatcmpl-0123456789abcdef0123456789abcdef",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": "fast-inference-demo",
            "system_fingerprint": "fp_x",
        }
        words = [" the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog", "\n", ' "q"']
        deltas = [CompletionOutput(0, w, [i]) for i, w in enumerate(words)]  # the engine's per-token deltas
        state = ChoiceState(0)
        framed = [b"%x\r\n%s\r\n" % (len(c), c) for c in (builder.delta_chunk(state, d) for d in deltas)]
        t0 = time.thread_time()
        for i in range(n):
            token = words[i % 10]
            if mode == "raw":  # the floor: pre-framed bytes straight into the transport (kernel send)
                writer.write(framed[i % 10])
                if writer.transport.get_write_buffer_size() > 256 * 1024:
                    await writer.drain()
                continue
            if mode == "naive":
                chunk = (
                    b"data: "
                    + json.dumps(
                        {
                            **head,
                            "choices": [
                                {
                                    "index": 0,
                                    "delta": {"content": token},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    ).encode()
                    + b"\n\n"
                )
            else:
                chunk = builder.delta_chunk(state, deltas[i % 10])
            if mode == "naive":
                writer.write(conn.send(h11.Data(data=chunk)))
            else:  # the server's framing of its chunked SSE responses (http.HTTPServer._stream)
                writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            if writer.transport.get_write_buffer_size() > 256 * 1024:
                await writer.drain()
        cpu = time.thread_time() - t0
        writer.close()
        stop.set()
        reader_thread.join()
        rsock.close()
        return cpu / n

    ours = min(asyncio.run(run("ours")) for _ in range(3))
    naive = min(asyncio.run(run("naive")) for _ in range(3))
    raw = min(asyncio.run(run("raw")) for _ in range(3))
    emit(
        {
            "bench": "sse_chunk_format_write",
            "chunks": n,
            "us_per_chunk": round(ours * 1e6, 2),
            "naive_json_dumps_us_per_chunk": round(naive * 1e6, 2),
            "speedup_vs_naive": round(naive / ours, 2),
            "raw_transport_write_us_per_chunk": round(raw * 1e6, 2),
            "formatting_us_per_chunk": round((ours - raw) * 1e6, 2),
            "target_us": 10.0,
        }
    )


_STREAM_CLIENT = """
import selectors, socket, sys
port, streams, request = int(sys.argv[1]), int(sys.argv[2]), bytes.fromhex(sys.argv[3])
sel = selectors.DefaultSelector()
bufs = {}
for _ in range(streams):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request)
    sel.register(s, selectors.EVENT_READ)
    bufs[s] = bytearray()
events = 0
while bufs:
    for key, _ in sel.select():
        s = key.fileobj
        data = s.recv(1 << 20)
        buf = bufs[s]
        buf += data
        if not data or buf.endswith(b"0\\r\\n\\r\\n"):
            events += buf.count(b"data: ")
            sel.unregister(s)
            s.close()
            del bufs[s]
print(events)
"""


class _FloorServer:
    """The floor of any engine-thread + event-loop design: a thread wakes the loop once per step
    (call_soon_threadsafe) and the loop writes one pre-built chunk per stream. No HTTP parsing, no
    protocol, no formatting: what is left is wake-up + transport write + kernel loopback send."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        writers: list[asyncio.StreamWriter] = []
        chunk = b"%x\r\n%s\r\n" % (len(b"data: {}\n\n"), b"data: {}\n\n")

        def deliver() -> None:  # one wake-up per step, every stream gets its chunk
            for w in writers:
                w.write(chunk)

        def engine(n: int) -> None:
            for _ in range(n):
                time.sleep(STEP_SECONDS)
                self.loop.call_soon_threadsafe(deliver)
            self.loop.call_soon_threadsafe(lambda: [w.write(b"0\r\n\r\n") for w in writers])

        async def on_conn(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(self._length))
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            writers.append(writer)
            if len(writers) == self._streams:
                threading.Thread(target=engine, args=(self.steps,), daemon=True).start()
            await self._stop.wait()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()

    def start(self, streams: int, body_length: int) -> "_FloorServer":
        self._streams, self._length = streams, body_length
        self._thread.start()
        self._ready.wait()
        return self

    def call(self, fn):
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _stream_run(server, port: int, streams: int, request: bytes) -> tuple[float, int]:
    """(event-loop CPU seconds, content events) for one run of the stream client against `server`."""
    before = server.call(_thread_time)
    out = subprocess.run(
        [sys.executable, "-c", _STREAM_CLIENT, str(port), str(streams), request.hex()],
        capture_output=True,
        text=True,
        check=True,
    )
    return server.call(_thread_time) - before, int(out.stdout)


def bench_sse_server_loop(tokens: int, streams: int) -> None:
    """Event-loop CPU per content chunk of a live server, and of the floor design, same client."""
    from bench.common import emit
    from fast_inference.server.serve import ServerThread

    per_stream = tokens // streams
    body = json.dumps(
        {
            "model": "synthetic",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": per_stream,
            "stream": True,
        }
    ).encode()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    thread = ServerThread(_synthetic_server()).start()
    try:
        cpu, events = _stream_run(thread, thread.port, streams, request)
        chunks = events - 3 * streams  # minus each stream's role chunk, final chunk and [DONE]
    finally:
        thread.stop()
    floor = _FloorServer(per_stream).start(streams, len(body))
    try:
        floor_cpu, floor_chunks = _stream_run(floor, floor.port, streams, request)
    finally:
        floor.stop()
    ours_us = cpu / chunks * 1e6
    floor_us = floor_cpu / floor_chunks * 1e6
    emit(
        {
            "bench": "sse_server_loop",
            "streams": streams,
            "tokens": per_stream * streams,
            "content_chunks": chunks,
            "tokens_per_chunk": round(per_stream * streams / chunks, 2),
            "loop_cpu_us_per_chunk": round(ours_us, 2),
            "floor_loop_cpu_us_per_chunk": round(floor_us, 2),
            "above_floor_us_per_chunk": round(ours_us - floor_us, 2),
        }
    )


async def _thread_time() -> float:
    return time.thread_time()


def bench_ttft(iters: int) -> None:
    import torch

    from bench.common import emit
    from fast_inference.engine.config import EngineArgs
    from fast_inference.engine.llm_engine import LLMEngine
    from fast_inference.engine.sampling_params import SamplingParams
    from fast_inference.server.routes import ServerConfig
    from fast_inference.server.serve import Server, ServerThread

    torch.set_num_threads(1)
    model_dir = _demo_dir()
    # Distinct prompts (no prefix-cache hits), ~40 tokens each, the same list for engine and server.
    prompts = [
        f"{i} The quick brown fox jumps over the lazy dog. Attention lets every token look back at the "
        f"context in fixed-size blocks of memory {i}."
        for i in range(iters + 5)
    ]
    args = EngineArgs(model=model_dir, device="cpu", max_model_len=512, enable_prefix_caching=False)
    engine = LLMEngine(args)
    params = SamplingParams(max_tokens=1, temperature=0)
    engine_times = []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        engine.add_request(f"r{i}", prompt, params)
        while not any(o.outputs[0].token_ids for o in engine.step()):
            pass
        while engine.has_unfinished_requests():
            engine.step()
        engine_times.append(time.perf_counter() - t0)
    del engine
    server = Server(
        lambda: LLMEngine(args), ServerConfig(["demo"], model_path=model_dir), host="127.0.0.1", port=0
    )
    thread = ServerThread(server).start()
    # Pair each request with the engine step that produced its first token, timed inside the server:
    # overhead = client TTFT - that step, per request, so machine-load drift cancels out.
    first_step: dict[str, float] = {}
    live = server.engine.engine
    real_step = live.step

    def timed_step():
        t0 = time.perf_counter()
        outputs = real_step()
        spent = time.perf_counter() - t0
        for out in outputs:
            if out.outputs and out.outputs[0].token_ids and out.request_id not in first_step:
                first_step[out.request_id] = spent
        return outputs

    live.step = timed_step
    try:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--role",
                "ttft",
                "--port",
                str(thread.port),
                "--prompts",
                json.dumps(prompts),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        pairs = json.loads(out.stdout)[5:]
    finally:
        thread.stop()
    engine_ms = statistics.median(engine_times[5:]) * 1e3
    server_ms = statistics.median(t for _, t in pairs) * 1e3
    step_ms = statistics.median(first_step[rid] for rid, _ in pairs) * 1e3
    overhead_ms = statistics.median(t - first_step[rid] for rid, t in pairs) * 1e3
    emit(
        {
            "bench": "ttft_c1",
            "iters": len(pairs),
            "engine_alone_prefill_ms_p50": round(engine_ms, 3),
            "server_ttft_ms_p50": round(server_ms, 3),
            "prefill_step_in_server_ms_p50": round(step_ms, 3),
            "overhead_ms_p50": round(overhead_ms, 3),
            "target_overhead_ms": 2.0,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help="load duration per /health run")
    parser.add_argument("--ttft-iters", type=int, default=40)
    parser.add_argument("--skip-fastapi", action="store_true")
    parser.add_argument("--only", choices=["sse", "health", "ttft"], default=None)
    args = parser.parse_args()
    if args.role == "serve-ours":
        return serve_ours()
    if args.role == "serve-fastapi":
        return serve_fastapi()
    if args.role == "load":
        return load(args.port, args.seconds, CONNECTIONS)
    if args.role == "ttft":
        return ttft_client(args.port, json.loads(args.prompts))
    from bench.common import emit

    emit(
        {
            "bench": "environment",
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_avg": os.getloadavg()[0],
        }
    )
    if args.only in (None, "sse"):
        bench_sse_format_write()
        bench_sse_server_loop(tokens=4000, streams=1)
        bench_sse_server_loop(tokens=12800, streams=64)
    if args.only in (None, "health"):
        bench_health(args.seconds, args.skip_fastapi)
    if args.only in (None, "ttft"):
        bench_ttft(args.ttft_iters)


if __name__ == "__main__":
    main()
