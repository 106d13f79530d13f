"""`serve --api-server-count 2`, configured only through FAST_INFERENCE_<FLAG> environment variables: both
HTTP processes answer on the one port, each counts its own traffic, the API key applies to both, SIGTERM
drains an open stream and leaves no process behind. The environment-variable mapping on its own too."""

import signal
import subprocess
import sys
import time

import openai
import pytest

from fast_inference import cli

from .processes import ROOT, ServeProcess, descendants, metric, server_env, tiny_model, wait_gone

MODEL = "tiny-api"
KEY = "sk-from-env"


# ---- FAST_INFERENCE_<FLAG> -> flags -----------------------------------------------------------------------


def _serve_args(argv: list[str], environ: dict):
    return cli._parser(environ).parse_args(["serve", *argv])


def test_every_serve_flag_has_an_env_var_and_the_command_line_wins():
    env = {
        "FAST_INFERENCE_MODEL": "/models/x",
        "FAST_INFERENCE_PORT": "9001",
        "FAST_INFERENCE_MAX_MODEL_LEN": "1024",
        "FAST_INFERENCE_SHUTDOWN_TIMEOUT": "2.5",
        "FAST_INFERENCE_SERVED_MODEL_NAME": "a 'b c'",
        "FAST_INFERENCE_NO_ENABLE_PREFIX_CACHING": "yes",
        "FAST_INFERENCE_DATA_PARALLEL_SIZE": "3",
        "FAST_INFERENCE_API_SERVER_COUNT": "2",
        "FAST_INFERENCE_DTYPE": "bfloat16",
        "FAST_INFERENCE_API_KEY": "sk-x",
    }
    args = _serve_args([], env)
    assert args.model == "/models/x" and args.port == 9001 and args.max_model_len == 1024
    assert args.shutdown_timeout == 2.5 and args.served_model_name == ["a", "b c"]
    assert args.no_enable_prefix_caching is True and args.dtype == "bfloat16" and args.api_key == "sk-x"
    assert args.data_parallel_size == 3 and args.api_server_count == 2
    args = _serve_args(["--port", "7000", "--dtype", "float32", "--served-model-name", "z"], env)
    assert args.port == 7000 and args.dtype == "float32" and args.served_model_name == ["z"]
    assert args.max_model_len == 1024  # the rest still from the environment
    assert _serve_args([], {"FAST_INFERENCE_NO_ENABLE_PREFIX_CACHING": "0"}).no_enable_prefix_caching is False
    defaults = _serve_args([], {})
    assert defaults.port == 8000 and defaults.data_parallel_size == 1 and defaults.api_key is None
    # One name per flag, made from the flag itself: every option has its variable.
    serve_parser = next(a for a in cli._parser({})._actions if a.dest == "command").choices["serve"]
    for action in serve_parser._actions:
        if action.option_strings and action.dest != "help":
            assert cli.env_name(action) in action.help, action.option_strings


@pytest.mark.parametrize(
    "name, value, says",
    [
        ("FAST_INFERENCE_PORT", "eighty", "invalid int value"),
        ("FAST_INFERENCE_DTYPE", "float8", "choose from"),
        ("FAST_INFERENCE_NO_ENABLE_PREFIX_CACHING", "maybe", "expected one of"),
        ("FAST_INFERENCE_DATA_PARALLEL_SIZE", "0", "invalid"),
    ],
)
def test_bad_env_value_names_the_variable(name, value, says, capsys):
    with pytest.raises(SystemExit) as exc:
        _serve_args([], {name: value})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert name in err and value in err and says in err


def test_help_lists_the_variables_and_hides_the_key(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fast_inference", "serve", "--help"],
        cwd=ROOT,
        env={**server_env(tmp_path), "FAST_INFERENCE_API_KEY": "sk-secret", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0
    for name in ("FAST_INFERENCE_MODEL", "FAST_INFERENCE_PORT", "FAST_INFERENCE_DATA_PARALLEL_SIZE",
                 "FAST_INFERENCE_API_SERVER_COUNT", "FAST_INFERENCE_API_KEY", "FAST_INFERENCE_<FLAG>"):  # fmt: skip
        assert name in out.stdout
    assert "sk-secret" not in out.stdout


# ---- two API server processes over one engine process, from the environment ---------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_model(tmp_path_factory.mktemp("tiny_api_model"))
    env = server_env(tmp_path_factory.mktemp("fi_cache"))
    env.update(
        FAST_INFERENCE_MODEL=str(model),
        FAST_INFERENCE_SERVED_MODEL_NAME=f"{MODEL} alias",
        FAST_INFERENCE_PORT="0",
        FAST_INFERENCE_API_SERVER_COUNT="2",
        FAST_INFERENCE_API_KEY=KEY,
        FAST_INFERENCE_DTYPE="float32",
        FAST_INFERENCE_MAX_MODEL_LEN="512",
        FAST_INFERENCE_KV_CACHE_MEMORY="8MiB",
        FAST_INFERENCE_NUM_THREADS="1",
        FAST_INFERENCE_SHUTDOWN_TIMEOUT="20",
    )
    proc = ServeProcess([], env)
    yield proc
    proc.stop()


def _pids_answering(server, tries: int = 64) -> set[int]:
    return {server.health()["pid"] for _ in range(tries)}


def test_both_api_servers_answer_on_one_port(server):
    assert "2 API server processes (SO_REUSEPORT) over 1 engine replica" in server.log
    pids = _pids_answering(server)  # each on a new connection: the kernel spreads them
    assert len(pids) == 2 and server.proc.pid not in pids
    assert pids <= set(descendants(server.proc.pid))
    health = server.health()
    assert health["api_server"] in (0, 1)
    assert [r["state"] for r in health["replicas"]] == ["ready"]


def test_requests_through_either_process_and_per_process_counters(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL, "alias"]  # names from the environment
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    texts = set()
    for _ in range(12):  # the openai client opens new connections: both processes get some
        fresh = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        reply = fresh.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=6, temperature=0)
        assert reply.choices[0].finish_reason == "length"
        texts.add(reply.choices[0].text)
        fresh.close()
    assert len(texts) == 1  # one engine behind both: the same greedy answer from either front-end
    # Each process counts its own HTTP traffic, labelled with its index; the engine's counters are global.
    counts = {}
    steps = set()
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + 60
    while len(counts) < 2 and time.monotonic() < deadline:
        page = server.metrics(headers)
        index = 0 if 'api_server="0"' in page else 1
        counts[index] = metric(
            page, "fast_inference_requests_total", endpoint="/v1/completions", status="200"
        )
        steps.add(metric(page, "fast_inference_replica_engine_steps_total", replica=0))
    assert sorted(counts) == [0, 1] and sum(counts.values()) == 12 and min(counts.values()) > 0
    assert len(steps) == 1  # the same engine step count from either process


def test_sigterm_drains_an_open_stream_and_leaves_no_process(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    stream = client.completions.create(
        model=MODEL, prompt=[8, 9], max_tokens=450, stream=True, extra_body={"ignore_eos": True}
    )
    first = next(iter(stream))
    children = descendants(server.proc.pid)
    assert len(children) >= 3  # two API servers and the engine (and multiprocessing's resource tracker)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    finish = [c.choices[0].finish_reason for c in [first, *rest] if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert server.proc.wait(60) == 0
    assert wait_gone(children, 10) == set()
    assert "the API servers drain" in server.log and "Stopped" in server.log
