"""/v1/responses request parsing: input items -> chat messages, the text format, function tools in chat's
shape, the Responses fields of protocol.py's field table, and a read request -> GenerationRequest."""

from collections.abc import Callable
from typing import Any

from ..engine.sampling_params import SamplingParams, StructuredOutputsParams
from . import tools as tools_mod
from .errors import invalid, unsupported
from .protocol import RESPONSES, Field, GenerationRequest, add_chat_output, declare, refuse, render_chat

_INPUT_ROLES = {"user", "assistant", "system", "developer"}


def _input_text(content: Any, where: str) -> str:
    """A Responses message's content (a string or input_text / output_text / refusal parts) -> text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or an array of content parts", where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise invalid(f"{where}.content[{i}].text must be a string", where)
            texts.append(part["text"])
        elif kind == "refusal":
            texts.append(part.get("refusal") or "")
        elif kind in ("input_image", "input_file", "input_audio"):
            raise unsupported(where, f"'{kind}' content parts")
        else:
            raise invalid(f"{where}.content[{i}] must be an input_text part, got type {kind!r}", where)
    return "".join(texts)


def _string_field(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise invalid(f"{where}.{key} must be a string", where)
    return value


def response_input(value: Any) -> list[dict]:
    """Responses `input` -> chat messages: messages as {role, content}, function_call items as an assistant
    message's tool_calls (consecutive calls share one message), function_call_output items as tool
    messages. Reasoning items are the model's own and are not rendered back."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("'input' must be a string or a non-empty array of input items", "input")
    messages: list[dict] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _INPUT_ROLES:
                raise invalid(
                    f"{where}.role must be one of {sorted(_INPUT_ROLES)}, got {role!r}", f"{where}.role"
                )
            content = _input_text(item.get("content"), where)
            messages.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            call = {
                "id": _string_field(item, "call_id", where),
                "type": "function",
                "function": {
                    "name": _string_field(item, "name", where),
                    "arguments": _string_field(item, "arguments", where),
                },
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _input_text(output, where)
            messages.append(
                {"role": "tool", "tool_call_id": _string_field(item, "call_id", where), "content": text}
            )
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise unsupported(where, "Item references (pass previous_response_id or the items themselves)")
        else:
            raise invalid(f"{where} has unknown type {kind!r}", where)
    return messages


def response_text_format(text: dict) -> dict:
    """`text` -> the text config the response echoes, {"format": {...}}, with the format checked."""
    fmt = text.get("format")
    if fmt is None:
        return {"format": {"type": "text"}}
    if not isinstance(fmt, dict) or fmt.get("type") not in _TEXT_FORMATS:
        raise invalid(f"'text.format' must be an object with 'type' one of {_TEXT_FORMATS}", "text")
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise invalid("'text.format' json_schema needs a 'name' (string) and a 'schema' (object)", "text")
        if fmt.get("strict") is not None and not isinstance(fmt["strict"], bool):
            raise invalid("'text.format.strict' must be a boolean", "text")
    return {"format": dict(fmt)}


def _text_constraint(text: dict) -> StructuredOutputsParams | None:
    """The engine's constraint for a read `text` config: json_schema and json_object, as on chat."""
    fmt = text["format"]
    if fmt["type"] == "json_schema":
        return StructuredOutputsParams(json=fmt["schema"])
    if fmt["type"] == "json_object":
        return StructuredOutputsParams(json_object=True)
    return None


def response_tools(value: list) -> list[dict]:
    """Responses tools, checked to be function tools (tools.parse_tools checks the rest in chat's shape)."""
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise unsupported("tools", f"tools[{i}] of type {kind!r} (only function tools run here)")
    return value


def _chat_tools(fields: dict) -> dict:
    """The Responses tool fields in chat's shape, for tools.parse_tools: a tool's function keys move
    under "function", a named or allowed tool choice names its functions the chat way."""
    tools = fields["tools"]
    if tools is not None:
        tools = [
            {"type": "function", "function": {k: v for k, v in tool.items() if k != "type" and v is not None}}
            for tool in tools
        ]
    choice = fields["tool_choice"]
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        listed = choice.get("tools")
        if isinstance(listed, list):
            listed = [
                {"type": "function", "function": {"name": t.get("name")}} if isinstance(t, dict) else t
                for t in listed
            ]
        choice = {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode"), "tools": listed}}
    return {"tools": tools, "tool_choice": choice, "parallel_tool_calls": fields["parallel_tool_calls"]}


def _metadata(value: dict) -> dict:
    if len(value) > 16 or not all(
        isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()
    ):
        raise invalid(
            "'metadata' must have at most 16 string keys (<= 64 characters) with string values "
            "(<= 512 characters)",
            "metadata",
        )
    return value


def _refuse_unless_empty(name: str, what: str) -> Callable[[Any], Any]:
    """For a field whose empty value (0, []) asks for nothing: accept that, refuse anything else."""

    def read(value: Any) -> Any:
        if value:
            raise unsupported(name, what)
        return value

    return read


# The JSON Schemas of the shapes the readers check (documentation only; the readers are the check).
_INPUT_PART = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"enum": ["input_text", "output_text", "refusal"]}, "text": {"type": "string"}},
}
_RESPONSE_INPUT = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "type": {"enum": ["message", "function_call", "function_call_output", "reasoning"]},
                    "role": {"enum": ["user", "assistant", "system", "developer"]},
                    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _INPUT_PART}]},
                    "call_id": {"type": "string"},
                    "name": {"type": "string"},
                    "arguments": {"type": "string"},
                    "output": {"type": "string"},
                },
            },
        },
    ]
}
_TEXT_FORMATS = ["text", "json_schema", "json_object"]
_RESPONSE_TOOL = {
    "type": "object",
    "required": ["type", "name"],
    "properties": {
        "type": {"enum": ["function"]},
        "name": {"type": "string"},
        "description": {"type": ["string", "null"]},
        "parameters": {"type": ["object", "null"]},
        "strict": {"type": ["boolean", "null"]},
    },
}
_RESPONSE_TOOL_CHOICE = {
    "anyOf": [
        {"enum": ["none", "auto", "required", None]},
        {"type": "object", "required": ["type", "name"], "properties": {"type": {"enum": ["function"]}}},
        {
            "type": "object",
            "required": ["type", "mode", "tools"],
            "properties": {"type": {"enum": ["allowed_tools"]}, "mode": {"enum": ["auto", "required"]}},
        },
    ]
}

