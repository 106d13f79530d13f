"""Tool-call parsers: model text -> OpenAI tool calls, fed as it streams (OpenAI's exact delta shape) or whole
(the non-stream message), for Hermes/Qwen `<tool_call>`, Llama 3 JSON, Mistral `[TOOL_CALLS]` and the
grammar-forced JSON of tool_choice `required` (an array of calls) and a named function (its arguments).

Every parser returns ordered events, ("content", text) or ("tool_call", chunk item), and holds back any
text that could still turn into markup, so a split anywhere in the stream never leaks partial markup into
content. The first item of each call carries index, id, type, function.name and function.arguments (""
or a first piece); later items carry index and function.arguments pieces only. A whole-text parse is the
same parser fed once: stream and non-stream agree by construction."""

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")
ARGUMENT_KEYS = ("arguments", "parameters")  # Hermes/Mistral say "arguments", Llama 3 says "parameters"
_WS = " \t\r\n"
_ALNUM = string.ascii_letters + string.digits

Event = tuple[str, object]  # ("content", str) | ("tool_call", dict)


def openai_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def mistral_call_id() -> str:
    """Mistral's templates accept only 9 alphanumeric characters as a tool call id."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker (text that must be held back
    because the next chunk could complete the marker)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class _CallObject:
    """One call's JSON object scanned a character at a time: {"name": str, "arguments"|"parameters": value}.

    Only the top level is interpreted; nested values are tracked by depth and string state, so the raw text
    of the arguments value is known to be part of it the moment each character arrives."""

    __slots__ = (
        "raw", "depth", "in_string", "escape", "expect", "key", "key_start", "value_start",
        "name", "args_start", "args_end", "args_kind", "done", "error",
    )  # fmt: skip

    def __init__(self) -> None:
        self.raw: list[str] = []
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.expect = "open"  # open, key, in_key, colon, value, in_value, scalar, comma
        self.key: str | None = None
        self.key_start = 0
        self.value_start = 0
        self.name: str | None = None
        self.args_start: int | None = None  # where the arguments value starts in raw
        self.args_end: int | None = None
        self.args_kind = ""  # "container" ({ or [), "string", "scalar"
        self.done = False
        self.error = False

    def push(self, ch: str) -> None:
        raw = self.raw
        i = len(raw)
        raw.append(ch)
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.depth == 1:
                    self._string_closed(i)
            return
        if self.depth >= 2:
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self._value_done(i + 1)
            return
        expect = self.expect
        if expect == "scalar":
            if ch not in _WS and ch not in ",}":
                return
            self._value_done(i)
            expect = self.expect
        if ch in _WS:
            return
        if expect == "open":
            if ch == "{":
                self.depth = 1
                self.expect = "key"
            else:
                self.error = True
        elif expect == "key":
            if ch == '"':
                self.in_string = True
                self.key_start = i
                self.expect = "in_key"
            elif ch == "}" and self.key is None:  # {}
                self.depth = 0
                self.done = True
            else:
                self.error = True
        elif expect == "colon":
            self.expect = "value" if ch == ":" else self.expect
            self.error = ch != ":"
        elif expect == "value":
            self.value_start = i
            if self.key in ARGUMENT_KEYS and self.args_start is None:
                self.args_start = i
                self.args_kind = "container" if ch in "{[" else ("string" if ch == '"' else "scalar")
            if ch == '"':
                self.in_string = True
                self.expect = "in_value"
            elif ch in "{[":
                self.depth = 2
                self.expect = "in_value"
            elif ch in ",}]:":
                self.error = True
            else:
                self.expect = "scalar"
        elif expect == "comma":
            if ch == ",":
                self.expect = "key"
            elif ch == "}":
                self.depth = 0
                self.done = True
            else:
                self.error = True

    def _string_closed(self, i: int) -> None:
        if self.expect == "in_key":
            self.key = _loads("".join(self.raw[self.key_start : i + 1]))
            self.expect = "colon"
            self.error = not isinstance(self.key, str)
        else:
            self._value_done(i + 1)

    def _value_done(self, end: int) -> None:
        self.expect = "comma"
        if self.key == "name" and self.name is None:
            value = _loads("".join(self.raw[self.value_start : end]))
            if isinstance(value, str) and value:
                self.name = value
            else:
                self.error = True
        elif self.key in ARGUMENT_KEYS and self.args_start == self.value_start and self.args_end is None:
            self.args_end = end

    def arguments(self) -> str:
        """The arguments text known so far: a container's raw text as it grows; a string or other scalar
        once complete (a string holding JSON is unwrapped); "{}" for a finished call without arguments."""
        if self.args_start is None:
            return "{}" if self.done else ""
        if self.args_kind == "container":
            return "".join(self.raw[self.args_start : self.args_end])
        if self.args_end is None:
            return ""
        text = "".join(self.raw[self.args_start : self.args_end])
        if self.args_kind == "string":
            value = _loads(text)
            return value if isinstance(value, str) else text
        return text


def _loads(text: str):
    """json.loads, or None for text that is not JSON (a string with a bad escape, a bad number)."""
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass(slots=True)
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str = ""
    complete: bool = False

    def openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class ToolCallParser:
    """Markup-framed calls inside free text; subclasses say how calls are framed.

    open_marker: opens a call section in content (None: the section can only start the output).
    close_marker: ends each call object (Hermes); bracketed: the section is a JSON array of calls;
    separator: between call objects outside an array (Llama 3's ';')."""

    open_marker: str | None = None
    close_marker: str | None = None
    bracketed = False
    separator = ""
    new_id: Callable[[], str] = staticmethod(openai_call_id)

    def __init__(self, max_calls: int | None = None, new_id: Callable[[], str] | None = None) -> None:
        self.max_calls = max_calls
        if new_id is not None:
            self.new_id = new_id
        self.calls: list[ToolCall] = []
        self.content_parts: list[str] = []
        self.broken = False  # a call began (its first delta went out) and then did not parse
        self._pending = ""
        self._held_ws = ""  # content that is whitespace so far: dropped if it only surrounds calls
        self._state = self._initial_state()
        self._section_raw = ""  # text since the section opened, answered as content if it fails unsent
        self._section_sent = False
        self._obj: _CallObject | None = None
        self._call: ToolCall | None = None
        self._ignored = False  # a call past max_calls: scanned, never sent
        self._bare_arguments = False  # the call object is synthesized around bare arguments (Mistral v11)

    def _initial_state(self) -> str:
        return "content"

    # -- public --------------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        self._pending += text
        while self._pending and self._step(events):
            pass
        self._send_call(events)
        return events

    def finish(self) -> list[Event]:
        """End of output: held text is resolved (partial markers are content; an unsent, unfinished call
        section is content too: it is what the model wrote)."""
        events: list[Event] = []
        state = self._state
        if state in ("object", "object_start", "section_open", "call_name") and not self._section_sent:
            self._content(self._section_raw + self._pending, events)
        elif state in ("content", "start", "plain"):
            self._content(self._pending, events)
        elif state == "object" and not self._ignored:
            self.broken = True  # the output ended inside a call
        self._pending = ""
        self._send_call(events)
        if self._held_ws and not self.calls:
            self._emit_content(self._held_ws, events)
        self._held_ws = ""
        return events

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """The whole output -> (content or None, OpenAI tool calls). Output whose calls do not parse is
        content, unchanged, with no calls."""
        self.feed(text)
        self.finish()
        calls = self.calls
        if self.broken or not all(c.complete and _is_json(c.arguments) for c in calls):
            return text, []
        content = "".join(self.content_parts)
        return (content if content or not calls else None), [c.openai() for c in calls]

    # -- content -------------------------------------------------------------------------------------
    def _content(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if not (self._held_ws + text).strip(_WS):
            self._held_ws += text
            return
        if self._held_ws and self.calls and not self.content_parts:
            # leading whitespace before any text, once calls exist, is layout around calls
            self._held_ws = ""
        text, self._held_ws = self._held_ws + text, ""
        stripped = text.rstrip(_WS)
        self._held_ws = text[len(stripped) :]  # trailing whitespace may only precede a call
        self._emit_content(stripped, events)

    def _emit_content(self, text: str, events: list[Event]) -> None:
        if events and events[-1][0] == "content":
            events[-1] = ("content", events[-1][1] + text)
        else:
            events.append(("content", text))
        self.content_parts.append(text)

    # -- the state machine ---------------------------------------------------------------------------
    def _step(self, events: list[Event]) -> bool:
        """Consume some of self._pending; False when more text is needed first."""
        state = self._state
        pending = self._pending
        if state == "content":
            marker = self.open_marker
            idx = pending.find(marker)
            if idx < 0:
                keep = partial_suffix(pending, marker)
                self._content(pending[: len(pending) - keep], events)
                self._pending = pending[len(pending) - keep :]
                return False
            self._content(pending[:idx], events)
            self._pending = pending[idx + len(marker) :]
            self._open_section(marker)
            return True
        if state == "plain":
            self._content(pending, events)
            self._pending = ""
            return False
        if state == "done":
            self._pending = ""
            return False
        if state == "start":
            return self._step_start(events)
        if state == "after_object" and self.close_marker:
            idx = pending.find(self.close_marker)
            if idx < 0:
                keep = partial_suffix(pending, self.close_marker)
                self._pending = pending[len(pending) - keep :]
                return False
            self._pending = pending[idx + len(self.close_marker) :]
            self._state = "content"
            return True
        for i, ch in enumerate(pending):
            if not self._char(ch, events):  # ch belongs to the next state: hand it over unconsumed
                self._pending = pending[i:]
                return True
            if self._state not in ("section_open", "object_start", "object", "after_object") or (
                self._state == "after_object" and self.close_marker
            ):
                self._pending = pending[i + 1 :]
                return True
        self._pending = ""
        return False

    def _step_start(self, events: list[Event]) -> bool:
        return False  # only formats whose calls start the output have a start state

    def _open_section(self, raw: str) -> None:
        self._section_raw = raw
        self._section_sent = False
        self._state = "section_open" if self.bracketed else "object_start"

    def _char(self, ch: str, events: list[Event]) -> bool:
        state = self._state
        if state == "object":
            obj = self._obj
            obj.push(ch)
            self._section_raw += ch
            if self._bare_arguments and obj.args_end is not None and not obj.done:
                obj.push("}")  # the arguments were the whole object the model wrote: close the call
            if obj.name is not None and self._call is None and not obj.error:
                self._send_call(events)  # the first item goes out the moment the name is known
            if obj.error:
                # Errors happen only outside the arguments value: what it holds goes out first, as it
                # would have had the error come in a later chunk.
                self._send_call(events)
                self._fail(events)
            elif obj.done:
                self._end_object(events)
            return True
        if ch in _WS:
            self._section_raw += ch
            return True
        if state == "section_open":
            if ch != "[":
                self._fail(events)
                return self._section_sent
            self._section_raw += ch
            self._state = "object_start"
            return True
        if state == "object_start":
            if ch != "{":  # an empty array too: a section without calls is the text it is
                self._fail(events)
                return self._section_sent
            self._section_raw += ch
            self._begin_object()
            self._obj.push(ch)
            return True
        # after_object, no close marker: a separator, the array's end, or the end of the calls
        if self.bracketed and ch == ",":
            self._state = "object_start"
            return True
        if self.bracketed and ch == "]":
            self._end_section()
            return True
        if not self.bracketed and self.separator and ch == self.separator:
            self._state = "object_start"
            return True
        self._state = self._after_calls_state()
        return False

    def _after_calls_state(self) -> str:
        return "content"

    def _end_section(self) -> None:
        self._obj = None
        self._state = self._after_calls_state()

    def _begin_object(self) -> None:
        self._obj = _CallObject()
        self._ignored = self.max_calls is not None and len(self.calls) >= self.max_calls
        self._call = None
        self._state = "object"

    def _end_object(self, events: list[Event]) -> None:
        obj = self._obj
        if obj.name is None:
            self._fail(events)
            return
        self._send_call(events)
        if self._call is not None:
            self._call.complete = True
        self._state = "after_object"

    def _fail(self, events: list[Event]) -> None:
        """The section is not a well-formed call: unsent, its text is content; sent, the call is broken
        and the rest of the section is skipped."""
        if self._call is not None and not self._call.complete:
            self.broken = True
        if not self._section_sent:
            raw = self._section_raw
            self._obj = None
            self._state = self._after_calls_state()
            self._content(raw, events)
            self._section_raw = ""
            return
        self._obj = None
        self._state = "after_object" if self.close_marker else "done"

    def _send_call(self, events: list[Event]) -> None:
        """Send what the current call object has that was not sent yet (its first item, argument pieces)."""
        obj = self._obj
        if obj is None or obj.name is None or self._ignored:
            return
        call = self._call
        arguments = obj.arguments()
        if call is None:
            call = self._call = ToolCall(len(self.calls), self.new_id(), obj.name, arguments)
            self.calls.append(call)
            self._section_sent = True
            item = {
                "index": call.index,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": arguments},
            }
            events.append(("tool_call", item))
            return
        piece = arguments[len(call.arguments) :]
        if piece:
            call.arguments = arguments
            events.append(("tool_call", {"index": call.index, "function": {"arguments": piece}}))


def _is_json(text: str) -> bool:
    return text.strip(_WS) != "" and (_loads(text) is not None or text.strip(_WS) == "null")


class HermesToolParser(ToolCallParser):
    """Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, text around."""

    open_marker = "<tool_call>"
    close_marker = "</tool_call>"


class MistralToolParser(ToolCallParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after optional text, or the v11+
    tokenizers' `[TOOL_CALLS]name[ARGS]{...}` (optionally `name[CALL_ID]id[ARGS]`), one marker per call."""

    open_marker = "[TOOL_CALLS]"
    bracketed = True
    new_id = staticmethod(mistral_call_id)
    args_marker = "[ARGS]"
    call_id_marker = "[CALL_ID]"
    _name = ""  # the v11 name (and call id) read so far

    def finish(self) -> list[Event]:
        if self._state == "call_name":  # the name's text is pending text: the unsent section is content
            self._pending, self._name = self._name + self._pending, ""
        return super().finish()

    def _char(self, ch: str, events: list[Event]) -> bool:
        if self._state == "section_open" and ch not in _WS and ch != "[":
            self._state = "call_name"  # the v11 form: a bare function name comes first
            self._name = ""
            return False
        if self._state == "after_object" and self._bare_arguments:
            self._bare_arguments = False
            self._state = "content"  # a later call opens with its own [TOOL_CALLS]
            return False
        return super()._char(ch, events)

    def _step(self, events: list[Event]) -> bool:
        if self._state != "call_name":
            return super()._step(events)
        text = self._name + self._pending
        match = _MISTRAL_NAME.match(text)
        end = match.end() if match else 0
        rest = text[end:]
        if match and rest.startswith(self.args_marker):
            self._section_raw += text[: end + len(self.args_marker)]
            self._pending = rest[len(self.args_marker) :]
            self._name = ""
            self._begin_object()
            self._bare_arguments = True
            for c in '{"name": ' + json.dumps(match.group(1)) + ', "arguments": ':
                self._obj.push(c)
            return True
        if match is not None and (
            self.args_marker.startswith(rest)
            or ("[" not in match.group(0) and self.call_id_marker.startswith(rest))
        ):
            self._name, self._pending = text, ""  # a marker may still complete
            return False
        # Not a call: the text up to here is content, the rest is read again as content.
        self._section_raw += text[:end]
        self._name, self._pending = "", rest
        self._fail(events)
        return True


_MISTRAL_NAME = re.compile(r"([A-Za-z0-9_.\-]+)(?:\[CALL_ID\][A-Za-z0-9]+)?")


class Llama3JsonToolParser(ToolCallParser):
    """Llama 3.x JSON tool calling: the output starts with `{"name": ..., "parameters": {...}}` (optionally
    after `<|python_tag|>`), calls separated by `;`; output that starts otherwise is plain content."""

    python_tag = "<|python_tag|>"
    separator = ";"

    def _initial_state(self) -> str:
        return "start"

    def _after_calls_state(self) -> str:
        return "plain"

    def _step_start(self, events: list[Event]) -> bool:
        pending = self._pending
        body = pending.lstrip(_WS)
        lead = pending[: len(pending) - len(body)]
        if not body:
            return False
        if body.startswith(self.python_tag):
            self._pending = body[len(self.python_tag) :]
            self._open_section(lead + self.python_tag)
            return True
        if self.python_tag.startswith(body):
            return False
        if body[0] == "{":
            self._pending = body
            self._open_section(lead)
            return True
        self._state = "plain"
        return True


class RequiredToolParser(ToolCallParser):
    """tool_choice "required": the grammar makes the whole output `[{"name": ..., "parameters": {...}}, ...]`."""

    bracketed = True

    def _initial_state(self) -> str:
        self._section_raw = ""
        return "section_open"

    def _after_calls_state(self) -> str:
        return "done" if self.calls else "plain"


class NamedToolParser:
    """tool_choice naming a function: the grammar makes the whole output that function's arguments."""

    def __init__(self, name: str, new_id: Callable[[], str] = openai_call_id) -> None:
        self.call = ToolCall(0, new_id(), name)
        self.calls = [self.call]
        self.broken = False
        self._started = False

    def feed(self, text: str) -> list[Event]:
        if not self._started:
            text = text.lstrip(_WS)
            if not text:
                return []
            self._started = True
            self.call.arguments = text
            item = {"index": 0, "id": self.call.id, "type": "function"}
            return [("tool_call", {**item, "function": {"name": self.call.name, "arguments": text}})]
        if not text:
            return []
        self.call.arguments += text
        return [("tool_call", {"index": 0, "function": {"arguments": text}})]

    def finish(self) -> list[Event]:
        self.call.complete = self._started and _is_json(self.call.arguments)
        self.broken = not self.call.complete
        return []

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        self.feed(text)
        self.finish()
        if self.broken:
            return text, []
        return None, [self.call.openai()]


_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser, "mistral": MistralToolParser}


def make_tool_parser(name: str, max_calls: int | None = None) -> ToolCallParser:
    return _PARSERS[name](max_calls)


def call_id_factory(parser_name: str | None) -> Callable[[], str]:
    """The ids a model family's templates accept back (grammar-forced calls use them too)."""
    return mistral_call_id if parser_name == "mistral" else openai_call_id
