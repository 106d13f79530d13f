"""A chat choice's text split into OpenAI's message fields: reasoning_content, content and tool_calls (or the
deprecated function_call), whole for the non-stream message or as stream deltas; the reasoning parser
runs first, the tool-call parser reads what it leaves as content."""

from dataclasses import dataclass

from .reasoning_parsers import ReasoningParser
from .tool_parsers import NamedToolParser, RequiredToolParser, call_id_factory, make_tool_parser
from .tools import ToolRequest


@dataclass(slots=True)
class ChatOutputSpec:
    """How a request's choices are parsed (one ChoiceParser per choice)."""

    prompt: str  # the rendered prompt: a template that opens the thinking ends it with <think>
    reasoning_parser: str | None = None
    tools: ToolRequest | None = None
    tool_call_parser: str | None = None  # the markup parser for auto (its id style for forced calls)

    def new_choice(self) -> "ChoiceParser":
        return ChoiceParser(self)


class ChoiceParser:
    def __init__(self, spec: ChatOutputSpec) -> None:
        self.spec = spec
        tools = spec.tools
        forced = tools is not None and tools.choice in ("required", "function")
        # A grammar-forced choice is JSON from its first token: there is no reasoning section to find.
        self.reasoning = None
        if spec.reasoning_parser and not forced:
            self.reasoning = ReasoningParser(spec.reasoning_parser, spec.prompt)
        self.legacy = tools is not None and tools.legacy
        self.tool_parser = self._tool_parser()
        self._message_calls: bool | None = None  # set by message(): whether the whole text's calls parsed

    def _tool_parser(self):
        tools = self.spec.tools
        if tools is None or tools.choice == "none" or not tools.tools:
            return None
        new_id = call_id_factory(self.spec.tool_call_parser)
        if tools.choice == "function":
            return NamedToolParser(tools.function, new_id)
        if tools.choice == "required":
            return RequiredToolParser(tools.max_calls, new_id)
        return make_tool_parser(self.spec.tool_call_parser, tools.max_calls)

    @property
    def called(self) -> bool:
        if self._message_calls is not None:
            return self._message_calls
        return self.tool_parser is not None and bool(self.tool_parser.calls)

    def finish_reason(self, reason: str | None) -> str | None:
        if reason == "stop" and self.called:
            return "function_call" if self.legacy else "tool_calls"
        return reason

    # -- streaming -----------------------------------------------------------------------------------
    def feed(self, text: str) -> list[dict]:
        """New text of the choice -> delta fields, in order ({"content"}, {"reasoning_content"},
        {"tool_calls": [item]} or {"function_call"})."""
        if not text:
            return []
        events = self.reasoning.feed(text) if self.reasoning else [("content", text)]
        return self._deltas(events, final=False)

    def finish(self) -> list[dict]:
        events = self.reasoning.finish() if self.reasoning else []
        return self._deltas(events, final=True)

    def _deltas(self, events, final: bool) -> list[dict]:
        out: list[dict] = []
        for kind, value in events:
            if kind == "reasoning":
                _add(out, "reasoning_content", value)
            elif self.tool_parser is None:
                _add(out, "content", value)
            else:
                self._tool_events(self.tool_parser.feed(value), out)
        if final and self.tool_parser is not None:
            self._tool_events(self.tool_parser.finish(), out)
        return out

    def _tool_events(self, events, out: list[dict]) -> None:
        for kind, value in events:
            if kind == "content":
                _add(out, "content", value)
            elif self.legacy:
                out.append({"function_call": dict(value["function"])})
            else:
                out.append({"tool_calls": [value]})

    # -- whole ---------------------------------------------------------------------------------------
    def message(self, text: str) -> dict:
        """The non-stream message fields for the whole text: content (None when only calls were made),
        reasoning_content when a reasoning parser runs, tool_calls (or function_call) when calls parse."""
        fields: dict = {}
        content = text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.parse(text)
            fields["reasoning_content"] = reasoning
            content = content if content or reasoning is None else None  # all thinking: no answer
        calls: list[dict] = []
        if self.tool_parser is not None and content is not None:
            content, calls = self.tool_parser.parse(content)
        fields["content"] = content
        self._message_calls = bool(calls)
        if calls and self.legacy:
            fields["function_call"] = calls[0]["function"]
        elif calls:
            fields["tool_calls"] = calls
        return fields


def _add(out: list[dict], key: str, text: str) -> None:
    if not text:
        return
    if out and list(out[-1]) == [key]:
        out[-1] = {key: out[-1][key] + text}
    else:
        out.append({key: text})