# The fields only /v1/responses reads (model, stream, temperature, top_p and seed are protocol.FIELDS'):
# declared into protocol.ROUTE_FIELDS, so read_fields(body, RESPONSES) and /openapi.json see them.
FIELDS: tuple[Field, ...] = (
    Field(
        "top_logprobs",
        "integer",
        "Not supported on /v1/responses: a value above 0 is refused (0 asks for nothing).",
        (RESPONSES,),
        minimum=0,
        reader=_refuse_unless_empty("top_logprobs", "'top_logprobs' on /v1/responses"),
    ),
    Field(
        "include",
        "array",
        "Not supported: extra output data (e.g. message.output_text.logprobs) is refused; [] asks for nothing.",
        (RESPONSES,),
        reader=_refuse_unless_empty("include", "'include' (extra output data)"),
        schema={"type": "array", "maxItems": 0},
    ),
    Field(
        "input",
        None,
        "The input: a string (one user message) or a list of items: messages (content a string or "
        "input_text parts), function_call and function_call_output items.",
        (RESPONSES,),
        required=True,
        schema=_RESPONSE_INPUT,
        reader=response_input,
    ),
    Field(
        "instructions",
        "string",
        "A system message placed before the conversation (not carried over by previous_response_id).",
        (RESPONSES,),
    ),
    Field(
        "max_output_tokens",
        "integer",
        "Most tokens to generate; by default, what the context leaves.",
        (RESPONSES,),
        minimum=1,
    ),
    Field(
        "text",
        "object",
        'The output format: {"format": {"type": "text"}} (default); {"type": "json_schema", "name", '
        '"schema", "strict"} or {"type": "json_object"} constrain decoding to JSON (always enforced).',
        (RESPONSES,),
        reader=response_text_format,
        schema={
            "properties": {"format": {"type": "object", "properties": {"type": {"enum": _TEXT_FORMATS}}}}
        },
    ),
    Field(
        "tools",
        "array",
        "Function tools ({type: function, name, description, parameters, strict}) the model may call: shown "
        "to it by the chat template; its calls become function_call output items. Other tool types are "
        "refused.",
        (RESPONSES,),
        reader=response_tools,
        schema={"items": _RESPONSE_TOOL},
    ),
    Field(
        "tool_choice",
        None,
        'none, auto (default with tools), required, {"type": "function", "name"} or {"type": '
        '"allowed_tools", "mode", "tools"}; required and a named function are enforced by a grammar.',
        (RESPONSES,),
        schema=_RESPONSE_TOOL_CHOICE,
    ),
    Field(
        "parallel_tool_calls",
        "boolean",
        "Whether the model may call several tools in one turn.",
        (RESPONSES,),
        default=True,
    ),
    Field(
        "store",
        "boolean",
        "Keep the response (bounded in-memory store, least recently used out first) for GET, "
        "previous_response_id and cancel.",
        (RESPONSES,),
        default=True,
    ),
    Field(
        "previous_response_id",
        "string",
        "A stored response whose conversation (its input and output) comes before this input.",
        (RESPONSES,),
    ),
    Field(
        "metadata",
        "object",
        "Up to 16 string key-value pairs kept with the response.",
        (RESPONSES,),
        reader=_metadata,
        schema={"additionalProperties": {"type": "string", "maxLength": 512}, "maxProperties": 16},
    ),
    Field(
        "background",
        "boolean",
        "Answer at once with the in-progress response and generate it on the server; poll GET "
        "/v1/responses/{id} or cancel it. Needs store; not with stream.",
        (RESPONSES,),
        default=False,
    ),
    Field(
        "truncation",
        "string",
        'Only "disabled": an input longer than the context is a 400.',
        (RESPONSES,),
        default="disabled",
        enum=("disabled", "auto"),
        reader=lambda v: refuse("truncation", "truncation 'auto'")(v) if v == "auto" else v,
    ),
)
declare(FIELDS)


