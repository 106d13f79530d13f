"""/v1/responses on the tiny random model: the official client's create / stream / retrieve / delete, the event
sequence, store + previous_response_id, cancel, the bounded store and the 400s; every response object and
every stream event validated against the vendored official schemas (openai-responses-subset.json)."""

import json
import shutil
import threading
from pathlib import Path

import jsonschema
import openai
import pytest

from fast_inference.server import responses_protocol
from fast_inference.server.response_store import ResponseStore, StoredResponse
from fast_inference.server.responses_api import OutputItems

from .conftest import MODEL_NAME, TOOLS, chat_template, engine_factory, start_server
from .rawhttp import RawConn, call, request

SPEC = Path(__file__).resolve().parent / "openai-responses-subset.json"


class ResponseSchemas:
    """The official Response / ResponseStreamEvent / error schemas (OpenAPI 3.1: plain JSON Schema)."""

    def __init__(self) -> None:
        self.components = json.loads(SPEC.read_text())["components"]
        schemas = self.components["schemas"]
        self.event_schema = {}  # event type -> the name of its schema
        for ref in schemas["ResponseStreamEvent"]["anyOf"]:
            name = ref["$ref"].rsplit("/", 1)[1]
            self.event_schema[schemas[name]["properties"]["type"]["enum"][0]] = name

    def validate(self, name: str, instance) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": self.components}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    def validate_event(self, event: dict) -> None:
        self.validate(self.event_schema[event["type"]], event)
        self.validate("ResponseStreamEvent", event)


@pytest.fixture(scope="module")
def rschemas() -> ResponseSchemas:
    return ResponseSchemas()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def create_raw(server, rschemas, **body) -> dict:
    r = call(server.port, "POST", "/v1/responses", {"model": MODEL_NAME, **body})
    assert r.status == 200, r.body
    data = r.json()
    rschemas.validate("Response", data)
    return data


def stream_raw(port: int, rschemas, **body) -> list[dict]:
    """POST a streaming create; the events, each checked: `event:` names its data's type, the schemas."""
    conn = RawConn(port, timeout=60)
    try:
        conn.send(request("POST", "/v1/responses", {"model": MODEL_NAME, "stream": True, **body}))
        status, head = conn.read_head()
        assert status == 200 and head["content-type"].startswith("text/event-stream")
        data = b"".join(conn.iter_chunks()).decode()
    finally:
        conn.close()
    return parse_events(data, rschemas)


def parse_events(data: str, rschemas) -> list[dict]:
    assert data.endswith("\n\n")
    events = []
    for block in data.split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        event = json.loads(data_line[len("data: ") :])
        assert event["type"] == name_line[len("event: ") :]
        rschemas.validate_event(event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def tokenize_messages(server, messages: list[dict]) -> int:
    r = call(server.port, "POST", "/tokenize", {"model": MODEL_NAME, "messages": messages})
    assert r.status == 200, r.body
    return r.json()["count"]


def text_of(response: dict) -> str:
    return "".join(
        part["text"] for item in response["output"] if item["type"] == "message" for part in item["content"]
    )


def test_create_with_the_official_client(client, server, rschemas):
    r = client.responses.create(model=MODEL_NAME, input="Hello there", max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL_NAME
    # The tiny random model does not reach EOS in 8 tokens: the length cut is "incomplete", as OpenAI says it.
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output_text and r.output_text == r.output[0].content[0].text
    assert r.usage.output_tokens == 8
    assert r.usage.input_tokens == tokenize_messages(server, [{"role": "user", "content": "Hello there"}])
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    raw = create_raw(server, rschemas, input="Hello there", max_output_tokens=8, temperature=0)
    assert text_of(raw) == r.output_text  # greedy is deterministic
    assert raw["store"] is True and raw["temperature"] == 0 and raw["max_output_tokens"] == 8


def test_message_input_matches_chat(client, server, rschemas):
    """Messages with input_text parts and instructions render as the same conversation chat renders."""
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Name a "}, {"type": "input_text", "text": "color"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Blue."}]},
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": "Another?"},
    ]  # fmt: skip
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Name a color"},
        {"role": "assistant", "content": "Blue."},
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Another?"},
    ]
    raw = create_raw(
        server, rschemas, input=items, instructions="Be terse.", max_output_tokens=6, temperature=0
    )
    assert raw["instructions"] == "Be terse."
    assert raw["usage"]["input_tokens"] == tokenize_messages(server, messages)
    chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0)
    assert text_of(raw) == chat.choices[0].message.content


