"""Request intake: the one place where a request is checked against the served model (token ids, prompt
length, max_tokens, truncation), raising InvalidRequestError, which names the field it refuses."""

from .sampling_params import SamplingParams

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class InvalidRequestError(ValueError):
    """The engine refuses a request. `param` is the field (prompt, input, max_tokens, logit_bias,
    stop_token_ids, truncate_prompt_tokens, tokens); `code` is set for context-length refusals.
    The server answers it with its 400 envelope."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def check_token_ids(ids, vocab_size: int, param: str) -> list[int]:
    """A non-empty list of in-vocabulary token ids, as plain ints."""
    if not isinstance(ids, list | tuple):
        raise InvalidRequestError(f"{param} must be a list of token ids, got {type(ids).__name__}", param)
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise InvalidRequestError(f"{param} token ids must be integers, got {t!r}", param)
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(
                f"{param} contains token id {t}, outside the vocabulary [0, {vocab_size})", param
            )
        out.append(int(t))
    if not out:
        raise InvalidRequestError(f"{param} is empty", param)
    return out


def check_generation(
    num_prompt_tokens: int,
    params: SamplingParams,
    *,
    vocab_size: int,
    max_model_len: int,
    kv_capacity: int,
    max_tokens_must_fit: bool,
) -> int:
    """The request's token budget: params.max_tokens capped to the room the prompt leaves. With
    max_tokens_must_fit (the OpenAI API's rule) a max_tokens that does not fit max_model_len is refused
    instead of capped."""
    capacity = min(max_model_len, kv_capacity)
    wanted = params.max_tokens if max_tokens_must_fit and params.max_tokens is not None else 1
    if num_prompt_tokens >= capacity or num_prompt_tokens + wanted > max_model_len:
        limit = (
            f"maximum context length (max_model_len) is {max_model_len}"
            if capacity == max_model_len
            else f"KV cache capacity is {capacity}"
        )
        raise InvalidRequestError(
            f"This model's {limit} tokens. However, you requested {num_prompt_tokens + wanted} tokens "
            f"({num_prompt_tokens} in the prompt, {wanted} in the completion). Please reduce the length "
            "of the prompt or the completion.",
            "prompt",
            CONTEXT_LENGTH_EXCEEDED,
        )
    for name, ids in (
        ("logit_bias", params.logit_bias or {}),
        ("stop_token_ids", params.stop_token_ids or []),
    ):
        for t in ids:
            if not 0 <= t < vocab_size:
                raise InvalidRequestError(
                    f"{name} token id {t} is outside the vocabulary [0, {vocab_size})", name
                )
    room = capacity - num_prompt_tokens
    return room if params.max_tokens is None else min(params.max_tokens, room)


def resolve_truncation(truncate_prompt_tokens, max_model_len: int) -> int | None:
    """truncate_prompt_tokens (vLLM's extension): keep the first k tokens; -1 means max_model_len."""
    k = truncate_prompt_tokens
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not (k == -1 or 1 <= k <= max_model_len):
        raise InvalidRequestError(
            f"truncate_prompt_tokens must be -1 or an integer in [1, max_model_len={max_model_len}], "
            f"got {k!r}",
            "truncate_prompt_tokens",
        )
    return max_model_len if k == -1 else k


def check_embedding_inputs(
    inputs,
    *,
    vocab_size: int,
    max_model_len: int,
    truncate_prompt_tokens: int | None = None,
    end_token_id: int | None = None,
    param: str = "token_id_lists",
) -> list[list[int]]:
    """Embedding inputs (token-id lists), truncated as asked (see resolve_truncation); an input that
    ends with end_token_id (an encoder's [SEP]) keeps it when cut, as sentence-transformers truncates.
    Still longer than max_model_len: refused."""
    if not isinstance(inputs, list | tuple) or not inputs:
        raise InvalidRequestError(f"{param}: must be a non-empty list of token-id lists", param)
    k = resolve_truncation(truncate_prompt_tokens, max_model_len)
    out = []
    for i, ids in enumerate(inputs):
        where = f"{param}[{i}]"
        try:
            ids = check_token_ids(ids, vocab_size, where)
        except InvalidRequestError as exc:
            raise InvalidRequestError(str(exc), param) from None
        if k is not None and len(ids) > k:
            keep_end = end_token_id is not None and ids[-1] == end_token_id and k > 1
            ids = ids[: k - 1] + ids[-1:] if keep_end else ids[:k]
        if len(ids) > max_model_len:
            raise InvalidRequestError(
                f"{where}: {len(ids)} tokens exceed the model's maximum context length {max_model_len} "
                "(shorten the input or set truncate_prompt_tokens)",
                param,
                CONTEXT_LENGTH_EXCEEDED,
            )
        out.append(ids)
    return out