def parse_response(
    fields: dict,
    history: list[dict],
    model: str,
    tokenizer,
    chat_template: str | None,
    *,
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
) -> GenerationRequest:
    """A Responses request (its fields read with read_fields(body, RESPONSES)) after `history`, the
    conversation of its previous response: render the chat (with the tools), tokenize, sampling
    parameters, and the output spec that splits the text into reasoning, message and calls, as chat's."""
    messages = list(history) + fields["input"]
    if fields["instructions"] is not None:
        messages.insert(0, {"role": "system", "content": fields["instructions"]})
    tool_request = tools_mod.parse_tools(_chat_tools(fields))
    render_tools = tool_request.render_tools if tool_request else None
    text = render_chat(tokenizer, messages, chat_template, True, param="input", tools=render_tools)
    ids = tokenizer.encode(text, add_special_tokens=False)
    constraint = _text_constraint(fields["text"]) if fields["text"] is not None else None
    try:
        params = SamplingParams(
            temperature=fields["temperature"],
            top_p=fields["top_p"],
            max_tokens=fields["max_output_tokens"],
            seed=fields["seed"],
            structured_outputs=constraint,
        )
    except ValueError as exc:
        message = str(exc)
        raise invalid(message, message.split(" ", 1)[0]) from None
    gen = GenerationRequest(
        model,
        [ids],
        [text],
        params,
        fields["stream"],
        False,
        False,
        None,
        True,
        "text" if constraint else None,
    )
    add_chat_output(gen, tool_request, tokenizer, chat_template, tool_call_parser, reasoning_parser)
    return gen