def test_function_call_items_are_rendered(server, rschemas):
    question = {"role": "user", "content": "Weather in Paris?"}
    calls = [
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
    ]  # fmt: skip
    # The test model's ChatML template never reads tool_calls: the call would vanish from the prompt, so it
    # is a 400 naming input (test_tools.py renders such input through a template that shows calls).
    r = call(
        server.port,
        "POST",
        "/v1/responses",
        {"model": MODEL_NAME, "input": [question, *calls], "max_output_tokens": 2},
    )
    assert r.status == 400 and r.json()["error"]["param"] == "input", r.body
    assert "tool calls" in r.json()["error"]["message"]
    # A tool result alone renders by its role and content.
    plain = create_raw(server, rschemas, input=[question], max_output_tokens=2, temperature=0)
    with_result = create_raw(server, rschemas, input=[question, calls[1]], max_output_tokens=2, temperature=0)
    expected = tokenize_messages(
        server, [question, {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    )
    assert with_result["usage"]["input_tokens"] == expected > plain["usage"]["input_tokens"]


def test_stream_event_sequence(server, rschemas):
    events = stream_raw(server.port, rschemas, input="Tell me a story", max_output_tokens=12, temperature=0)
    kinds = [e["type"] for e in events]
    head = [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[:4] == head and kinds[-4:-1] == tail and kinds[-1] == "response.incomplete"
    deltas = events[4:-4]
    assert deltas and all(e["type"] == "response.output_text.delta" for e in deltas)
    response_id = events[0]["response"]["id"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    assert all(e["item_id"] == item_id and e["output_index"] == 0 and e["content_index"] == 0 for e in deltas)
    text = "".join(e["delta"] for e in deltas)
    assert events[-4]["text"] == text and events[-3]["part"]["text"] == text
    assert events[-2]["item"]["id"] == item_id and events[-2]["item"]["status"] == "incomplete"
    final = events[-1]["response"]
    assert final["id"] == response_id and text_of(final) == text and final["usage"]["output_tokens"] == 12
    rschemas.validate("Response", final)
    # The same request without stream gives the same text; the stored object is the last event's.
    assert (
        text_of(create_raw(server, rschemas, input="Tell me a story", max_output_tokens=12, temperature=0))
        == text
    )
    stored = call(server.port, "GET", f"/v1/responses/{response_id}")
    assert stored.status == 200 and stored.json() == final


def test_stream_with_the_official_client(client, rschemas):
    with client.responses.stream(
        model=MODEL_NAME, input="Stream it", max_output_tokens=10, temperature=0
    ) as s:
        events = list(s)
    for event in events:
        rschemas.validate_event(event.model_dump(mode="json", exclude={"snapshot"}, exclude_unset=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    assert [e for e in events if e.type == "response.output_text.done"][0].text == text
    same = client.responses.create(model=MODEL_NAME, input="Stream it", max_output_tokens=10, temperature=0)
    assert same.output_text == text
    streamed = client.responses.create(
        model=MODEL_NAME, input="Stream it", max_output_tokens=10, temperature=0, stream=True
    )
    assert "".join(e.delta for e in streamed if e.type == "response.output_text.delta") == text


def test_store_and_previous_response_id(client, server, rschemas):
    first = create_raw(
        server, rschemas, input="My name is Ada.", instructions="Be kind.", max_output_tokens=5
    )
    got = client.responses.retrieve(first["id"])
    assert got.id == first["id"] and got.output_text == text_of(first)
    raw = call(server.port, "GET", f"/v1/responses/{first['id']}").json()
    assert raw == first
    second = create_raw(
        server, rschemas, input="What is my name?", previous_response_id=first["id"], max_output_tokens=5
    )
    assert second["previous_response_id"] == first["id"] and second["instructions"] is None
    # The prior conversation comes first; its instructions are not carried over (as OpenAI does it).
    conversation = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": text_of(first)},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second["usage"]["input_tokens"] == tokenize_messages(server, conversation)
    third = client.responses.create(
        model=MODEL_NAME, input="And again?", previous_response_id=second["id"], max_output_tokens=3
    )
    conversation += [
        {"role": "assistant", "content": text_of(second)},
        {"role": "user", "content": "And again?"},
    ]
    assert third.usage.input_tokens == tokenize_messages(server, conversation)


def test_store_false_and_unknown_ids(client, server, rschemas):
    unstored = create_raw(server, rschemas, input="Forget me", store=False, max_output_tokens=3)
    assert unstored["store"] is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored["id"])
    r = call(server.port, "POST", "/v1/responses", {"input": "x", "previous_response_id": unstored["id"]})
    assert r.status == 404 and r.json()["error"]["param"] == "previous_response_id"
    rschemas.validate("ErrorResponse", r.json())
    for method, path in (("GET", "/v1/responses/resp_nope"), ("DELETE", "/v1/responses/resp_nope"),
                         ("POST", "/v1/responses/resp_nope/cancel")):  # fmt: skip
        r = call(server.port, method, path)
        assert r.status == 404 and r.json()["error"]["code"] == "not_found", (method, path)
        rschemas.validate("ErrorResponse", r.json())


def test_delete(client, server, rschemas):
    made = create_raw(server, rschemas, input="Short lived", max_output_tokens=2)
    r = call(server.port, "DELETE", f"/v1/responses/{made['id']}")
    assert r.status == 200 and r.json() == {"id": made["id"], "object": "response", "deleted": True}
    assert call(server.port, "GET", f"/v1/responses/{made['id']}").status == 404
    other = client.responses.create(model=MODEL_NAME, input="Also short", max_output_tokens=2)
    assert client.responses.delete(other.id) is None  # the SDK's delete returns nothing
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(other.id)


def test_cancel_of_a_finished_response_returns_it_unchanged(client, server, rschemas):
    made = create_raw(server, rschemas, input="Done already", max_output_tokens=2)
    r = call(server.port, "POST", f"/v1/responses/{made['id']}/cancel")
    assert r.status == 200 and r.json() == made
    assert client.responses.cancel(made["id"]).status == "incomplete"


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": 5}, 400, "input"),
        ({"input": [{"type": "wizardry"}]}, 400, "input[0]"),
        ({"input": [{"role": "wizard", "content": "x"}]}, 400, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            400,
            "input[0]",
        ),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, 400, "input[0]"),
        ({"input": "x", "temperature": 3}, 400, "temperature"),
        ({"input": "x", "top_p": 0}, 400, "top_p"),
        ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"input": "x", "instructions": 5}, 400, "instructions"),
        ({"input": "x", "store": "yes"}, 400, "store"),
        (
            {
                "input": "x",
                "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "wizard"}}},
            },
            400,
            "text",
        ),
        ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, 400, "text"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, 400, "text"),
        ({"input": "x", "background": True, "store": False}, 400, "background"),
        ({"input": "x", "background": True, "stream": True}, 400, "background"),
        ({"input": "x", "truncation": "auto"}, 400, "truncation"),
        ({"input": "x", "top_logprobs": 2}, 400, "top_logprobs"),
        ({"input": "x", "include": ["message.output_text.logprobs"]}, 400, "include"),
        ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, 400, "metadata"),
        ({"input": "x", "previous_response_id": "resp_missing"}, 404, "previous_response_id"),
        ({"input": "x", "model": "nope"}, 404, "model"),
        ({"input": "word " * 400}, 400, "input"),  # longer than the context: the engine's intake
        ({"input": "x", "max_output_tokens": 100000}, 400, "input"),
    ],
)
def test_bad_requests(server, rschemas, body, status, param):
    r = call(server.port, "POST", "/v1/responses", body)
    assert r.status == status, r.body
    assert r.json()["error"]["param"] == param, r.body
    rschemas.validate("ErrorResponse", r.json())


CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "sunny": {"type": "boolean"}},
    "required": ["city", "sunny"],
    "additionalProperties": False,
}
CITY_FORMAT = {"format": {"type": "json_schema", "name": "weather", "schema": CITY_SCHEMA, "strict": True}}


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_text_format_json_schema(client, server, rschemas, temperature):
    """text.format json_schema constrains decoding (the engine's grammar): a random model's answer is
    valid JSON of the schema and ends there (status completed), streamed and not."""
    body = {"input": "Weather?", "text": CITY_FORMAT, "max_output_tokens": 150, "temperature": temperature}
    r = create_raw(server, rschemas, **body)
    assert r["status"] == "completed" and r["text"] == CITY_FORMAT
    jsonschema.validate(json.loads(text_of(r)), CITY_SCHEMA)
    events = stream_raw(server.port, rschemas, **body)
    assert events[-1]["type"] == "response.completed"
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    jsonschema.validate(json.loads(streamed), CITY_SCHEMA)
    if temperature == 0.0:  # greedy: the stream and the object are the same answer
        assert streamed == text_of(r)
        via_client = client.responses.create(model=MODEL_NAME, input="Weather?", text=CITY_FORMAT,
                                             max_output_tokens=150, temperature=0)  # fmt: skip
        assert via_client.status == "completed" and via_client.output_text == streamed


