"""OpenAI request parsing: the one table of request fields (read by the parsers, rendered by /openapi.json)
and chat / completions / embeddings / tokenize JSON shapes -> SamplingParams and prompts (/v1/responses'
own fields and parsing are responses_protocol.py's, the model-dependent checks the engine intake's, the
response shapes response_builder.py's)."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine import chat_template as chat_template_mod
from ..engine.sampling_params import SamplingParams, StructuredOutputsParams
from ..ops.sampling import MAX_LOGPROBS
from . import tools as tools_mod
from .chat_output import ChatOutputSpec
from .errors import APIError, invalid, unsupported

MAX_N = 128
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}

# The request bodies, named by the OpenAIApp handler that reads them (routes.py): one name from the
# routing table to this table to /openapi.json.
CHAT = "chat_completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
TOKENIZE = "tokenize"
DETOKENIZE = "detokenize"
RESPONSES = "create_response"
GENERATION = (CHAT, COMPLETIONS)

# The Python types a JSON type reads as. bool is an int in Python; JSON true is never a number here.
_KINDS = {
    "number": (int, float),
    "integer": (int, float),  # 2.0 is accepted as 2, 2.5 is refused
    "boolean": (bool,),
    "string": (str,),
    "array": (list,),
    "object": (dict,),
}
_TYPE_NAMES = {**{t: t for t in _KINDS}, "integer": "number"}  # the 400s have said "number" for both


@dataclass(frozen=True, slots=True)
class Field:
    """One request field: its JSON type, default, range or enum and description. `read` validates it
    with a 400 that names it; /openapi.json renders `json_schema`. `reader` takes over after the type
    check for shapes a type and a range do not say (it gets the value when one is given, null only for a
    required field); `schema` documents those shapes (and stands for `type` where it is None)."""

    name: str
    type: str | None  # a key of _KINDS, or None: any JSON value (then `schema` says which)
    description: str
    routes: tuple[str, ...]
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # minimum itself is refused (top_p > 0)
    enum: tuple | None = None
    required: bool = False
    missing: str | None = None  # the 400 when a required field is absent
    nullable: bool = True  # an explicit null means the default
    reader: Callable[[Any], Any] | None = None
    schema: dict | None = None

    def read(self, body: dict) -> Any:
        name = self.name
        value = body.get(name)
        if value is None:
            if self.required:
                if name not in body:
                    raise invalid(self.missing or f"'{name}' is required", name)
                # Given as null: its reader (or the parser) says what shape it wants.
                return None if self.reader is None else self.reader(None)
            if not self.nullable and name in body:
                raise invalid(f"'{name}' must not be null", name)
            return self.default
        if self.type is not None:
            kinds = _KINDS[self.type]
            if isinstance(value, bool) and bool not in kinds:
                raise invalid(f"'{name}' must be of type {_TYPE_NAMES[self.type]}, got a boolean", name)
            if not isinstance(value, kinds):
                raise invalid(
                    f"'{name}' must be of type {_TYPE_NAMES[self.type]}, got {type(value).__name__}", name
                )
            if self.type in ("number", "integer"):
                value = self._number(value)
        if self.enum is not None and value not in self.enum:
            raise invalid(f"'{name}' must be one of {list(self.enum)}, got {value!r}", name)
        return value if self.reader is None else self.reader(value)

    def _number(self, value: int | float) -> int | float:
        name = self.name
        if isinstance(value, float):
            if not math.isfinite(value):
                raise invalid(f"'{name}' must be a finite number", name)
            if self.type == "integer":
                if not value.is_integer():
                    raise invalid(f"'{name}' must be an integer, got {value}", name)
                value = int(value)
        if self.type == "number":
            value = float(value)
        lo, hi = self.minimum, self.maximum
        if lo is not None and (value < lo or (self.exclusive_minimum and value == lo)):
            raise invalid(
                f"'{name}' must be {'>' if self.exclusive_minimum else '>='} {lo}, got {value}", name
            )
        if hi is not None and value > hi:
            raise invalid(f"'{name}' must be <= {hi}, got {value}", name)
        return value

    def json_schema(self) -> dict:
        """This field as a JSON Schema (OpenAPI 3.1) property."""
        out: dict = dict(self.schema) if self.schema is not None else {}
        if self.type is not None and "type" not in out:
            out["type"] = [self.type, "null"] if self.nullable and not self.required else self.type
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.minimum is not None:
            out["exclusiveMinimum" if self.exclusive_minimum else "minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.default is not None:
            out["default"] = self.default
        out["description"] = self.description
        return out


# -- readers for the shapes a type does not say -------------------------------------------------------
def _stop(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise invalid("'stop' must be a string or an array of strings", "stop")


def _stop_token_ids(value: Any) -> list[int]:
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise invalid("'stop_token_ids' must be an array of token ids", "stop_token_ids")


def _logit_bias(value: Any) -> dict[int, float]:
    if not isinstance(value, dict):
        raise invalid("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    logit_bias = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise invalid(f"'logit_bias' key {key!r} is not a token id", "logit_bias") from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise invalid(
                f"'logit_bias' value for token {token} must be a number in [-100, 100]", "logit_bias"
            )
        logit_bias[token] = float(bias)
    return logit_bias


def _stream_options_object(options: Any) -> dict:
    """stream_options (include_usage is read once the parser knows the request streams)."""
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    return options


def _refuse_tools(name: str) -> Callable[[Any], None]:
    def read(value: Any) -> None:
        if value:
            raise unsupported(name, f"'{name}' (tool / function calling)")

    return read


def _refuse_tool_choice(name: str) -> Callable[[Any], None]:
    def read(value: Any) -> None:
        if value not in ("none", "auto"):
            raise unsupported(name, f"'{name}' (tool / function calling)")

    return read


def _response_format(fmt: Any) -> StructuredOutputsParams | None:
    """OpenAI's response_format -> the engine's constraint (None for plain text)."""
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise invalid("'response_format' must be an object with a 'type'", "response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise invalid(f"Unknown response_format type '{kind}'", "response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid("'response_format.json_schema' must be an object", "response_format")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise invalid("'response_format.json_schema.name' must be a non-empty string", "response_format")
    schema = spec.get("schema", {})  # no schema: any JSON value
    if not isinstance(schema, dict):
        raise invalid("'response_format.json_schema.schema' must be a JSON Schema object", "response_format")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise invalid("'response_format.json_schema.strict' must be a boolean", "response_format")
    return StructuredOutputsParams(json=schema)


_STRUCTURED_KEYS = ("json", "json_object", "regex", "choice", "grammar")


def _structured_outputs(value: Any) -> StructuredOutputsParams:
    """vLLM's structured_outputs object: exactly one of json, json_object, regex, choice, grammar."""
    if not isinstance(value, dict):
        raise invalid("'structured_outputs' must be an object", "structured_outputs")
    unknown = sorted(set(value) - set(_STRUCTURED_KEYS))
    if unknown:
        raise invalid(
            f"'structured_outputs' has unknown keys {unknown}; it takes one of {list(_STRUCTURED_KEYS)}",
            "structured_outputs",
        )
    try:
        return StructuredOutputsParams(**{k: v for k, v in value.items() if v is not None})
    except ValueError as exc:
        raise invalid(str(exc), "structured_outputs") from None


