"""`serve --data-parallel-size 2`: two engine replica processes behind one API server. Greedy answers equal
one in-process engine's, both replicas work, a repeated prompt follows its prefix to one replica, a replica
killed with SIGKILL fails its requests with 503 while the other serves and is restarted, and SIGTERM
leaves no process behind. The router's rules are also checked on their own."""

import concurrent.futures
import os
import signal
import time

import pytest
import torch

from fast_inference.engine.async_engine import EngineDeadError
from fast_inference.engine.data_parallel import PrefixAffinityRouter
from fast_inference.engine.engine_process import replica_gpus
from fast_inference.engine.sampling_params import SamplingParams

from .processes import (
    SERVE_FLAGS,
    Reply,
    ServeProcess,
    descendants,
    http,
    metric,
    server_env,
    tiny_model,
    wait_gone,
)

torch.set_num_threads(1)
MODEL = "tiny-dp"
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory", "8MiB", "--seed", "0"]


# ---- the router on its own -------------------------------------------------------------------------------


def test_router_prefix_affinity_then_load():
    router = PrefixAffinityRouter(2, block_size=4)
    shared = list(range(100, 108))  # two full blocks
    a = router.block_hashes(shared + [1, 2])
    assert len(a) == 2  # the partial third block does not count
    # Nothing seen yet: the least loaded replica, by requests then tokens.
    assert router.choose(a, [(3, 0), (1, 0)]) == 1
    # The same prefix again follows it even though replica 1 is now the busier one...
    assert router.choose(router.block_hashes(shared + [9]), [(0, 0), (5, 500)]) == 1
    # ...a prompt sharing only the first block still prefers it over an empty replica...
    assert router.choose(router.block_hashes(shared[:4] + [7, 7, 7, 7]), [(0, 0), (5, 0)]) == 1
    # ...and an unrelated one goes by load, tokens breaking a tie of request counts.
    assert router.choose(router.block_hashes([5] * 8), [(1, 90), (1, 10)]) == 1
    assert router.choose(router.block_hashes([6] * 8), [(1, 10), (1, 90)]) == 0
    # A replica that cannot take requests is never chosen; a restarted one has forgotten its prefixes.
    assert router.choose(a, [(9, 9), None]) == 0
    router.forget(0)
    router.forget(1)
    assert router.choose(a, [(2, 0), (1, 0)]) == 1
    with pytest.raises(EngineDeadError):
        router.choose(a, [None, None])
    assert router.block_hashes("a text prompt") == []  # routed by load alone


def test_replica_gpus_one_group_per_replica():
    assert [replica_gpus(r, 1, 4, None) for r in range(4)] == ["0", "1", "2", "3"]
    assert [replica_gpus(r, 2, 4, None) for r in range(2)] == ["0,1", "2,3"]
    assert replica_gpus(1, 2, 4, "4,5,6,7") == "6,7"  # the parent's own CUDA_VISIBLE_DEVICES names
    assert replica_gpus(2, 1, 2, None) == "0"  # more replicas than GPUs: they share, round robin
    with pytest.raises(ValueError, match="tensor-parallel-size"):
        replica_gpus(0, 4, 2, None)


# ---- one server with two replicas for the rest of the module ----------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny_dp_model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    env = server_env(tmp_path_factory.mktemp("fi_cache"))
    args = [*SERVE_FLAGS, "--model", str(model_dir), "--served-model-name", MODEL]
    proc = ServeProcess([*args, *ENGINE_FLAGS, "--data-parallel-size", "2", "--shutdown-timeout", "10"], env)
    yield proc
    proc.stop()


def _complete(server, prompt, max_tokens=12, **extra) -> Reply:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return http("POST", server.url + "/v1/completions", body)


def _routed(server) -> list[float]:
    page = server.metrics()
    return [metric(page, "fast_inference_replica_routed_requests_total", replica=r) for r in (0, 1)]