def test_text_format_json_object_is_constrained(server, rschemas):
    r = create_raw(server, rschemas, input="JSON please", text={"format": {"type": "json_object"}},
                   max_output_tokens=20, temperature=0)  # fmt: skip
    assert r["text"]["format"] == {"type": "json_object"}
    assert text_of(r).lstrip().startswith("{")  # free JSON may not close in 20 tokens; it opens an object


def test_bad_request_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL_NAME, input="x", temperature=5)
    assert info.value.body["param"] == "temperature"


def test_output_items_fold_text_and_tool_calls(rschemas):
    """The fold the stream and the final object share, fed chat-shaped deltas with a tool call the way a
    tool-call parser sends them (first piece: index, id, type, name; then argument pieces)."""
    events = []

    def emit(kind, **fields):  # encoded when emitted, as the server does
        events.append(json.loads(json.dumps({"type": kind, "sequence_number": len(events), **fields})))

    items = OutputItems(emit)
    items.add({"reasoning_content": "The user wants "})
    items.add({"reasoning_content": "the weather.", "content": "Let me check. "})
    items.add({"content": "One moment."})
    first_piece = {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    items.add({"tool_calls": [first_piece]})
    items.add({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]})
    items.add({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]})
    items.add(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                }
            ]
        }
    )
    with pytest.raises(ValueError):  # a call's pieces come before the next item starts
        items.add({"tool_calls": [{"index": 0, "function": {"arguments": " "}}]})
    items.finish("completed")
    for event in events:
        rschemas.validate_event(event)
    reasoning, message, first, second = items.items
    assert (
        reasoning["content"][0]["text"] == "The user wants the weather."
        and reasoning["status"] == "completed"
    )
    assert message["content"][0]["text"] == "Let me check. One moment." and message["status"] == "completed"
    assert (first["call_id"], first["name"], first["arguments"]) == (
        "call_a",
        "get_weather",
        '{"city": "Paris"}',
    )
    assert (second["call_id"], second["arguments"], second["status"]) == ("call_b", "{}", "completed")
    for item in items.items:
        rschemas.validate("OutputItem", item)
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
    ]  # fmt: skip
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["item"] for e in done] == items.items  # what each done event said is what the object holds
    argument_deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert [e["output_index"] for e in argument_deltas] == [2, 2, 3]
    # As the next turn's input: the text and both calls in one assistant message; the thinking is dropped.
    assert responses_protocol.response_input(items.items) == [
        {"role": "assistant", "content": "Let me check. One moment."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ]},
    ]  # fmt: skip


