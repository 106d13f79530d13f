"""The OpenAI API surface against a live server: official client (sync/async/stream), schemas, every param."""

import asyncio
import base64
import struct

import openai
import pytest

from .conftest import MODEL_NAME
from .rawhttp import call, sse_events

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_raw(server, schemas, **body):
    r = call(server.port, "POST", "/v1/chat/completions", {"model": MODEL_NAME, "messages": CHAT, **body})
    assert r.status == 200, r.body
    data = r.json()
    schemas.validate("CreateChatCompletionResponse", data)
    return data


def completion_raw(server, schemas, **body):
    r = call(server.port, "POST", "/v1/completions", {"model": MODEL_NAME, **body})
    assert r.status == 200, r.body
    data = r.json()
    schemas.validate("CreateCompletionResponse", data)
    return data


def stream_chat(server, schemas, **body):
    status, events = sse_events(
        server.port, "/v1/chat/completions", {"model": MODEL_NAME, "messages": CHAT, "stream": True, **body}
    )
    assert status == 200, events
    assert events[-1] == "DONE" and "DONE" not in events[:-1]
    for chunk in events[:-1]:
        schemas.validate("CreateChatCompletionStreamResponse", chunk)
    return events[:-1]


def stream_completion(server, schemas, **body):
    status, events = sse_events(server.port, "/v1/completions", {"model": MODEL_NAME, "stream": True, **body})
    assert status == 200, events
    assert events[-1] == "DONE" and "DONE" not in events[:-1]
    for chunk in events[:-1]:
        schemas.validate_completion_chunk(chunk)
    return events[:-1]


def test_chat_sync_client(client, server, schemas):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL_NAME and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == r.usage.total_tokens - r.usage.prompt_tokens > 0
    data = chat_raw(server, schemas, max_tokens=12, temperature=0)
    assert data["choices"][0]["message"]["content"] == r.choices[0].message.content  # greedy is deterministic
    assert data["system_fingerprint"] and isinstance(data["created"], int)


def test_chat_params(server, schemas):
    data = chat_raw(server, schemas, max_completion_tokens=5, temperature=0, n=3, ignore_eos=True)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    texts = {c["message"]["content"] for c in data["choices"]}
    assert len(texts) == 1  # greedy: all n samples agree
    assert data["usage"]["completion_tokens"] == 15
    assert all(c["finish_reason"] == "length" for c in data["choices"])
    # seeded sampling reproduces itself
    a = chat_raw(
        server, schemas, max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True
    )
    b = chat_raw(
        server, schemas, max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True
    )
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    # every sampling parameter is accepted and mapped
    chat_raw(
        server,
        schemas,
        max_tokens=4,
        temperature=0.7,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.1,
        stop=["\n"],
        stop_token_ids=[5],
        min_tokens=2,
        logit_bias={"7": 1.5},
        user="me",
        response_format={"type": "text"},
        skip_special_tokens=False,
        some_unknown_field={"ignored": True},
    )
    # messages: developer role, text parts, assistant history, tool messages
    msgs = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hi"},
        {"role": "tool", "content": "42", "tool_call_id": "x"},
        {"role": "user", "content": "more"},
    ]
    r = call(
        server.port, "POST", "/v1/chat/completions", {"model": MODEL_NAME, "messages": msgs, "max_tokens": 3}
    )
    assert r.status == 200, r.body
    schemas.validate("CreateChatCompletionResponse", r.json())


def test_max_tokens_and_stop(server, schemas):
    base = chat_raw(server, schemas, max_tokens=16, temperature=0, ignore_eos=True)
    text = base["choices"][0]["message"]["content"]
    assert base["usage"]["completion_tokens"] == 16 and base["choices"][0]["finish_reason"] == "length"
    # stop at a substring of the greedy answer: output is the text before it, finish_reason stop
    stop = text[3:6] if len(text.strip()) >= 6 else None
    if stop and text.find(stop) > 0:
        cut = chat_raw(server, schemas, max_tokens=16, temperature=0, ignore_eos=True, stop=stop)
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert cut["choices"][0]["message"]["content"] == text[: text.find(stop)]


