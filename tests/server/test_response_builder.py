"""response_builder: the SSE hot path builds exactly the JSON the general path does, and a JSON body equals
what a client folds from the stream's chunks for the same deltas (content, logprobs, text offsets)."""

import json
from itertools import zip_longest

import pytest

from fast_inference.engine.outputs import CompletionOutput, Logprob, RequestOutput
from fast_inference.server import sse
from fast_inference.server.errors import APIError
from fast_inference.server.response_builder import ChoicePiece, ChoiceState, ResponseBuilder, usage

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


def _builder(chat: bool, top_logprobs: int | None = None) -> ResponseBuilder:
    return ResponseBuilder(
        chat=chat, request_id="id-1", created=123, model='m"odel', fingerprint="fp", top_logprobs=top_logprobs
    )


def _json(chunk: bytes) -> dict:
    assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
    assert chunk.count(b"\n\n") == 1  # one event: the JSON never contains a raw newline
    return json.loads(chunk[6:-2])


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_text_chunk_matches_general_path(chat, text):
    builder = _builder(chat)
    fast = builder.text_chunk(3, text)
    general = sse.event({**builder._head, "choices": [builder._chunk_choice(ChoicePiece(3, text))]})
    assert fast == general
    choice = {"index": 3, "logprobs": None, "finish_reason": None}
    choice.update({"delta": {"content": text}} if chat else {"text": text})
    assert _json(fast) == {
        "id": "id-1",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 123,
        "model": 'm"odel',
        "system_fingerprint": "fp",
        "choices": [choice],
    }


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_delta_chunk_shortcut_is_chunk_of_piece(chat, text):
    builder = _builder(chat)
    delta = CompletionOutput(2, text, [5])
    expected = builder.piece(ChoiceState(2), delta)
    got = builder.delta_chunk(ChoiceState(2), delta)
    assert got == (None if expected.empty else builder.chunk(expected))


def test_other_chunks():
    builder = _builder(True)
    first = _json(builder.chunk(builder.role_piece(ChoiceState(0))))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = _json(builder.chunk(ChoicePiece(1, None, finish_reason="stop")))
    assert last["choices"][0] == {"index": 1, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    stopped = _json(builder.chunk(ChoicePiece(1, "x", finish_reason="stop", stop_reason="END")))
    assert stopped["choices"][0]["stop_reason"] == "END"
    tail = _json(builder.usage_chunk(usage(1, 2)))
    assert tail["choices"] == [] and tail["usage"]["total_tokens"] == 3
    assert sse.DONE == b"data: [DONE]\n\n"


def test_abort_is_a_server_error():
    with pytest.raises(APIError) as err:
        _builder(False).piece(ChoiceState(0), CompletionOutput(0, "", [], finish_reason="abort"))
    assert err.value.status == 503


# -- a body is the fold of the stream's pieces -----------------------------------------------------------
TOKENS = {5: " the", 6: " cat", 7: "é", 8: "\n", 9: " sat"}


def _entries(chosen: int) -> dict[int, Logprob]:
    other = 9 if chosen != 9 else 5
    return {
        chosen: Logprob(-0.5 - chosen / 10, 1 if chosen < other else 2, TOKENS[chosen]),
        other: Logprob(-1.5, 2 if chosen < other else 1, TOKENS[other]),
    }


def _deltas(index: int, ids: list[int], finish: str, stop_reason=None) -> list[CompletionOutput]:
    """One delta per token, then a last delta with no tokens that carries the finish reason."""
    out = [CompletionOutput(index, TOKENS[t], [t], None, [_entries(t)]) for t in ids]
    out.append(CompletionOutput(index, "", [], None, [], finish, stop_reason))
    return out


def _client_fold(chunks: list[dict], chat: bool) -> dict[int, dict]:
    """What a client reassembles from the chunks: content and logprobs concatenated, the last finish."""
    choices: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            acc = choices.setdefault(c["index"], {"content": "", "logprobs": None, "finish_reason": None})
            acc["content"] += (c["delta"].get("content") or "") if chat else c["text"]
            if c["logprobs"] is not None:
                if acc["logprobs"] is None:
                    acc["logprobs"] = {
                        k: list(v) if isinstance(v, list) else v for k, v in c["logprobs"].items()
                    }
                else:
                    for k, v in c["logprobs"].items():
                        if isinstance(v, list):
                            acc["logprobs"][k] += v
            if c["finish_reason"] is not None:
                acc["finish_reason"] = c["finish_reason"]
    return choices


@pytest.mark.parametrize("chat,echo", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("top_logprobs", [None, 0, 2])
def test_body_is_the_fold_of_the_stream(chat, echo, top_logprobs):
    builder = _builder(chat, top_logprobs)
    prompt_ids = [5, 6]
    prompt_text = " the cat"
    prompt_lps = [None, _entries(6)]
    seqs = [_deltas(0, [7, 8, 9], "stop", "END"), _deltas(1, [9, 5], "length")]
    final = RequestOutput("r", None, prompt_ids, [], False, prompt_logprobs=prompt_lps)

    def echo_logprobs():
        return builder.prompt_logprobs(final, lambda t: TOKENS[t]) if top_logprobs is not None else None

    # The stream: a piece per delta, each sent as a chunk.
    states = [ChoiceState(0), ChoiceState(1)]
    chunks = []
    for state in states:
        if chat:
            chunks.append(builder.chunk(builder.role_piece(state)))
        if echo:
            chunks.append(builder.chunk(builder.echo_piece(state, prompt_text, echo_logprobs())))
    for step in zip_longest(*seqs):
        for c in filter(None, step):
            final.add(RequestOutput("r", None, prompt_ids, [c], False))
            state = states[c.index]
            if not state.finished:
                chunk = builder.delta_chunk(state, c)
                if chunk is not None:
                    chunks.append(chunk)
    streamed = _client_fold([_json(c) for c in chunks], chat)

    # The body: the same pieces folded, from the folded engine output.
    folded = []
    for c in final.outputs:
        state = ChoiceState(c.index)
        if echo:
            state.add(builder.echo_piece(state, prompt_text, echo_logprobs()))
        state.add(builder.piece(state, c))
        folded.append(state)
    body = builder.body(folded, usage(2, 5))
    assert body["object"] == ("chat.completion" if chat else "text_completion")
    for choice in body["choices"]:
        got = streamed[choice["index"]]
        text = choice["message"]["content"] if chat else choice["text"]
        assert text == got["content"]
        assert choice["logprobs"] == got["logprobs"]
        assert choice["finish_reason"] == got["finish_reason"]
        if top_logprobs is not None and not chat:
            lp = choice["logprobs"]
            assert lp["tokens"][0] == (" the" if echo else TOKENS[seqs[choice["index"]][0].token_ids[0]])
            assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
            assert all(len(top) <= top_logprobs for top in lp["top_logprobs"] if top is not None)
            if echo:
                assert lp["token_logprobs"][0] is None and lp["text_offset"][2] == len(prompt_text)
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["choices"][0]["stop_reason"] == "END"
