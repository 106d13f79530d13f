"""Reasoning models: the <think> parsers on fixed strings and every split of them (no tag text ever leaks),
enable_thinking into the template, and reasoning_content through the server and the official openai client."""

import itertools

import openai
import pytest

from fast_inference.server.chat_output import ChatOutputSpec
from fast_inference.server.reasoning_parsers import ReasoningParser, prompt_opens_thinking
from fast_inference.server.tools import parse_tools

from .conftest import MODEL_NAME, chat_template, engine_factory, start_server
from .rawhttp import sse_events

USER = [{"role": "user", "content": "Why is the sky blue?"}]

CASES = [
    # parser, prompt, text, reasoning, content
    ("qwen3", "", "<think>\nRayleigh scattering. </think>\n\nShort waves scatter more.", "\nRayleigh scattering. ",
     "Short waves scatter more."),
    ("qwen3", "", "No thinking here, a <think> later is text.", None, "No thinking here, a <think> later is text."),
    ("qwen3", "", "  <thin", None, "  <thin"),  # a tag's prefix that never completes is content
    ("qwen3", "...<think>\n", "opened by the prompt</think>answer", "opened by the prompt", "answer"),
    ("qwen3", "", "<think>ran out while thinking </th", "ran out while thinking </th", ""),
    ("deepseek_r1", "<think>\n", "reasoning < and </ and </think>\nThe answer.", "reasoning < and </ and ",
     "The answer."),
    ("deepseek_r1", "", "<think>tag written by the model</think>ok", "tag written by the model", "ok"),
    ("deepseek_r1", "", "never closed", "never closed", ""),
]  # fmt: skip


def feed_all(parser: ReasoningParser, chunks) -> tuple[str | None, str]:
    reasoning, content = [], []
    for chunk in [*chunks, None]:
        events = parser.feed(chunk) if chunk is not None else parser.finish()
        for kind, text in events:
            assert text
            (reasoning if kind == "reasoning" else content).append(text)
    return ("".join(reasoning) if reasoning else None), "".join(content)


def splits(text: str, pieces: int):
    for cuts in itertools.combinations(range(1, len(text)), pieces - 1):
        bounds = [0, *cuts, len(text)]
        yield [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("name,prompt,text,reasoning,content", CASES)
def test_reasoning_parser_whole(name, prompt, text, reasoning, content):
    assert ReasoningParser(name, prompt).parse(text) == (reasoning, content)


@pytest.mark.parametrize("name,prompt,text,reasoning,content", CASES)
def test_reasoning_parser_every_split(name, prompt, text, reasoning, content):
    """Every split into 1, 2 and 3 chunks gives the whole text's split. A stream cannot take text back, so
    equal concatenations also mean no chunk ever carried tag text the whole parse drops."""
    for pieces in (1, 2, 3):
        for chunks in splits(text, pieces):
            assert feed_all(ReasoningParser(name, prompt), chunks) == (reasoning, content), chunks


@pytest.mark.parametrize("name,prompt", [("qwen3", ""), ("qwen3", "<think>\n"), ("deepseek_r1", "")])
def test_reasoning_parser_random_texts_split_anywhere(name, prompt):
    import random

    rng = random.Random(99)
    fragments = ["<think>", "</think>", "<th", "</", "<", ">", " ", "\n", "word", "</think", "k>"]
    for _ in range(1000):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 10)))
        expected = ReasoningParser(name, prompt).parse(text)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 4))) if len(text) > 1 else []
        chunks = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
        assert feed_all(ReasoningParser(name, prompt), chunks) == expected, (text, chunks)


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_reasoning_then_tool_call():
    """The tool-call parser reads what the reasoning parser leaves as content, chunk by chunk."""
    spec = ChatOutputSpec(
        "", "qwen3", parse_tools({"tools": [{"type": "function", "function": {"name": "f"}}]})
    )
    spec.tool_call_parser = "hermes"
    text = '<think>I should call f.</think>\n\n<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    whole = spec.new_choice().message(text)
    assert whole["reasoning_content"] == "I should call f." and whole["content"] is None
    assert whole["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    for chunks in splits(text, 3):
        parser = spec.new_choice()
        deltas = [d for c in chunks for d in parser.feed(c)] + parser.finish()
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "I should call f."
        assert not any("content" in d for d in deltas)
        items = [item for d in deltas for item in d.get("tool_calls", [])]
        assert items[0]["function"]["name"] == "f"
        assert "".join(i["function"]["arguments"] for i in items) == '{"x": 1}'
        assert parser.finish_reason("stop") == "tool_calls"


# -- the server --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(model_dir):
    """The same tiny model behind a DeepSeek-R1 style template without a parser (the raw text), with the
    deepseek_r1 parser, and behind the Hermes/Qwen style template with the qwen3 parser."""
    r1 = chat_template("deepseek_r1")
    qwen = chat_template("hermes")
    configs = {
        "plain": {"chat_template": r1},
        "deepseek_r1": {"chat_template": r1, "reasoning_parser": "deepseek_r1"},
        "qwen3": {"chat_template": qwen, "reasoning_parser": "qwen3"},
    }
    threads = {
        name: start_server(model_dir, factory=engine_factory(model_dir, max_model_len=512), **config)
        for name, config in configs.items()
    }
    yield threads
    for thread in threads.values():
        thread.stop()


def client_of(thread) -> openai.OpenAI:
    return openai.OpenAI(base_url=thread.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def streamed(thread, schemas, body: dict) -> tuple[str, str, str | None]:
    status, events = sse_events(thread.port, "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and events[-1] == "DONE", events
    reasoning = content = ""
    finish = None
    for chunk in events[:-1]:
        schemas.validate("CreateChatCompletionStreamResponse", chunk)
        for choice in chunk["choices"]:
            reasoning += choice["delta"].get("reasoning_content") or ""
            content += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
    return reasoning, content, finish


def test_open_thinking_goes_to_reasoning_content(servers, schemas):
    """The R1 template opens <think> in the prompt: a random model never closes it, so its whole greedy
    output is reasoning_content, exactly the text the parser-less server answers as content."""
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 16, "temperature": 0}
    plain = client_of(servers["plain"]).chat.completions.create(**body).choices[0].message.content
    assert plain and "</think>" not in plain
    r = client_of(servers["deepseek_r1"]).chat.completions.create(**body)
    schemas.validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] == plain and message.content is None
    reasoning, content, finish = streamed(servers["deepseek_r1"], schemas, body)
    assert (reasoning, content, finish) == (plain, "", r.choices[0].finish_reason)


def test_enable_thinking_off_gives_content(servers, schemas):
    """enable_thinking false (top-level or in chat_template_kwargs) closes the thinking in the prompt."""
    client = client_of(servers["qwen3"])
    base = {"model": MODEL_NAME, "messages": USER, "max_tokens": 12, "temperature": 0}
    on = client.chat.completions.create(**base)
    off = client.chat.completions.create(**base, extra_body={"enable_thinking": False})
    off_kwargs = client.chat.completions.create(
        **base, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert off.usage.prompt_tokens == off_kwargs.usage.prompt_tokens > on.usage.prompt_tokens
    for r in (on, off):
        schemas.validate("CreateChatCompletionResponse", r.model_dump(exclude_unset=True))
        assert r.choices[0].message.model_extra["reasoning_content"] is None  # no <think> written
        assert isinstance(r.choices[0].message.content, str)
    _, content, _ = streamed(servers["qwen3"], schemas, {**base, "enable_thinking": False})
    assert content == off.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            **base, extra_body={"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}}
        )
    assert err.value.body["param"] == "enable_thinking"