def _modalities(value: Any) -> None:
    if value != ["text"]:
        if not isinstance(value, list):
            raise invalid("'modalities' must be an array", "modalities")
        raise unsupported("modalities", f"Output modalities {value}")


def refuse(name: str, what: str) -> Callable[[Any], None]:
    def read(value: Any) -> None:
        raise unsupported(name, what)

    return read


def _model(value: Any) -> str:
    if not isinstance(value, str):
        raise invalid("'model' must be a string", "model")
    return value


def _tokenize_prompt(value: Any) -> str:
    if not isinstance(value, str):
        raise invalid("'prompt' (a string) or 'messages' is required", "prompt")
    return value


def _encoding_format(value: Any) -> str:
    value = value or "float"
    if value not in ("float", "base64"):
        raise invalid("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    return value


def _suffix(value: Any) -> None:
    if value:
        raise unsupported("suffix", "'suffix' (insertion)")


# The JSON Schemas of the shapes the readers check (documentation only; the readers are the check).
_STRING_OR_STRINGS = {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]
}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
    ]
}
_CONTENT_PART = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"type": "string", "enum": ["text", "refusal"]}, "text": {"type": "string"}},
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": sorted(_ROLES)},
        "content": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": _CONTENT_PART}, {"type": "null"}]
        },
        "name": {"type": "string"},
        "tool_calls": {"type": "array", "items": tools_mod.HISTORY_TOOL_CALL_SCHEMA},
        "tool_call_id": {"type": "string"},
    },
}
_MESSAGES = {"type": "array", "items": _MESSAGE, "minItems": 1}