def _reference(model_dir, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """The same model in one in-process engine: greedy text per prompt."""
    from fast_inference.engine.config import EngineArgs
    from fast_inference.engine.llm_engine import LLMEngine

    engine = LLMEngine(
        EngineArgs(
            model=str(model_dir),
            dtype="float32",
            device="cpu",
            max_model_len=512,
            kv_cache_memory="8MiB",
            seed=0,
        )
    )
    texts = {}
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.outputs[0].text
    return [texts[str(i)] for i in range(len(prompts))]


def test_sixteen_concurrent_requests_match_one_engine_and_both_replicas_work(server, model_dir):
    prompts = [[(7 * i + j) % 500 + 3 for j in range(5 + i)] for i in range(16)]
    before = _routed(server)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda p: _complete(server, p), prompts))
    assert [r.status_code for r in replies] == [200] * 16
    texts = [r.json()["choices"][0]["text"] for r in replies]
    assert texts == _reference(model_dir, prompts, 12)
    assert all(r.json()["usage"]["completion_tokens"] == 12 for r in replies)
    after = _routed(server)
    assert sum(after) - sum(before) == 16
    page = server.metrics()
    for replica in (0, 1):  # both did work: the engines' own counters, not only the router's
        assert after[replica] > before[replica]
        assert metric(page, "fast_inference_replica_engine_steps_total", replica=replica) > 0
        assert metric(page, "fast_inference_replica_requests_finished_total", replica=replica) > 0
        assert metric(page, "fast_inference_replica_up", replica=replica) == 1
        assert metric(page, "fast_inference_num_kv_cache_blocks", replica=replica) > 0


def test_repeated_prompt_follows_its_prefix_to_one_replica(server):
    # 40 tokens: two full 16-token blocks. Sent 6 at once: routing by load alone would alternate them
    # (each one raises its replica's load before the next is routed); affinity keeps them together.
    shared = [(11 * j) % 400 + 5 for j in range(40)]
    before = _routed(server)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda i: _complete(server, shared + [i + 1], max_tokens=8), range(6)))
    assert [r.status_code for r in replies] == [200] * 6
    delta = [a - b for a, b in zip(_routed(server), before)]
    assert sorted(delta) == [0, 6]
    assert _complete(server, [9] * 40, max_tokens=2).status_code == 200


def test_killed_replica_fails_its_requests_with_503_others_serve_and_it_restarts(server):
    health = server.health()
    victim = health["replicas"][1]
    assert victim["state"] == "ready"
    prompts = [[100 + i, 200 + i, 300 + i] for i in range(8)]  # distinct: routed by load, 4 and 4
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_complete, server, p, 450, ignore_eos=True) for p in prompts]
        deadline = time.monotonic() + 60
        while metric(server.metrics(), "fast_inference_num_requests_running", replica=1) < 4:
            assert time.monotonic() < deadline, "replica 1 never ran its requests"
            time.sleep(0.02)
        os.kill(victim["pid"], signal.SIGKILL)
        replies = [f.result() for f in futures]
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200] * 4 + [503] * 4
    for r in replies:
        if r.status_code == 503:
            error = r.json()["error"]
            assert error["type"] == "server_error" and error["code"] == "engine_unavailable"
            assert "replica 1" in error["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] == 450
    # Reported while it restarts; the other replica keeps serving.
    degraded = server.health()
    assert degraded["status"] == "degraded"
    assert degraded["replicas"][1]["state"] != "ready" and degraded["replicas"][0]["state"] == "ready"
    assert _complete(server, [1, 2, 3], max_tokens=4).status_code == 200
    deadline = time.monotonic() + 180
    while True:
        health = server.health()
        if health is not None and health["status"] == "ok":
            break
        assert time.monotonic() < deadline, server.log
        time.sleep(0.2)
    restarted = health["replicas"][1]
    assert restarted["restarts"] == 1 and restarted["pid"] != victim["pid"]
    assert "engine replica 1" in server.log and "killed by SIGKILL" in server.log
    assert metric(server.metrics(), "fast_inference_replica_restarts_total", replica=1) == 1
    # The restarted replica takes requests again.
    before = _routed(server)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: _complete(server, [50 + i, 60 + i], max_tokens=4), range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    assert _routed(server)[1] > before[1]


def test_sigterm_leaves_no_process_behind(server):
    children = descendants(server.proc.pid)
    pids = {server.health()["pid"], *(r["pid"] for r in server.health()["replicas"])}
    assert pids - {server.proc.pid} <= set(children)  # the replicas are this server's children
    assert server.stop() == 0
    assert "Stopped" in server.log
    assert wait_gone(children, 10) == set()