def test_store_is_bounded_by_count_and_bytes():
    def entry(text: str) -> StoredResponse:
        return StoredResponse({"id": text, "output": text}, [{"role": "user", "content": text}])

    store = ResponseStore(max_entries=3, max_bytes=10_000)
    for name in "abc":
        assert store.put(name, entry(name))
    assert store.get("a") is not None  # a is now the most recently used
    store.put("d", entry("d"))
    assert "b" not in store and all(k in store for k in "acd") and len(store) == 3
    size = store.get("c").nbytes
    assert store.nbytes == sum(store.get(k).nbytes for k in "acd")
    small = ResponseStore(max_entries=100, max_bytes=2 * size + 1)
    for name in "xyz":
        small.put(name, entry(name))
    assert len(small) == 2 and "x" not in small and small.nbytes <= small.max_bytes
    assert not small.put("huge", entry("h" * 10_000)) and "huge" not in small
    assert small.delete("y") and not small.delete("y") and small.nbytes == small.get("z").nbytes


def test_server_store_evicts_least_recently_used(server, rschemas):
    app = server.server.app
    kept = app.responses
    app.responses = ResponseStore(max_entries=2, max_bytes=kept.max_bytes)
    try:
        ids = [create_raw(server, rschemas, input=f"n{i}", max_output_tokens=1)["id"] for i in range(3)]
        assert call(server.port, "GET", f"/v1/responses/{ids[0]}").status == 404
        assert all(call(server.port, "GET", f"/v1/responses/{i}").status == 200 for i in ids[1:])
        r = call(server.port, "POST", "/v1/responses", {"input": "x", "previous_response_id": ids[0]})
        assert r.status == 404 and "evicted" in r.json()["error"]["message"]
    finally:
        app.responses = kept


# -- a response that completes, and cancel while generating: engines the test can steer ----------------------
def _greedy_ids(model_dir: Path, text: str, count: int) -> list[int]:
    from fast_inference.engine.sampling_params import SamplingParams

    engine = engine_factory(model_dir)()
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    engine.add_request("probe", ids, SamplingParams(temperature=0, max_tokens=count, ignore_eos=True))
    out = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            out += output.outputs[0].token_ids
    return out


@pytest.fixture(scope="module")
def stopping_server(model_dir, tmp_path_factory):
    """The tiny model with one more EOS id: the token greedy decoding of "Finish" emits third (first time
    seen), so that request ends with a stop after two tokens and its response is "completed"."""
    ids = _greedy_ids(model_dir, "Finish", 8)
    index = next(j for j in range(1, len(ids)) if ids[j] not in ids[:j])
    copy = tmp_path_factory.mktemp("stopping") / "model"
    shutil.copytree(model_dir, copy)
    gen_config = json.loads((copy / "generation_config.json").read_text())
    gen_config["eos_token_id"] = [gen_config["eos_token_id"], ids[index]]
    (copy / "generation_config.json").write_text(json.dumps(gen_config))
    thread = start_server(copy)
    yield thread, index
    thread.stop()


def test_completed_response(stopping_server, rschemas):
    server, length = stopping_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = create_raw(server, rschemas, input="Finish", max_output_tokens=8, temperature=0)
    assert (
        r["status"] == "completed"
        and r["completed_at"] >= r["created_at"]
        and r["incomplete_details"] is None
    )
    assert r["output"][0]["status"] == "completed" and r["usage"]["output_tokens"] == length + 1
    events = stream_raw(server.port, rschemas, input="Finish", max_output_tokens=8, temperature=0)
    assert events[-1]["type"] == "response.completed" and text_of(events[-1]["response"]) == text_of(r)
    with client.responses.stream(model=MODEL_NAME, input="Finish", max_output_tokens=8, temperature=0) as s:
        final = s.get_final_response()
    assert final.status == "completed" and final.output_text == text_of(r)


