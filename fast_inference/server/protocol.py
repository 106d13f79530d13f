"""OpenAI request parsing: JSON shapes -> SamplingParams and prompts (the model-dependent checks are the
engine intake's; the response shapes are response_builder.py's)."""

import math
from dataclasses import dataclass
from typing import Any

from ..engine.sampling_params import SamplingParams
from ..ops.sampling import MAX_LOGPROBS
from .errors import APIError, invalid, unsupported

MAX_N = 128
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


# -- typed field readers: each names the parameter in its 400 ------------------------------------------
def _get(body: dict, name: str, kinds: tuple, default: Any = None, *, nullable: bool = True) -> Any:
    value = body.get(name, default)
    if value is None:
        if not nullable and name in body:
            raise invalid(f"'{name}' must not be null", name)
        return default
    # bool is an int in Python; JSON true is never a number here.
    if isinstance(value, bool) and bool not in kinds:
        raise invalid(f"'{name}' must be of type {_names(kinds)}, got a boolean", name)
    if not isinstance(value, kinds):
        raise invalid(f"'{name}' must be of type {_names(kinds)}, got {type(value).__name__}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid(f"'{name}' must be a finite number", name)
    return value


def _names(kinds: tuple) -> str:
    mapping = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
    names = [mapping.get(k, k.__name__) for k in kinds]
    if names == ["integer", "number"]:
        return "number"
    return " or ".join(names)


def _num(
    body: dict,
    name: str,
    default: float,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    value = float(_get(body, name, (int, float), default))
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise invalid(f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise invalid(f"'{name}' must be <= {hi}, got {value}", name)
    return value


def _int(
    body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None
) -> int | None:
    value = _get(body, name, (int, float), default)
    if value is None:
        return None
    if isinstance(value, float):
        if not value.is_integer():
            raise invalid(f"'{name}' must be an integer, got {value}", name)
        value = int(value)
    if lo is not None and value < lo:
        raise invalid(f"'{name}' must be >= {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise invalid(f"'{name}' must be <= {hi}, got {value}", name)
    return value


def _bool(body: dict, name: str, default: bool) -> bool:
    return _get(body, name, (bool,), default)


@dataclass(slots=True)
class GenerationRequest:
    """A validated chat or completions request."""

    model: str
    prompts: list[list[int]]  # one or more prompts as token ids (completions may batch)
    prompt_texts: list[str | None]
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None  # chat: top_logprobs when logprobs is true; completions: logprobs
    chat: bool


def check_model(body: dict, served: list[str]) -> str:
    model = body.get("model")
    if model is None:
        return served[0]  # vLLM-compatible leniency: the served model when none is named
    if not isinstance(model, str):
        raise invalid("'model' must be a string", "model")
    if model not in served:
        raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    return model


def _reject_unsupported(body: dict) -> None:
    for name in ("tools", "functions"):
        if body.get(name):
            raise unsupported(name, f"'{name}' (tool / function calling)")
    for name in ("tool_choice", "function_call"):
        value = body.get(name)
        if value is not None and value not in ("none", "auto"):
            raise unsupported(name, f"'{name}' (tool / function calling)")
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise invalid("'response_format' must be an object with a 'type'", "response_format")
        if fmt["type"] != "text":
            if fmt["type"] in ("json_object", "json_schema"):
                raise unsupported(
                    "response_format", f"response_format type '{fmt['type']}' (structured output)"
                )
            raise invalid(f"Unknown response_format type '{fmt['type']}'", "response_format")
    if body.get("audio") is not None:
        raise unsupported("audio", "Audio output")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        if not isinstance(modalities, list):
            raise invalid("'modalities' must be an array", "modalities")
        raise unsupported("modalities", f"Output modalities {modalities}")
    if body.get("prediction") is not None:
        raise unsupported("prediction", "Predicted outputs")
    if body.get("web_search_options") is not None:
        raise unsupported("web_search_options", "Web search")


def _sampling(
    body: dict, *, max_tokens: int | None, n: int, logprobs: int | None, prompt_logprobs: int | None = None
) -> SamplingParams:
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise invalid("'stop' must be a string or an array of strings", "stop")
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None and not (
        isinstance(stop_token_ids, list)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids)
    ):
        raise invalid("'stop_token_ids' must be an array of token ids", "stop_token_ids")
    bias = body.get("logit_bias")
    logit_bias = None
    if bias is not None:
        if not isinstance(bias, dict):
            raise invalid("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
        logit_bias = {}
        for key, value in bias.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise invalid(f"'logit_bias' key {key!r} is not a token id", "logit_bias") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise invalid(
                    f"'logit_bias' value for token {token} must be a number in [-100, 100]", "logit_bias"
                )
            logit_bias[token] = float(value)
    min_tokens = _int(body, "min_tokens", 0, 0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise invalid(f"'min_tokens' ({min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
    top_k = _int(body, "top_k", 0, -1)
    try:
        return SamplingParams(
            n=n,
            temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=top_k,
            min_p=_num(body, "min_p", 0.0, 0.0, 1.0),
            seed=_int(body, "seed", None, -(2**63), 2**63 - 1),  # int64, as OpenAI
            presence_penalty=_num(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_num(body, "frequency_penalty", 0.0, -2.0, 2.0),
            repetition_penalty=_num(body, "repetition_penalty", 1.0, 0.0, None, lo_open=True),
            stop=stop,
            stop_token_ids=stop_token_ids,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            ignore_eos=_bool(body, "ignore_eos", False),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=logit_bias,
            skip_special_tokens=_bool(body, "skip_special_tokens", True),
            include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
        )
    except ValueError as exc:  # SamplingParams' own checks name the field first
        message = str(exc)
        raise invalid(message, message.split(" ", 1)[0]) from None


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


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
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
        if message.get("tool_calls") or message.get("function_call"):
            raise unsupported(f"{where}.tool_calls", "Assistant tool calls in messages")
        if message.get("audio") is not None:
            raise unsupported(f"{where}.audio", "Audio in messages")
        if role == "developer":
            role = "system"  # developer is OpenAI's new name for system; templates know system
        elif role == "function":
            role = "tool"
        out.append({"role": role, "content": _text_content(message.get("content"), where)})
    return out


def parse_chat(body: dict, served: list[str], tokenizer, chat_template: str | None) -> GenerationRequest:
    model = check_model(body, served)
    _reject_unsupported(body)
    messages = chat_messages(body)
    n = _int(body, "n", 1, 1, MAX_N)
    want_logprobs = _bool(body, "logprobs", False)
    top_logprobs = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top_logprobs is not None and not want_logprobs and top_logprobs > 0:
        raise invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    logprobs = (top_logprobs or 0) if want_logprobs else None
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1)
    stream, include_usage = _stream_options(body)
    add_generation_prompt = _bool(body, "add_generation_prompt", True)
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
        )
    except Exception as exc:
        raise invalid(f"The chat template could not be applied to 'messages': {exc}", "messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    # No max_tokens: the engine gives the completion the room the prompt leaves.
    params = _sampling(body, max_tokens=max_tokens, n=n, logprobs=logprobs)
    return GenerationRequest(model, [ids], [text], params, stream, include_usage, False, logprobs, True)


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("'stream_options' must be an object", "stream_options")
        if not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
        include_usage = _bool(options, "include_usage", False)
    return stream, include_usage


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
    _reject_unsupported(body)
    if "prompt" not in body:
        raise invalid("'prompt' is required", "prompt")
    prompts, texts = prompts_of(body["prompt"], tokenizer, "prompt")
    n = _int(body, "n", 1, 1, MAX_N)
    best_of = _int(body, "best_of", None, 1)
    if best_of is not None and best_of != n:
        raise unsupported("best_of", "'best_of' different from 'n'")
    if body.get("suffix"):
        raise unsupported("suffix", "'suffix' (insertion)")
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = _bool(body, "echo", False)
    max_tokens = _int(body, "max_tokens", 16, 1)
    stream, include_usage = _stream_options(body)
    # echo + logprobs: the prompt's tokens come first in the logprobs, as OpenAI's completions had them.
    prompt_logprobs = logprobs if echo else None
    params = _sampling(body, max_tokens=max_tokens, n=n, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    return GenerationRequest(model, prompts, texts, params, stream, include_usage, echo, logprobs, False)