def test_chat_logprobs(server, schemas):
    data = chat_raw(
        server, schemas, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True
    )
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for item in content:
        assert len(item["top_logprobs"]) == 3
        assert item["logprob"] <= 0
        # greedy: the chosen token is the most likely one
        assert item["top_logprobs"][0]["token"] == item["token"]
        assert item["bytes"] == list(item["token"].encode())
    none = chat_raw(server, schemas, max_tokens=2)
    assert none["choices"][0]["logprobs"] is None


def test_completions_prompt_forms(server, schemas, client):
    one = completion_raw(server, schemas, prompt="Hello, world", max_tokens=6, temperature=0)
    assert one["object"] == "text_completion" and len(one["choices"]) == 1
    tok = call(server.port, "POST", "/tokenize", {"prompt": "Hello, world"}).json()["tokens"]
    ids = completion_raw(server, schemas, prompt=tok, max_tokens=6, temperature=0)
    assert ids["choices"][0]["text"] == one["choices"][0]["text"]
    assert ids["usage"]["prompt_tokens"] == len(tok)
    many = completion_raw(
        server, schemas, prompt=["Hello, world", "The quick"], max_tokens=6, temperature=0, n=2
    )
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["choices"][0]["text"] == one["choices"][0]["text"]
    lists = completion_raw(server, schemas, prompt=[tok, tok[:2]], max_tokens=3, temperature=0)
    assert len(lists["choices"]) == 2
    echo = completion_raw(server, schemas, prompt="Hello, world", max_tokens=6, temperature=0, echo=True)
    assert echo["choices"][0]["text"] == "Hello, world" + one["choices"][0]["text"]
    r = client.completions.create(model=MODEL_NAME, prompt="Paris is", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completions_logprobs(server, schemas):
    data = completion_raw(
        server, schemas, prompt="The quick brown", max_tokens=5, temperature=0, logprobs=2, ignore_eos=True
    )
    lp = data["choices"][0]["logprobs"]
    assert (
        len(lp["tokens"])
        == len(lp["token_logprobs"])
        == len(lp["top_logprobs"])
        == len(lp["text_offset"])
        == 5
    )
    if not any("\ufffd" in t for t in lp["tokens"]):  # byte-level pieces of one character decode to U+FFFD
        assert "".join(lp["tokens"]) == data["choices"][0]["text"]
    assert lp["text_offset"] == sorted(lp["text_offset"])
    assert lp["text_offset"][0] == 0
    assert all(len(t) <= 2 for t in lp["top_logprobs"])


def check_chat_stream(events, n):
    roles = {}
    finishes = {}
    text = {}
    for chunk in events:
        if not chunk["choices"]:
            continue
        (choice,) = chunk["choices"]
        k = choice["index"]
        if k not in roles:
            assert choice["delta"].get("role") == "assistant", "first chunk of a choice carries the role"
            roles[k] = True
        else:
            assert "role" not in choice["delta"]
        assert k not in finishes, "no chunk after the finishing one"
        if choice["finish_reason"] is not None:
            finishes[k] = choice["finish_reason"]
        text[k] = text.get(k, "") + (choice["delta"].get("content") or "")
    assert sorted(finishes) == list(range(n))
    return text


def test_chat_stream_matches_non_stream(server, schemas):
    full = chat_raw(server, schemas, max_tokens=20, temperature=0, n=2)
    events = stream_chat(
        server, schemas, max_tokens=20, temperature=0, n=2, stream_options={"include_usage": True}
    )
    text = check_chat_stream(events, 2)
    assert text[0] == text[1] == full["choices"][0]["message"]["content"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]
    ids = {e["id"] for e in events}
    assert len(ids) == 1
    no_usage = stream_chat(server, schemas, max_tokens=3)
    assert all("usage" not in e for e in no_usage)


def test_chat_stream_logprobs(server, schemas):
    events = stream_chat(
        server, schemas, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, ignore_eos=True
    )
    tokens = [t for e in events for c in e["choices"] if c.get("logprobs") for t in c["logprobs"]["content"]]
    assert len(tokens) == 6


def test_completion_stream(server, schemas):
    full = completion_raw(server, schemas, prompt=["Hello", "Numbers:"], max_tokens=12, temperature=0)
    events = stream_completion(
        server,
        schemas,
        prompt=["Hello", "Numbers:"],
        max_tokens=12,
        temperature=0,
        stream_options={"include_usage": True},
    )
    text = {0: "", 1: ""}
    finishes = []
    for chunk in events:
        for choice in chunk["choices"]:
            text[choice["index"]] += choice["text"]
            if choice["finish_reason"]:
                finishes.append(choice["index"])
    assert sorted(finishes) == [0, 1]
    assert [text[0], text[1]] == [c["text"] for c in full["choices"]]
    assert events[-1]["usage"] == full["usage"]


def test_openai_client_streaming(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        parts.extend(c.delta.content or "" for c in chunk.choices)
    full = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=10, temperature=0)
    assert "".join(parts) == full.choices[0].message.content
    assert usage.completion_tokens == full.usage.completion_tokens
    texts = [
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL_NAME, prompt="Hi", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    ]
    assert (
        "".join(texts)
        == client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=5, temperature=0)
        .choices[0]
        .text
    )


