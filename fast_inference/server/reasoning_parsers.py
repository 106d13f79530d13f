"""Reasoning parsers: a reasoning model's `<think>...</think>` text -> reasoning_content, the rest -> content,
fed as it streams (never leaking tag text, wherever a chunk boundary falls) or whole."""

from .tool_parsers import partial_suffix

REASONING_PARSERS = ("qwen3", "deepseek_r1")
OPEN, CLOSE = "<think>", "</think>"
_WS = " \t\r\n"

Event = tuple[str, str]  # ("reasoning", text) | ("content", text)


def prompt_opens_thinking(prompt: str) -> bool:
    """Templates that start the thinking themselves (DeepSeek-R1, Qwen3 thinking variants) end the prompt
    with `<think>`: the output then begins inside the reasoning, without an opening tag."""
    return prompt.rstrip(_WS).endswith(OPEN)


class ReasoningParser:
    """qwen3: the output reasons only when it opens with `<think>` (or the prompt already did);
    deepseek_r1: the output always begins in the reasoning (R1 may or may not write the opening tag).
    A reasoning section without `</think>` is all reasoning (the output ran out while thinking)."""

    def __init__(self, name: str, prompt: str = "") -> None:
        if name not in REASONING_PARSERS:
            raise ValueError(f"reasoning parser must be one of {REASONING_PARSERS}, got {name!r}")
        in_reasoning = name == "deepseek_r1" or prompt_opens_thinking(prompt)
        self._state = "reasoning" if in_reasoning else "open"
        self._at_start = True  # an opening tag may still come (and is not reasoning text)
        self._pending = ""
        self.reasoning_parts: list[str] = []
        self.content_parts: list[str] = []

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        self._pending += text
        while self._pending and self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        pending, self._pending = self._pending, ""
        if self._state == "reasoning":
            self._emit("reasoning", pending, events)
        elif self._state in ("open", "answer"):
            self._emit("content", pending, events)
        return events  # "answer_start": only whitespace between </think> and nothing

    def parse(self, text: str) -> tuple[str | None, str]:
        """The whole output -> (reasoning or None, content)."""
        self.feed(text)
        self.finish()
        reasoning = "".join(self.reasoning_parts) if self.reasoning_parts else None
        return reasoning, "".join(self.content_parts)

    def _emit(self, kind: str, text: str, events: list[Event]) -> None:
        if not text:
            return
        (self.reasoning_parts if kind == "reasoning" else self.content_parts).append(text)
        if events and events[-1][0] == kind:
            events[-1] = (kind, events[-1][1] + text)
        else:
            events.append((kind, text))

    def _step(self, events: list[Event]) -> bool:
        pending = self._pending
        if self._state == "answer":
            self._emit("content", pending, events)
            self._pending = ""
            return False
        if self._state == "answer_start":  # the blank lines between </think> and the answer are layout
            body = pending.lstrip(_WS)
            if not body:
                self._pending = ""
                return False
            self._pending = body
            self._state = "answer"
            return True
        if self._at_start:
            body = pending.lstrip(_WS)
            if OPEN.startswith(body):
                return False  # still could be the opening tag
            self._at_start = False
            if body.startswith(OPEN):
                self._pending = body[len(OPEN) :]
                self._state = "reasoning"
                return True
            if self._state == "open":
                self._state = "answer"
                return True
        if self._state == "reasoning":
            idx = pending.find(CLOSE)
            if idx < 0:
                keep = partial_suffix(pending, CLOSE)
                self._emit("reasoning", pending[: len(pending) - keep], events)
                self._pending = pending[len(pending) - keep :]
                return False
            self._emit("reasoning", pending[:idx], events)
            self._pending = pending[idx + len(CLOSE) :]
            self._state = "answer_start"
            return True
        return False
