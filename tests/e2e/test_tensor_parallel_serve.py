"""End to end: `serve --tensor-parallel-size 2` through the openai client (answers equal to one process),
two "nodes" on loopback (`--nnodes 2`, two separate process trees meeting at --master-port), a node that
dies mid-service (503 envelope, /health 503), and SIGTERM leaving no process behind."""

import logging
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import openai
import pytest

from fast_inference import LLM, SamplingParams, cli
from fast_inference.models.demo import build_model_dir

from .processes import ROOT, SERVE_FLAGS, ServeProcess, descendants, free_port, server_env, wait_gone

ENGINE_FLAGS = ["--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "4MiB"]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(build_model_dir(tmp_path_factory.mktemp("tp_serve"), seed=21))


@pytest.fixture(scope="module")
def reference(model) -> str:
    """The single-process greedy completion of PROMPT."""
    llm = LLM(model, dtype="float32", device="cpu", kv_cache_memory="4MiB")
    out = llm.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    return out[0].outputs[0].text


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return server_env(tmp_path_factory.mktemp("fi_cache"))


def _complete(port: int, **kw):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    return client.completions.create(
        model="m", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}, **kw
    )


def test_serve_tensor_parallel_2_and_a_worker_that_dies(model, reference, env):
    server = ServeProcess(
        [
            *SERVE_FLAGS,
            "--model",
            model,
            "--served-model-name",
            "m",
            "--tensor-parallel-size",
            "2",
            *ENGINE_FLAGS,
        ],
        env,
    )
    try:
        (worker,) = descendants(server.proc.pid)  # rank 1; rank 0 is the server process
        assert _complete(server.port).choices[0].text == reference
        streamed = "".join(c.choices[0].text for c in _complete(server.port, stream=True) if c.choices)
        assert streamed == reference
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
        )
        assert chat.usage.completion_tokens > 0
        os.kill(worker, signal.SIGKILL)
        assert wait_gone({worker}) == set()
        with pytest.raises(openai.APIStatusError) as err:
            _complete(server.port)
        assert err.value.status_code == 503
        assert f"worker rank 1 (pid {worker}) exited with code -9" in err.value.body["message"]
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10)
        assert health.value.code == 503
    finally:
        code = server.stop()
    assert code == 0, server.log
    assert descendants(server.proc.pid) == set()


def test_two_nodes_on_loopback(model, reference, env):
    """Node 1 is its own process tree (as on another machine); SIGTERM on node 0 stops node 1 too."""
    port = free_port()
    flags = ["--model", model, "--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1"]
    flags += ["--master-port", str(port), *ENGINE_FLAGS, "--num-threads", "1"]
    node1 = subprocess.Popen(
        [sys.executable, "-m", "fast_inference", "serve", *flags, "--node-rank", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        server = ServeProcess([*SERVE_FLAGS, *flags, "--node-rank", "0", "--served-model-name", "m"], env)
        try:
            assert descendants(server.proc.pid) == set()  # one rank per node: node 0 starts no worker
            assert _complete(server.port).choices[0].text == reference
        finally:
            code = server.stop()
        node1_code = node1.wait(30)  # rank 0's last step message tells it to stop
    finally:
        if node1.poll() is None:
            node1.kill()
    assert code == 0, server.log
    assert node1_code == 0, node1.stderr.read()
    assert descendants(server.proc.pid) == set()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--nnodes", "2"], "master_port must be given"),
        (["--nnodes", "3", "--master-port", "29500"], "nnodes (3) must be at least 1 and divide"),
        (["--nnodes", "2", "--node-rank", "2", "--master-port", "29500"], "node_rank must be in [0, nnodes)"),
    ],
)
def test_bad_parallel_flags_exit_before_anything_starts(model, flags, message, caplog):
    args = cli._parser().parse_args(["serve", "--model", model, "--tensor-parallel-size", "2", *flags])
    with caplog.at_level(logging.ERROR):
        assert cli.serve(args) == 2
    assert message in caplog.text
    assert descendants(os.getpid()) == set()