def test_async_client(server):
    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
            r = await aclient.chat.completions.create(
                model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0
            )
            stream = await aclient.chat.completions.create(
                model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0, stream=True
            )
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            emb = await aclient.embeddings.create(model=MODEL_NAME, input="hello")
            return r, "".join(parts), emb

    r, streamed, emb = asyncio.run(main())
    assert streamed == r.choices[0].message.content
    assert len(emb.data[0].embedding) > 0


def test_embeddings(server, schemas, client):
    r = call(
        server.port, "POST", "/v1/embeddings", {"model": MODEL_NAME, "input": ["hello world", "the fox"]}
    )
    assert r.status == 200, r.body
    data = r.json()
    schemas.validate("CreateEmbeddingResponse", data)
    vectors = [d["embedding"] for d in data["data"]]
    assert [d["index"] for d in data["data"]] == [0, 1]
    for v in vectors:
        assert abs(sum(x * x for x in v) - 1.0) < 1e-3  # normalised
    b64 = call(
        server.port,
        "POST",
        "/v1/embeddings",
        {"model": MODEL_NAME, "input": "hello world", "encoding_format": "base64"},
    ).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert max(abs(a - b) for a, b in zip(decoded, vectors[0])) < 1e-5
    assert client.embeddings.create(model=MODEL_NAME, input=[[1, 2, 3]]).usage.prompt_tokens == 3


def test_models(server, schemas, client):
    r = call(server.port, "GET", "/v1/models")
    schemas.validate("ListModelsResponse", r.json())
    assert [m["id"] for m in r.json()["data"]] == [MODEL_NAME, "alias"]
    one = call(server.port, "GET", f"/v1/models/{MODEL_NAME}")
    schemas.validate("Model", one.json())
    missing = call(server.port, "GET", "/v1/models/nope")
    assert missing.status == 404
    schemas.validate("ErrorResponse", missing.json())
    assert client.models.retrieve("alias").id == "alias"
    assert call(server.port, "GET", "/v1/models/tiny%2Dtest").json()["id"] == MODEL_NAME  # percent-decoded


def test_tokenize_detokenize(server):
    for prefix in ("", "/v1"):
        r = call(server.port, "POST", prefix + "/tokenize", {"prompt": "Hello, world!"}).json()
        assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] > 0
        back = call(server.port, "POST", prefix + "/detokenize", {"tokens": r["tokens"]}).json()
        assert back["prompt"] == "Hello, world!"
    chat = call(server.port, "POST", "/tokenize", {"messages": CHAT}).json()
    assert chat["count"] > r["count"]
    assert call(server.port, "POST", "/detokenize", {"tokens": [10**9]}).status == 400