_RESPONSE_FORMAT = {
    "anyOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {
            "type": "object",
            "required": ["type", "json_schema"],
            "properties": {
                "type": {"enum": ["json_schema"]},
                "json_schema": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                        "schema": {"type": "object"},
                        "strict": {"type": ["boolean", "null"]},
                    },
                },
            },
        },
        {"type": "null"},
    ]
}
_STRUCTURED_OUTPUTS = {
    "type": ["object", "null"],
    "minProperties": 1,
    "maxProperties": 1,
    "properties": {
        "json": {"anyOf": [{"type": "object"}, {"type": "string"}]},
        "json_object": {"type": "boolean"},
        "regex": {"type": "string"},
        "choice": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "grammar": {"type": "string"},
    },
    "additionalProperties": False,
}

_INCLUDE_USAGE = Field(
    "include_usage", "boolean", "Send a last chunk with the request's usage.", (), default=False
)
_SAMPLING_ROUTES = (CHAT, COMPLETIONS, RESPONSES)
_TOOL_ROUTES = (CHAT, COMPLETIONS)

FIELDS: tuple[Field, ...] = (
    Field(
        "model",
        None,
        "A served model name (GET /v1/models); the first one when omitted.",
        (CHAT, COMPLETIONS, EMBEDDINGS, TOKENIZE, DETOKENIZE, RESPONSES),
        reader=_model,
        schema={"type": ["string", "null"]},
    ),
    # -- the prompt
    Field(
        "messages",
        None,
        "The conversation, rendered by the model's chat template. Content is text "
        "(a string or text parts); image, audio and file parts are refused.",
        (CHAT,),
        required=True,
        missing="'messages' must be a non-empty array",
        schema=_MESSAGES,
        reader=lambda v: chat_messages(v),
    ),
    Field(
        "prompt",
        None,
        "The prompt: a string, strings (one completion each), token ids or token-id arrays.",
        (COMPLETIONS,),
        required=True,
        schema=_PROMPT,
    ),
    Field(
        "input",
        None,
        "The text(s) to embed: a string, strings, token ids or token-id arrays.",
        (EMBEDDINGS,),
        required=True,
        schema=_PROMPT,
    ),
    Field(
        "add_generation_prompt",
        "boolean",
        "End the rendered chat with the template's assistant header.",
        (CHAT, TOKENIZE),
        default=True,
    ),
    # -- how many and how long
    Field(
        "n",
        "integer",
        "Completions to generate for each prompt.",
        GENERATION,
        default=1,
        minimum=1,
        maximum=MAX_N,
    ),
    Field(
        "best_of",
        "integer",
        "Accepted only equal to n (this server returns every candidate).",
        (COMPLETIONS,),
        minimum=1,
    ),
    Field(
        "max_completion_tokens",
        "integer",
        "Most tokens to generate; by default, what the context leaves.",
        (CHAT,),
        minimum=1,
    ),
    Field(
        "max_tokens",
        "integer",
        "Most tokens to generate (chat: the older name of max_completion_tokens; "
        "by default, what the context leaves).",
        (CHAT,),
        minimum=1,
    ),
    Field("max_tokens", "integer", "Most tokens to generate.", (COMPLETIONS,), default=16, minimum=1),
    Field(
        "min_tokens",
        "integer",
        "Tokens to generate before EOS or a stop may end the completion.",
        GENERATION,
        default=0,
        minimum=0,
    ),
    Field(
        "stream",
        "boolean",
        "Answer with server-sent events as the tokens come.",
        (CHAT, COMPLETIONS, RESPONSES),
        default=False,
    ),
    Field(
        "stream_options",
        None,
        'Streaming only: {"include_usage": true} sends a last chunk with usage.',
        GENERATION,
        reader=_stream_options_object,
        schema={"type": ["object", "null"], "properties": {"include_usage": _INCLUDE_USAGE.json_schema()}},
    ),
    # -- sampling
    Field(
        "temperature",
        "number",
        "Sampling temperature; 0 is greedy.",
        _SAMPLING_ROUTES,
        default=1.0,
        minimum=0.0,
        maximum=2.0,
    ),
    Field(
        "top_p",
        "number",
        "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.",
        _SAMPLING_ROUTES,
        default=1.0,
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
    ),
    Field(
        "top_k",
        "integer",
        "Keep the k most likely tokens; 0 or -1 keeps all.",
        GENERATION,
        default=0,
        minimum=-1,
    ),
    Field(
        "min_p",
        "number",
        "Drop tokens less likely than min_p times the most likely one.",
        GENERATION,
        default=0.0,
        minimum=0.0,
        maximum=1.0,
    ),
    Field(
        "seed",
        "integer",
        "Seed of this request's sampling: the same seed and request give the same output "
        "(/v1/responses: an extension, as vLLM's).",
        (CHAT, COMPLETIONS, RESPONSES),
        minimum=-(2**63),
        maximum=2**63 - 1,
    ),  # int64, as OpenAI
    Field(
        "presence_penalty",
        "number",
        "Penalty for each token already generated.",
        GENERATION,
        default=0.0,
        minimum=-2.0,
        maximum=2.0,
    ),
    Field(
        "frequency_penalty",
        "number",
        "Penalty per occurrence of a token already generated.",
        GENERATION,
        default=0.0,
        minimum=-2.0,
        maximum=2.0,
    ),
    Field(
        "repetition_penalty",
        "number",
        "Multiplicative penalty of tokens in the prompt or output (1 is off).",
        GENERATION,
        default=1.0,
        minimum=0.0,
        exclusive_minimum=True,
    ),
    Field(
        "stop",
        None,
        "Strings that end the completion (not included in it).",
        GENERATION,
        schema=_STRING_OR_STRINGS,
        reader=_stop,
    ),
    Field(
        "stop_token_ids",
        None,
        "Token ids that end the completion.",
        GENERATION,
        schema={"anyOf": [_TOKEN_IDS, {"type": "null"}]},
        reader=_stop_token_ids,
    ),
    Field(
        "logit_bias",
        None,
        "Token id -> bias in [-100, 100] added to its logit.",
        GENERATION,
        schema={
            "type": ["object", "null"],
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
        reader=_logit_bias,
    ),
    Field(
        "ignore_eos", "boolean", "Keep generating past the end-of-sequence token.", GENERATION, default=False
    ),
    Field(
        "skip_special_tokens", "boolean", "Leave special tokens out of the text.", GENERATION, default=True
    ),
    Field(
        "include_stop_str_in_output",
        "boolean",
        "Keep the matched stop string in the text.",
        GENERATION,
        default=False,
    ),
    # -- logprobs and echo
    Field(
        "logprobs", "boolean", "Return the log-probability of each generated token.", (CHAT,), default=False
    ),
    Field(
        "top_logprobs",
        "integer",
        "With logprobs: this many most likely tokens at each position.",
        (CHAT,),
        minimum=0,
        maximum=MAX_LOGPROBS,
    ),
    Field(
        "logprobs",
        "integer",
        "Return the log-probabilities of the chosen and this many most likely tokens.",
        (COMPLETIONS,),
        minimum=0,
        maximum=MAX_LOGPROBS,
    ),
    Field(
        "echo",
        "boolean",
        "Return the prompt before the completion (with logprobs: the prompt's too).",
        (COMPLETIONS,),
        default=False,
    ),
    # -- refused: accepted only when they ask for nothing this server lacks
    Field(
        "suffix",
        None,
        "Not supported (insertion): a non-empty suffix is refused.",
        (COMPLETIONS,),
        reader=_suffix,
        schema={},
    ),
    # -- tool calling and reasoning (tools.py validates the tool fields together)
    Field(
        "tools",
        "array",
        "Function tools, shown to the model by its chat template (a template that never reads `tools` "
        "is answered 400).",
        (CHAT,),
        schema={"type": ["array", "null"], "items": tools_mod.TOOL_SCHEMA},
    ),
    Field(
        "tool_choice",
        None,
        '"none" (no calls; tools not shown), "auto" (the tool-call parser reads the output), "required" '
        '(one or more calls) or {"type": "function", "function": {"name": ...}}; required and named '
        "functions are enforced by a JSON-schema grammar.",
        (CHAT,),
        schema=tools_mod.TOOL_CHOICE_SCHEMA,
    ),
    Field(
        "parallel_tool_calls",
        "boolean",
        "false: at most one call.",
        (CHAT,),
        default=True,
    ),
    Field(
        "functions",
        "array",
        "Deprecated form of tools (answered as message.function_call).",
        (CHAT,),
        schema={"type": ["array", "null"], "items": tools_mod.TOOL_SCHEMA["properties"]["function"]},
    ),
    Field(
        "function_call",
        None,
        'Deprecated form of tool_choice: "none", "auto" or {"name": ...}.',
        (CHAT,),
        schema={"anyOf": [{"enum": ["none", "auto", None]}, tools_mod.NAMED_SCHEMA]},
    ),
    Field(
        "chat_template_kwargs",
        "object",
        "Extra variables for the chat template (e.g. enable_thinking).",
        (CHAT,),
    ),
    Field(
        "enable_thinking",
        "boolean",
        "Passed to the chat template (reasoning models that take it); the same as "
        "chat_template_kwargs.enable_thinking.",
        (CHAT,),
    ),
    Field(
        "tools",
        "array",
        "Not supported on completions: a non-empty list is refused.",
        (COMPLETIONS,),
        reader=_refuse_tools("tools"),
    ),
    Field(
        "functions",
        "array",
        "Not supported on completions: a non-empty list is refused.",
        (COMPLETIONS,),
        reader=_refuse_tools("functions"),
    ),
    Field(
        "tool_choice",
        None,
        'Completions: only "none" and "auto" are accepted.',
        (COMPLETIONS,),
        reader=_refuse_tool_choice("tool_choice"),
        schema={"enum": ["none", "auto", None]},
    ),
    Field(
        "function_call",
        None,
        'Completions: only "none" and "auto" are accepted.',
        (COMPLETIONS,),
        reader=_refuse_tool_choice("function_call"),
        schema={"enum": ["none", "auto", None]},
    ),
    Field(
        "response_format",
        None,
        'Constrain the output: {"type": "json_object"} (any JSON object) or {"type": "json_schema", '
        '"json_schema": {"name", "schema", "strict"}} (always enforced, strict or not); "text" is free.',
        _TOOL_ROUTES,
        reader=_response_format,
        schema=_RESPONSE_FORMAT,
    ),
    Field(
        "structured_outputs",
        None,
        "Constrain the output (vLLM's names), exactly one of: json (a JSON Schema), json_object, regex, "
        "choice (one of these strings), grammar (GBNF, llama.cpp's EBNF). Not with response_format.",
        GENERATION,
        reader=_structured_outputs,
        schema=_STRUCTURED_OUTPUTS,
    ),
    Field(
        "audio",
        None,
        "Not supported: audio output is refused.",
        _TOOL_ROUTES,
        reader=refuse("audio", "Audio output"),
        schema={"type": "null"},
    ),
    Field(
        "modalities",
        None,
        'Only ["text"].',
        _TOOL_ROUTES,
        reader=_modalities,
        schema={"type": ["array", "null"], "items": {"enum": ["text"]}},
    ),
    Field(
        "prediction",
        None,
        "Not supported: predicted outputs are refused.",
        _TOOL_ROUTES,
        reader=refuse("prediction", "Predicted outputs"),
        schema={"type": "null"},
    ),
    Field(
        "web_search_options",
        None,
        "Not supported: web search is refused.",
        _TOOL_ROUTES,
        reader=refuse("web_search_options", "Web search"),
        schema={"type": "null"},
    ),
    # -- embeddings
    Field(
        "encoding_format",
        None,
        "How the vectors come: arrays of floats, or base64 of little-endian float32.",
        (EMBEDDINGS,),
        default="float",
        reader=_encoding_format,
        schema={"enum": ["float", "base64", None]},
    ),
    Field(
        "dimensions",
        None,
        "Matryoshka models only: keep this many leading dimensions (re-normalized).",
        (EMBEDDINGS,),
        schema={"type": ["integer", "null"], "minimum": 1},
    ),
    Field(
        "truncate_prompt_tokens",
        None,
        "Keep only the first k tokens of each input (-1: the model's limit).",
        (EMBEDDINGS,),
        schema={"type": ["integer", "null"], "minimum": -1},
    ),
    # -- tokenize / detokenize
    Field(
        "messages",
        None,
        "A conversation to render with the chat template and tokenize (instead of prompt).",
        (TOKENIZE,),
        nullable=False,
        schema=_MESSAGES,
        reader=lambda v: chat_messages(v),
    ),
    Field(
        "prompt",
        None,
        "The text to tokenize (when no messages are given).",
        (TOKENIZE,),
        reader=_tokenize_prompt,
        schema={"type": "string"},
    ),
    Field(
        "add_special_tokens",
        "boolean",
        "Add the tokenizer's special tokens (e.g. BOS); by default true for a "
        "prompt and false for messages (the template has them).",
        (TOKENIZE,),
    ),
    Field("return_token_strs", "boolean", "Also return each token's string.", (TOKENIZE,), default=False),
    Field(
        "tokens",
        None,
        "The token ids to decode.",
        (DETOKENIZE,),
        required=True,
        missing="tokens must be a list of token ids, got NoneType",
        schema={"type": "array", "items": {"type": "integer", "minimum": 0}},
    ),
)
# Each route's fields in declaration order: FIELDS, then the Responses fields that responses_protocol.py
# declares (the module that reads them).
ROUTE_FIELDS: dict[str, tuple[Field, ...]] = {}


def declare(fields: tuple[Field, ...]) -> None:
    """Add fields to ROUTE_FIELDS under each route they name (a route declares a name once)."""
    for field in fields:
        for route in field.routes:
            ROUTE_FIELDS.setdefault(route, ())
            if any(f.name == field.name for f in ROUTE_FIELDS[route]):
                raise AssertionError(f"{route} declares '{field.name}' twice")
            ROUTE_FIELDS[route] += (field,)


declare(FIELDS)


def read_fields(body: dict, route: str) -> dict[str, Any]:
    """Every field `route` declares, read from body (defaults for the absent ones). Undeclared fields are
    ignored, as OpenAI's own API ignores what it does not know."""
    return {f.name: f.read(body) for f in ROUTE_FIELDS[route]}


@dataclass(slots=True)
class GenerationRequest:
    """A validated chat, completions or /v1/responses request."""

    model: str
    prompts: list[list[int]]  # one or more prompts as token ids (completions may batch)
    prompt_texts: list[str | None]
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None  # chat: top_logprobs when logprobs is true; completions: logprobs
    chat: bool
    constrained_by: str | None = None  # the field that set params.structured_outputs (for the 400s)
    output: ChatOutputSpec | None = None  # chat choices parsed into reasoning / content / tool calls


_MODEL = next(f for f in FIELDS if f.name == "model")


def check_model(body: dict, served: list[str]) -> str:
    model = _MODEL.read(body)
    if model is None:
        return served[0]  # vLLM-compatible leniency: the served model when none is named
    if model not in served:
        raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    return model


def _sampling(
    fields: dict, *, max_tokens: int | None, n: int, logprobs: int | None, prompt_logprobs: int | None = None
) -> SamplingParams:
    min_tokens = fields["min_tokens"]
    constraint = fields["structured_outputs"]
    if fields["response_format"] is not None:
        if constraint is not None:
            raise invalid(
                "Set either 'response_format' or 'structured_outputs', not both", "structured_outputs"
            )
        constraint = fields["response_format"]
    if max_tokens is not None and min_tokens > max_tokens:
        raise invalid(f"'min_tokens' ({min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
    try:
        return SamplingParams(
            n=n,
            temperature=fields["temperature"],
            top_p=fields["top_p"],
            top_k=fields["top_k"],
            min_p=fields["min_p"],
            seed=fields["seed"],
            presence_penalty=fields["presence_penalty"],
            frequency_penalty=fields["frequency_penalty"],
            repetition_penalty=fields["repetition_penalty"],
            stop=fields["stop"],
            stop_token_ids=fields["stop_token_ids"],
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            ignore_eos=fields["ignore_eos"],
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=fields["logit_bias"],
            skip_special_tokens=fields["skip_special_tokens"],
            include_stop_str_in_output=fields["include_stop_str_in_output"],
            structured_outputs=constraint,
        )
    except ValueError as exc:  # SamplingParams' own checks name the field first
        message = str(exc)
        raise invalid(message, message.split(" ", 1)[0]) from None


def _constrained_by(fields: dict) -> str | None:
    if fields["response_format"] is not None:
        return "response_format"
    return "structured_outputs" if fields["structured_outputs"] is not None else None


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(f"{where}.content[{i}] must be a content part object with a 'type'", where)
            kind = part["type"]
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise invalid(f"{where}.content[{i}].text must be a string", where)
                texts.append(part["text"])
            elif kind in ("image_url", "input_image", "image"):
                raise unsupported(where, "Image content parts")
            elif kind in ("input_audio", "audio"):
                raise unsupported(where, "Audio content parts")
            elif kind in ("file", "input_file"):
                raise unsupported(where, "File content parts")
            elif kind == "refusal":
                texts.append(part.get("refusal") or "")
            else:
                raise invalid(f"{where}.content[{i}] has unknown type '{kind}'", where)
        return "".join(texts)
    raise invalid(f"{where}.content must be a string or an array of content parts", where)


def chat_messages(messages: Any) -> list[dict]:
    """The 'messages' array -> the dicts chat templates read: role and text content, plus an assistant's
    tool_calls and a tool result's tool_call_id / name (arguments stay JSON text until rendering)."""
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object", where)
        role = message.get("role")
        if role not in _ROLES:
            raise invalid(f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", f"{where}.role")
        if message.get("audio") is not None:
            raise unsupported(f"{where}.audio", "Audio in messages")
        if role == "developer":
            role = "system"  # developer is OpenAI's new name for system; templates know system
        elif role == "function":
            role = "tool"
        converted = {"role": role, "content": _text_content(message.get("content"), where)}
        calls = message.get("tool_calls")
        if message.get("function_call") is not None:  # the deprecated single call
            calls = [{"id": "call_0", "type": "function", "function": message["function_call"]}]
        if calls:
            if role != "assistant":
                raise invalid(
                    f"{where}.tool_calls is only allowed on assistant messages", f"{where}.tool_calls"
                )
            converted["tool_calls"] = tools_mod.history_tool_calls(calls, f"{where}.tool_calls")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id is None and message["role"] == "tool":
                raise invalid(f"{where}.tool_call_id is required for tool messages", f"{where}.tool_call_id")
            if call_id is not None:
                if not isinstance(call_id, str):
                    raise invalid(f"{where}.tool_call_id must be a string", f"{where}.tool_call_id")
                converted["tool_call_id"] = call_id
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise invalid(f"{where}.name must be a string", f"{where}.name")
            converted["name"] = name
        reasoning = message.get("reasoning_content")
        if role == "assistant" and isinstance(reasoning, str):
            converted["reasoning_content"] = reasoning  # reasoning templates may show (or drop) it
        out.append(converted)
    return out


def render_chat(
    tokenizer,
    messages: list[dict],
    chat_template: str | None,
    add_generation_prompt: bool,
    param: str = "messages",
    *,
    tools: list[dict] | None = None,
    template_kwargs: dict | None = None,
) -> str:
    try:
        return chat_template_mod.render(
            tokenizer,
            messages,
            chat_template=chat_template,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            template_kwargs=template_kwargs,
        )
    except chat_template_mod.ChatTemplateError as exc:
        raise invalid(str(exc), param if exc.param == "messages" else exc.param) from None
    except Exception as exc:
        raise invalid(f"The chat template could not be applied to '{param}': {exc}", param) from None


def _template_kwargs(fields: dict) -> dict:
    """chat_template_kwargs and the top-level enable_thinking (both as vLLM takes them)."""
    kwargs = dict(fields["chat_template_kwargs"] or {})
    thinking = fields["enable_thinking"]
    if thinking is not None:
        if kwargs.get("enable_thinking", thinking) != thinking:
            raise invalid(
                "'enable_thinking' disagrees with chat_template_kwargs.enable_thinking", "enable_thinking"
            )
        kwargs["enable_thinking"] = thinking
    return kwargs


def parse_chat(
    body: dict,
    served: list[str],
    tokenizer,
    chat_template: str | None,
    *,
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
) -> GenerationRequest:
    """tool_call_parser: the server's --tool-call-parser (None: the one the template's markup names);
    reasoning_parser: --reasoning-parser (None: reasoning stays in content)."""
    model = check_model(body, served)
    fields = read_fields(body, CHAT)
    top_logprobs = fields["top_logprobs"]
    if top_logprobs is not None and not fields["logprobs"] and top_logprobs > 0:
        raise invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    logprobs = (top_logprobs or 0) if fields["logprobs"] else None
    max_tokens = fields["max_completion_tokens"]
    if max_tokens is None:
        max_tokens = fields["max_tokens"]
    stream, include_usage = _stream_options(fields)
    tool_request = tools_mod.parse_tools(fields)
    render_tools = tool_request.render_tools if tool_request else None
    text = render_chat(
        tokenizer,
        fields["messages"],
        chat_template,
        fields["add_generation_prompt"],
        tools=render_tools,
        template_kwargs=_template_kwargs(fields),
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    # No max_tokens: the engine gives the completion the room the prompt leaves.
    params = _sampling(fields, max_tokens=max_tokens, n=fields["n"], logprobs=logprobs)
    gen = GenerationRequest(
        model, [ids], [text], params, stream, include_usage, False, logprobs, True, _constrained_by(fields)
    )
    add_chat_output(gen, tool_request, tokenizer, chat_template, tool_call_parser, reasoning_parser)
    return gen


def add_chat_output(
    gen: GenerationRequest,
    tool_request: tools_mod.ToolRequest | None,
    tokenizer,
    chat_template: str | None,
    tool_call_parser: str | None,
    reasoning_parser: str | None,
) -> None:
    """A chat-rendered request (chat or /v1/responses) whose text is split into reasoning, content and
    tool calls: gen.output, and with tools shown, their grammar or their markup parser."""
    render_tools = tool_request.render_tools if tool_request else None
    if not render_tools and not reasoning_parser:
        return
    gen.output = ChatOutputSpec(gen.prompt_texts[0], reasoning_parser, tool_request)
    if render_tools:
        _tool_constraints(gen.output, gen.params, tokenizer, chat_template, tool_call_parser)
        if tool_request.schema() is not None:
            gen.constrained_by = "tools"  # a bad `parameters` schema is the tools' fault


def _tool_constraints(
    output: ChatOutputSpec, params: SamplingParams, tokenizer, chat_template, parser: str | None
) -> None:
    """required / a named function: a JSON-schema grammar; auto: the markup parser the output needs."""
    tool_request = output.tools
    if parser is None:
        source = chat_template_mod.template_source(tokenizer, chat_template, tool_request.tools)
        parser = chat_template_mod.template_features(source).tool_call_format
    output.tool_call_parser = parser
    schema = tool_request.schema()
    if schema is not None:
        if params.structured_outputs is not None:
            raise invalid(
                "'tool_choice' forcing a call cannot be combined with 'response_format' or "
                "'structured_outputs'",
                "tool_choice",
            )
        params.structured_outputs = StructuredOutputsParams(json=schema)
        return
    if parser is None:
        raise invalid(
            "tool_choice 'auto' needs a tool-call parser and none matches this model's chat template; "
            "serve it with --tool-call-parser (hermes, llama3_json, mistral), or ask for tool_choice "
            "'required' or a named function",
            "tools",
        )
    if parser == "mistral":
        params.skip_special_tokens = False  # [TOOL_CALLS] is a special token: the parser must see it


def _stream_options(fields: dict) -> tuple[bool, bool]:
    stream, options = fields["stream"], fields["stream_options"]
    if options is None:
        return stream, False
    if not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    return stream, _INCLUDE_USAGE.read(options)


def token_id_list(value: Any) -> list[int] | None:
    """value if it is shaped like a list of token ids (the engine checks them against the vocabulary)."""
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        return None
    return value


def prompts_of(value: Any, tokenizer, param: str) -> tuple[list[list[int]], list[str | None]]:
    """str | list[str] | list[int] | list[list[int]] -> token-id prompts (+ their text, when given as text).

    Text gets the tokenizer's special tokens (e.g. BOS), as the engine's own tokenize() and vLLM do."""
    if isinstance(value, str):
        return [tokenizer.encode(value)], [value]
    if isinstance(value, list) and value:
        ids = token_id_list(value)
        if ids is not None:
            return [ids], [None]
        if all(isinstance(v, str) for v in value):
            return [tokenizer.encode(v) for v in value], list(value)
        if all(isinstance(v, list) for v in value):
            lists = []
            for i, v in enumerate(value):
                ids = token_id_list(v)
                if ids is None:
                    raise invalid(f"'{param}[{i}]' must be a non-empty array of token ids", param)
                lists.append(ids)
            return lists, [None] * len(lists)
    raise invalid(
        f"'{param}' must be a string, an array of strings, an array of token ids or an array of "
        "token-id arrays, and not empty",
        param,
    )


def parse_completion(body: dict, served: list[str], tokenizer) -> GenerationRequest:
    model = check_model(body, served)
    fields = read_fields(body, COMPLETIONS)
    prompts, texts = prompts_of(fields["prompt"], tokenizer, "prompt")
    n = fields["n"]
    best_of = fields["best_of"]
    if best_of is not None and best_of != n:
        raise unsupported("best_of", "'best_of' different from 'n'")
    logprobs = fields["logprobs"]
    echo = fields["echo"]
    max_tokens = fields["max_tokens"]
    stream, include_usage = _stream_options(fields)
    # echo + logprobs: the prompt's tokens come first in the logprobs, as OpenAI's completions had them.
    prompt_logprobs = logprobs if echo else None
    params = _sampling(fields, max_tokens=max_tokens, n=n, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    return GenerationRequest(
        model, prompts, texts, params, stream, include_usage, echo, logprobs, False, _constrained_by(fields)
    )