class _StepGate:
    """Lets a test hold the engine between steps: while it holds `permits`, each step takes one first,
    so the test can act while a response is certainly in progress (no timing involved)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._permits: int | None = None  # None: open

    def allow(self, permits: int | None) -> None:
        with self._cond:
            self._permits = permits
            self._cond.notify_all()

    def wait(self) -> None:
        with self._cond:
            while self._permits == 0:
                self._cond.wait()
            if self._permits is not None:
                self._permits -= 1


_GATE = _StepGate()


@pytest.fixture(scope="module")
def gated_server(model_dir):
    from fast_inference.engine.config import EngineArgs
    from fast_inference.engine.llm_engine import LLMEngine

    class GatedEngine(LLMEngine):
        def step(self):
            _GATE.wait()
            return super().step()

    args = EngineArgs(model=str(model_dir), dtype="float32", device="cpu", max_model_len=256, seed=0)
    thread = start_server(model_dir, factory=lambda: GatedEngine(args))
    yield thread
    _GATE.allow(None)
    thread.stop()


def test_cancel_while_generating(gated_server, rschemas):
    server = gated_server
    conn = RawConn(server.port, timeout=60)
    try:
        _GATE.allow(1)  # the prefill step (which samples the first token), then the engine waits
        conn.send(
            request("POST", "/v1/responses", {"input": "Go on", "stream": True, "max_output_tokens": 200})
        )
        status, _ = conn.read_head()
        assert status == 200
        chunks = conn.iter_chunks()
        data = ""
        while "response.output_text.delta" not in data:
            data += next(chunks).decode()
        response_id = json.loads(data.split("\n\n")[0].split("data: ", 1)[1])["response"]["id"]
        during = call(server.port, "GET", f"/v1/responses/{response_id}").json()
        assert during["status"] == "in_progress"
        rschemas.validate("Response", during)
        cancelled = call(server.port, "POST", f"/v1/responses/{response_id}/cancel")
        assert cancelled.status == 200
        body = cancelled.json()
        rschemas.validate("Response", body)
        assert body["status"] == "cancelled" and body["usage"]["output_tokens"] < 200
        _GATE.allow(None)
        data += b"".join(chunks).decode()
    finally:
        _GATE.allow(None)
        conn.close()
    events = parse_events(data, rschemas)
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"] == body
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert streamed == text_of(body)
    assert call(server.port, "GET", f"/v1/responses/{response_id}").json() == body
    # The engine request is gone: the server holds nothing in flight.
    assert server.server.app.inflight == 0


def test_background_response_is_cancelled(gated_server, rschemas):
    server = gated_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        _GATE.allow(1)  # one step, then the engine waits: the response is certainly still generating
        made = client.responses.create(
            model=MODEL_NAME, input="Go on", background=True, max_output_tokens=200
        )
        assert made.status == "in_progress" and made.background is True
        rschemas.validate("Response", made.model_dump(mode="json", exclude_unset=True))
        assert client.responses.retrieve(made.id).status == "in_progress"
        cancelled = client.responses.cancel(made.id)
        assert cancelled.status == "cancelled" and cancelled.usage.output_tokens < 200
    finally:
        _GATE.allow(None)
    stored = call(server.port, "GET", f"/v1/responses/{made.id}").json()
    rschemas.validate("Response", stored)
    assert (
        stored["status"] == "cancelled" and stored["output"][0]["content"][0]["text"] == cancelled.output_text
    )


def test_background_response_completes(gated_server, rschemas):
    server = gated_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    made = client.responses.create(model=MODEL_NAME, input="Later", background=True, max_output_tokens=6)
    assert made.status == "in_progress"
    # Wait for the run itself (the app holds its task until it is done), then read the result.
    idle = threading.Event()
    for _ in range(6000):
        if not server.server.app.background_runs:
            break
        idle.wait(0.01)
    assert not server.server.app.background_runs, "the background run never ended"
    got = call(server.port, "GET", f"/v1/responses/{made.id}").json()
    rschemas.validate("Response", got)
    assert got["status"] == "incomplete" and got["usage"]["output_tokens"] == 6 and got["background"] is True
    foreground = create_raw(server, rschemas, input="Later", max_output_tokens=6, temperature=1.0)
    assert foreground["usage"]["input_tokens"] == got["usage"]["input_tokens"]
    assert server.server.app.inflight == 0


# -- function tools: chat's template rendering, grammar for required / named, parsers for the output ---------
# The chat tools in the Responses shape: the function's keys beside "type".
R_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]
R_TIME = R_TOOLS[1]


@pytest.fixture(scope="module")
def tool_server(long_model_dir):
    """The tiny model with room for tool prompts, served with the Hermes-style test template (its
    <tool_call> markup picks the parser)."""
    thread = start_server(
        long_model_dir,
        factory=engine_factory(long_model_dir, max_model_len=2048),
        chat_template=chat_template("hermes"),
    )
    yield thread
    thread.stop()


def _calls(response: dict) -> list[dict]:
    return [item for item in response["output"] if item["type"] == "function_call"]


def _check_call(item: dict) -> dict:
    parameters = {t["name"]: t["parameters"] for t in R_TOOLS}[item["name"]]
    arguments = json.loads(item["arguments"])
    jsonschema.validate(arguments, parameters)
    assert item["call_id"] and item["id"].startswith("fc_") and item["status"] == "completed"
    return arguments


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tool_choice_required_gives_function_calls(tool_server, rschemas, parallel, seed):
    # Sampled with a seed: greedy decoding of a random model spends the budget on JSON's free whitespace.
    body = {"input": "Weather in Paris?", "tools": R_TOOLS, "tool_choice": "required",
            "parallel_tool_calls": parallel, "max_output_tokens": 300, "seed": seed}  # fmt: skip
    r = create_raw(tool_server, rschemas, **body)
    assert r["status"] == "completed" and r["tool_choice"] == "required"
    assert [t["name"] for t in r["tools"]] == ["get_weather", "get_time"]
    calls = _calls(r)
    assert len(calls) >= 1 and (parallel or len(calls) == 1)
    for item in calls:
        _check_call(item)
    # The stream: each call an item, its arguments in deltas that add up to the object's.
    events = stream_raw(tool_server.port, rschemas, **body)
    assert events[-1]["type"] == "response.completed"
    streamed: dict[int, str] = {}
    for e in events:
        if e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call":
            assert e["item"]["arguments"] == "" and e["item"]["status"] == "in_progress"
            streamed[e["output_index"]] = ""
        elif e["type"] == "response.function_call_arguments.delta":
            streamed[e["output_index"]] += e["delta"]
        elif e["type"] == "response.function_call_arguments.done":
            assert e["arguments"] == streamed[e["output_index"]]
    assert [(c["name"], c["arguments"]) for c in _calls(events[-1]["response"])] == [
        (c["name"], c["arguments"]) for c in calls
    ]  # the same seed: the same calls
    assert list(streamed.values()) == [c["arguments"] for c in calls]


def test_named_tool_choice_and_the_round_trip(tool_server, rschemas):
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.responses.create(model=MODEL_NAME, input="What time is it?", tools=R_TOOLS,
                                tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=200,
                                extra_body={"seed": 0})  # fmt: skip
    rschemas.validate("Response", r.model_dump(mode="json", exclude_unset=True))
    (call_,) = [item for item in r.output if item.type == "function_call"]
    assert call_.name == "get_time" and json.loads(call_.arguments)["zone"] in ("UTC", "CET")
    # The next turn: the stored call and our result render as the assistant tool call and a tool message.
    result = {"type": "function_call_output", "call_id": call_.call_id, "output": "12:00"}
    follow = client.responses.create(model=MODEL_NAME, input=[result], previous_response_id=r.id, tools=R_TOOLS,
                                     tool_choice="none", max_output_tokens=4)  # fmt: skip
    history = [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call_.call_id, "type": "function", "function": {"name": "get_time", "arguments": call_.arguments}}]},
        {"role": "tool", "tool_call_id": call_.call_id, "content": "12:00"},
    ]  # fmt: skip
    # tool_choice none: the template is not shown the tools, so the prompt is the history alone.
    assert follow.usage.input_tokens == tokenize_messages(tool_server, history)
    assert not [item for item in follow.output if item.type == "function_call"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools"),
        ({"tools": R_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"tools": R_TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{**R_TIME, "parameters": {"type": "wizard"}}], "tool_choice": "required"}, "tools"),
    ],
)
def test_tool_request_errors(tool_server, rschemas, body, param):
    r = call(tool_server.port, "POST", "/v1/responses", {"input": "hi", "max_output_tokens": 4, **body})
    assert r.status == 400 and r.json()["error"]["param"] == param, r.body
    rschemas.validate("ErrorResponse", r.json())


def test_tools_on_a_template_that_cannot_show_them(server):
    """The shared server's plain ChatML template never reads tools: a clear 400, not ignored tools."""
    r = call(server.port, "POST", "/v1/responses", {"input": "hi", "tools": R_TOOLS})
    assert r.status == 400 and r.json()["error"]["param"] == "tools", r.body