def test_health_ping_version_metrics(server):
    assert call(server.port, "GET", "/health").status == 200
    assert call(server.port, "GET", "/ping").body == b"pong"
    assert "version" in call(server.port, "GET", "/version").json()
    call(server.port, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 3})
    text = call(server.port, "GET", "/metrics").body.decode()
    for name in (
        "fast_inference_requests_total",
        "fast_inference_prompt_tokens_total",
        "fast_inference_generation_tokens_total",
        "fast_inference_time_to_first_token_seconds_bucket",
        "fast_inference_inter_token_latency_seconds_bucket",
        "fast_inference_num_requests_running",
        "fast_inference_num_requests_waiting",
        "fast_inference_kv_cache_usage_perc",
    ):
        assert name in text, name
    assert 'endpoint="/v1/completions",status="200"' in text
    for line in text.splitlines():  # every sample line is `name{labels} value`
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"messages": CHAT, "temperature": 5}, 400, "temperature"),
        ({"messages": CHAT, "top_p": 0}, 400, "top_p"),
        ({"messages": CHAT, "n": 0}, 400, "n"),
        ({"messages": CHAT, "seed": 2**64}, 400, "seed"),
        ({"messages": CHAT, "max_tokens": "many"}, 400, "max_tokens"),
        ({"messages": CHAT, "stop": 3}, 400, "stop"),
        ({"messages": CHAT, "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ({"messages": CHAT, "top_logprobs": 30, "logprobs": True}, 400, "top_logprobs"),
        ({"messages": CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"messages": CHAT, "response_format": {"type": "xml"}}, 400, "response_format"),
        (
            {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            400,
            "response_format",
        ),
        ({"messages": CHAT, "audio": {"voice": "alloy", "format": "wav"}}, 400, "audio"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ]
            },
            400,
            "messages[0]",
        ),
        ({"messages": CHAT, "model": "gpt-4"}, 404, "model"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
        ({"messages": CHAT, "max_tokens": 100000}, 400, "messages"),
    ],
)
def test_chat_errors(server, schemas, body, status, param):
    body = {"model": MODEL_NAME, **body}
    r = call(server.port, "POST", "/v1/chat/completions", body)
    assert r.status == status, r.body
    schemas.validate("ErrorResponse", r.json())
    assert r.json()["error"]["param"] == param
    if "unsupported" in (r.json()["error"]["code"] or ""):
        assert "not supported" in r.json()["error"]["message"]
    # the same fault on a streaming request is a real status, not a 200 stream
    status2, events = sse_events(
        server.port, "/v1/chat/completions", {"max_tokens": 4, **body, "stream": True, "stream_options": None}
    )
    if param != "stream_options":
        assert status2 == status


def test_completion_errors(server, schemas):
    for body, param in [
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 10**9]}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({"prompt": "word " * 400}, "prompt"),
    ]:
        r = call(server.port, "POST", "/v1/completions", {"model": MODEL_NAME, **body})
        assert r.status == 400, (body, r.body)
        schemas.validate("ErrorResponse", r.json())
        assert r.json()["error"]["param"] == param
    r = call(server.port, "POST", "/v1/embeddings", {"model": MODEL_NAME, "input": "x", "dimensions": 8})
    assert r.status == 400 and r.json()["error"]["param"] == "dimensions"


def test_http_level_errors(server, schemas):
    bad = call(server.port, "POST", "/v1/chat/completions", b"{not json")
    assert bad.status == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert call(server.port, "POST", "/v1/chat/completions", b"[1, 2]").status == 400
    nf = call(server.port, "GET", "/v2/nothing")
    assert nf.status == 404
    schemas.validate("ErrorResponse", nf.json())
    wrong = call(server.port, "GET", "/v1/chat/completions")
    assert wrong.status == 405 and "POST" in wrong.headers["allow"]
    schemas.validate("ErrorResponse", wrong.json())


def test_client_error_types(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=9)
    assert info.value.body["param"] == "temperature"


