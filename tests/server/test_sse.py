"""The SSE hot path builds exactly the JSON a dict + json.dumps would, for any text."""

import json

import pytest

from fast_inference.server.sse import DONE, ChunkEncoder

TEXTS = [
    "",
    "hello",
    ' "quoted" ',
    "new\nline\ttab\\slash",
    "é你好🙂",
    "\x00\x1f control",
    "\u2028\u2029",
    "</script>",
]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_text_chunk_matches_json(chat, text):
    enc = ChunkEncoder(chat=chat, request_id="id-1", created=123, model='m"odel', fingerprint="fp")
    raw = enc.text(3, text)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    got = json.loads(raw[6:-2])
    choice = {"index": 3, "logprobs": None, "finish_reason": None}
    choice.update({"delta": {"content": text}} if chat else {"text": text})
    expected = {
        "id": "id-1",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 123,
        "model": 'm"odel',
        "system_fingerprint": "fp",
        "choices": [choice],
    }
    assert got == expected
    assert raw.count(b"\n\n") == 1  # one event: the JSON never contains a raw newline


def test_other_chunks():
    enc = ChunkEncoder(chat=True, request_id="x", created=1, model="m", fingerprint="fp")
    first = json.loads(enc.choice(0, "", role=True)[6:-2])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = json.loads(enc.choice(1, None, finish_reason="stop")[6:-2])
    assert last["choices"][0] == {"index": 1, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    usage = json.loads(enc.usage({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})[6:-2])
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3
    assert DONE == b"data: [DONE]\n\n"
