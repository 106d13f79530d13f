"""Helpers for the end-to-end tests: `fast-inference serve` as a subprocess (ServeProcess, the one such
helper), its process tree from /proc, and HTTP on loopback."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVE_FLAGS = ["--port", "0", "--num-threads", "1"]  # any free port; one thread on a shared CI machine


@dataclass
class Reply:
    status_code: int
    text: str

    def json(self):
        return json.loads(self.text)


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None, timeout=120.0):
    """One request on a new connection (so that with SO_REUSEPORT the kernel may pick any process)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, response.read().decode())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read().decode())


def tiny_model(out_dir: Path) -> Path:
    """The tiny random Llama of tests/server (2 layers, hidden 64), float32, with its tokenizer."""
    from fast_inference.models.demo import build_model_dir

    return build_model_dir(
        out_dir,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        seed=7,
    )


def server_env(cache_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAST_INFERENCE_")}
    env["FAST_INFERENCE_CACHE"] = str(cache_dir)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


class ServeProcess:
    """`python -m fast_inference serve ARGS` with stderr collected; ready once the ready lines (URL, KV
    cache) are logged and /health is 200 (with engine replicas: every one it lists is ready)."""

    def __init__(self, args: list[str], env: dict, ready_timeout: float = 300.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fast_inference", "serve", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = int(self.wait_for(r"Listening on http://127\.0\.0\.1:(\d+)", ready_timeout).group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        # Logged once the engine is ready, after the URL line: tests may read both from the log at once.
        self.wait_for(r"KV cache: \d+ blocks", ready_timeout)
        deadline = time.monotonic() + ready_timeout
        while True:
            health = self.health()
            if health is not None and health.get("status", "ok") == "ok":
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready in {ready_timeout} s:\n{self.log}")
            if self.proc.poll() is not None:
                raise AssertionError("server exited:\n" + self.log)
            time.sleep(0.2)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None:
                raise AssertionError("server exited:\n" + self.log)
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not logged:\n{self.log}")

    def health(self, headers: dict | None = None) -> dict | None:
        """/health's JSON on a fresh connection (so that SO_REUSEPORT may pick any process): {} for one
        engine's empty 200, None while it is not 200."""
        try:
            r = http("GET", self.url + "/health", headers=headers, timeout=10)
        except OSError:
            return None
        if r.status_code != 200:
            return None
        return r.json() if r.text else {}

    def metrics(self, headers: dict | None = None) -> str:
        return http("GET", self.url + "/metrics", headers=headers, timeout=10).text

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                for pid in descendants(self.proc.pid):
                    kill_quietly(pid)
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)


def metric(text: str, name: str, **labels) -> float:
    """The value of one series of a Prometheus text page (labels given must match)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"{name} {labels} not in /metrics")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, their children, ...), from /proc; zombies count as gone."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if state != "Z":
            parents.setdefault(int(ppid), []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def is_running(pid: int) -> bool:
    """True for a live process; a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: set[int], timeout: float = 15.0) -> set[int]:
    """Wait up to `timeout` s for every pid to exit; the ones still running (empty once all are gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {pid for pid in pids if is_running(pid)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def free_port() -> int:
    """A port free on loopback now (for flags that need a number, such as --master-port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