def test_concurrent_embeddings_are_batched(server):
    import threading
    import time

    engine = server.server.engine.engine
    real_embed = engine.embed
    calls = []

    def recording_embed(token_id_lists):
        calls.append(len(token_id_lists))
        if len(calls) == 1:
            time.sleep(0.5)  # hold the engine thread so the others queue up behind this call
        return real_embed(token_id_lists)

    engine.embed = recording_embed
    try:
        results = []

        def one(i):
            results.append(
                call(server.port, "POST", "/v1/embeddings", {"model": MODEL_NAME, "input": f"text {i}"})
            )

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        threads[0].start()
        time.sleep(0.2)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.embed = real_embed
    assert all(r.status == 200 for r in results)
    assert sum(calls) == 8 and len(calls) < 8, calls  # the 7 waiting requests shared engine calls
    # a batched answer equals the answer alone
    alone = call(server.port, "POST", "/v1/embeddings", {"model": MODEL_NAME, "input": "text 3"}).json()
    batched = [
        r.json() for r in results if r.json()["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]
    ]
    assert any(
        max(abs(a - b) for a, b in zip(b["data"][0]["embedding"], alone["data"][0]["embedding"])) < 1e-4
        for b in batched
    )


def test_large_request_tokenized_off_loop(server, schemas):
    # A body over the in-line limit is tokenized on the tokenizer thread: same answer as in line.
    small = completion_raw(server, schemas, prompt="Hello, world", max_tokens=6, temperature=0)
    big = completion_raw(server, schemas, prompt="Hello, world", max_tokens=6, temperature=0, pad="x" * 20000)
    assert big["choices"][0]["text"] == small["choices"][0]["text"]
    chat_small = chat_raw(server, schemas, max_tokens=5, temperature=0)
    chat_big = chat_raw(server, schemas, max_tokens=5, temperature=0, pad="x" * 20000)
    assert chat_big["choices"][0]["message"]["content"] == chat_small["choices"][0]["message"]["content"]
    too_long = call(server.port, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "word " * 5000})
    assert too_long.status == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    emb = call(
        server.port, "POST", "/v1/embeddings", {"model": MODEL_NAME, "input": "hi", "pad": "y" * 20000}
    )
    assert emb.status == 200


def test_completion_stream_echo_and_logprobs(server, schemas):
    full = completion_raw(server, schemas, prompt="The quick", max_tokens=5, temperature=0, echo=True)
    events = stream_completion(server, schemas, prompt="The quick", max_tokens=5, temperature=0, echo=True)
    assert "".join(c["choices"][0]["text"] for c in events) == full["choices"][0]["text"]
    assert events[0]["choices"][0]["text"] == "The quick"  # the echoed prompt comes first
    events = stream_completion(
        server, schemas, prompt="The quick", max_tokens=5, temperature=0, logprobs=2, ignore_eos=True
    )
    tokens = [t for e in events for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert len(tokens) == 5


def test_echo_with_logprobs(server, schemas, model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = [5, 17, 42, 9, 101, 33]
    # Not schema-validated: the OpenAI spec subset types token_logprobs items as numbers, while the API
    # (and this brief) answer null for the first prompt token, which nothing predicts.
    r = call(server.port, "POST", "/v1/completions", {
        "model": MODEL_NAME, "prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0,
    })  # fmt: skip
    assert r.status == 200, r.body
    body = r.json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(prompt) + 3 == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts token 0
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    for pos in range(1, len(prompt)):
        assert lp["token_logprobs"][pos] == pytest.approx(float(ref[pos - 1, prompt[pos]]), abs=1e-4)
        assert len(lp["top_logprobs"][pos]) <= 2
        best = max(lp["top_logprobs"][pos].values())
        assert best == pytest.approx(float(ref[pos - 1].max()), abs=1e-4)
    # The same request streamed: the same logprobs, the echoed prompt first.
    status, events = sse_events(server.port, "/v1/completions", {
        "model": MODEL_NAME, "prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 3,
        "temperature": 0, "stream": True,
    })  # fmt: skip
    assert status == 200
    chunks = [e for e in events if isinstance(e, dict)]
    streamed = [
        t for c in chunks for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["token_logprobs"]
    ]
    assert streamed == lp["token_logprobs"]
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == body["choices"][0]["text"]
