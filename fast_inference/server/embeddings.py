"""/v1/embeddings: inputs -> the engine's embed (which validates and truncates), Matryoshka dimensions,
float or base64 vectors."""

import base64
import math
import struct
from typing import TYPE_CHECKING

from ..engine.intake import InvalidRequestError, resolve_truncation
from . import protocol
from .errors import APIError, invalid
from .http import Request, Response

if TYPE_CHECKING:
    from .routes import OpenAIApp


async def embeddings(app: "OpenAIApp", request: Request) -> Response:
    body = app.json_body(request)
    model = protocol.check_model(body, app.config.served_model_names)
    app.require_ready()
    fields = protocol.read_fields(body, protocol.EMBEDDINGS)
    cfg = app.engine.model_config
    prompts = await app.tokenizers.run(
        request, lambda tokenizer: protocol.prompts_of(fields["input"], tokenizer, "input")[0]
    )
    encoding = fields["encoding_format"]
    dimensions = _embedding_dimensions(fields["dimensions"], cfg, model)
    app.admit(len(prompts))
    try:
        vectors = await app.engine.embed(prompts, fields["truncate_prompt_tokens"])
    except InvalidRequestError as exc:  # the engine's intake refused it
        param = "truncate_prompt_tokens" if exc.param == "truncate_prompt_tokens" else "input"
        raise APIError(400, str(exc), param=param, code=exc.code) from None
    finally:
        app.inflight -= len(prompts)
    data = []
    for i, vector in enumerate(vectors):
        if dimensions is not None:  # Matryoshka: keep the leading dimensions, back to unit length
            vector = vector[:dimensions]
            norm = math.sqrt(sum(x * x for x in vector)) or 1.0
            vector = [x / norm for x in vector]
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            value = vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    # The engine accepted the truncation, so this cannot raise; inputs are cut to its length.
    cut = resolve_truncation(fields["truncate_prompt_tokens"], cfg.max_model_len)
    tokens = sum(len(p) if cut is None else min(len(p), cut) for p in prompts)
    app.metrics.prompt_tokens += tokens
    return app.json_response(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _embedding_dimensions(dims, cfg, model: str) -> int | None:
    """'dimensions': only for Matryoshka models (config.json is_matryoshka / matryoshka_dimensions), as OpenAI
    and vLLM do: cutting the vector of a model not trained for it gives poor embeddings."""
    if dims is None:
        return None
    size = getattr(cfg, "embedding_size", cfg.hidden_size)
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= size:
        raise invalid(f"'dimensions' must be an integer in [1, {size}], got {dims!r}", "dimensions")
    allowed = getattr(cfg, "matryoshka_dimensions", None)
    if not getattr(cfg, "is_matryoshka", False):
        raise invalid(
            f"The model '{model}' does not support 'dimensions' (it is not a Matryoshka embedding "
            "model); omit it to get the full vector",
            "dimensions",
            code="unsupported_parameter",
        )
    if allowed and dims not in allowed:
        raise invalid(
            f"The model '{model}' supports 'dimensions' in {sorted(allowed)}, got {dims}", "dimensions"
        )
    return dims
