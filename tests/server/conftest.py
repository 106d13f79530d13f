"""Server test fixtures: a tiny local model, a live server on 127.0.0.1:0 in a background thread, schemas."""

import json
import threading
from pathlib import Path

import jsonschema
import pytest
import torch

from fast_inference.server.http import Limits
from fast_inference.server.routes import ServerConfig
from fast_inference.server.serve import Server, ServerThread

# Tiny models gain nothing from intra-op threads, and on a shared machine OpenMP spin-waits cost 10-100x.
torch.set_num_threads(1)

# The OpenAI schemas the responses are validated against, kept in the repository beside this file
# (a subset of openai/openai-openapi, MIT: see openai-subset.NOTICE).
OPENAI_SPEC = Path(__file__).resolve().parent / "openai-subset.json"
MODEL_NAME = "tiny-test"


def _tiny_model(out_dir: Path, max_position_embeddings: int) -> Path:
    from fast_inference.models.demo import build_model_dir

    return build_model_dir(
        out_dir,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=max_position_embeddings,
        seed=7,
    )


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("tiny_model"), 512)


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory) -> Path:
    """The same tiny model with room for tool prompts (the tool listings take a few hundred tokens)."""
    return _tiny_model(tmp_path_factory.mktemp("tiny_tools_model"), 2048)


def chat_template(name: str) -> str:
    """The text of tests/server/chat_templates/<name>.jinja (hermes, llama3_json, mistral, deepseek_r1)."""
    return (Path(__file__).resolve().parent / "chat_templates" / f"{name}.jinja").read_text()


# The function tools of the tool-calling tests, in chat's shape (test_responses_api flattens them into the
# Responses shape).
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            # bounded, so that random weights finish a call well within max_tokens
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]


def engine_factory(model_dir: Path, max_model_len: int = 256, max_num_seqs: int = 64):
    from fast_inference.engine.config import EngineArgs
    from fast_inference.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=str(model_dir),
        dtype="float32",
        device="cpu",
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        seed=0,
    )
    return lambda: LLMEngine(args)


def start_server(
    model_dir: Path,
    *,
    api_key: str | None = None,
    allowed_origins=(),
    limits: Limits | None = None,
    max_pending_requests: int = 2048,
    factory=None,
    drain_timeout: float = 10.0,
    wait: bool = True,
    **config_fields,
) -> ServerThread:
    """config_fields: further ServerConfig fields (chat_template, tool_call_parser, reasoning_parser)."""
    config = ServerConfig(
        served_model_names=[MODEL_NAME, "alias"],
        model_path=str(model_dir),
        api_key=api_key,
        allowed_origins=list(allowed_origins),
        max_pending_requests=max_pending_requests,
        **config_fields,
    )
    server = Server(
        factory or engine_factory(model_dir),
        config,
        host="127.0.0.1",
        port=0,
        limits=limits,
        drain_timeout=drain_timeout,
    )
    return ServerThread(server).start(120.0 if wait else None)


@pytest.fixture(scope="session")
def server(model_dir):
    thread = start_server(model_dir)
    yield thread
    thread.stop()


@pytest.fixture(autouse=True, scope="session")
def no_leaked_threads():
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [
        t for t in threading.enumerate() if t.ident not in before and t.name.startswith("fast-inference")
    ]
    assert not leaked, f"leaked threads: {leaked}"


# -- OpenAI schema validation ------------------------------------------------------------------------------
def _nullable(node):
    """OpenAPI 3.0 `nullable: true` -> JSON Schema (`null` allowed); recursive."""
    if isinstance(node, list):
        return [_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if "enum" in node:
            node["enum"] = [*node["enum"], None]
        return {"anyOf": [node, {"type": "null"}]}
    return node


class Schemas:
    def __init__(self) -> None:
        spec = json.loads(OPENAI_SPEC.read_text())
        self.root = _nullable(spec)
        self.root.pop("paths", None)

    def validate(self, name: str, instance) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": self.root["components"]}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    def validate_completion_chunk(self, chunk: dict) -> None:
        """Streamed text completions share CreateCompletionResponse; like OpenAI's own stream, a chunk
        that does not end its choice carries finish_reason null, which the non-stream schema lacks."""
        patched = json.loads(json.dumps(chunk))
        for choice in patched.get("choices", []):
            if choice.get("finish_reason") is None:
                choice["finish_reason"] = "stop"
        self.validate("CreateCompletionResponse", patched)


@pytest.fixture(scope="session")
def schemas() -> Schemas:
    return Schemas()
