"""OpenAIApp: the route table, dispatch, auth, CORS and the small endpoints; generation (generation.py)
and embeddings (embeddings.py) have their own modules, request parsing is protocol.py's."""

import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

from .. import __version__
from ..engine.async_engine import AsyncEngine, EngineDeadError
from ..engine.intake import InvalidRequestError, check_token_ids
from . import protocol
from .embeddings import embeddings as embeddings_handler
from .errors import APIError, invalid
from .generation import generate
from .http import Request, Response, StreamingResponse, error_response
from .metrics import Metrics
from .tokenizers import TokenizerPool

logger = logging.getLogger("fast_inference.server")

_OPEN_PATHS = frozenset({"/health", "/ping"})
_QUIET_PATHS = frozenset({"/health", "/ping", "/metrics"})  # probes and scrapes: logged at debug only


@dataclass(slots=True)
class ServerConfig:
    served_model_names: list[str]
    model_path: str = ""
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_pending_requests: int = 2048  # engine requests queued or running; more -> 429
    chat_template: str | None = None
    api_server_index: int | None = None  # which of several API server processes (--api-server-count)


class OpenAIApp:
    """Request -> Response | StreamingResponse. Runs on the event loop; model work goes to the AsyncEngine."""

    def __init__(
        self, engine: AsyncEngine, config: ServerConfig, *, connections: Callable[[], int] = lambda: 0
    ) -> None:
        self.engine = engine
        self.config = config
        self.metrics = Metrics(config.served_model_names[0], config.api_server_index)
        self._connections = connections
        self._api_key = config.api_key.encode() if config.api_key else None
        self._origins = set(config.allowed_origins)
        self._created = int(time.time())
        self.fingerprint = f"fp_fast_inference_{__version__}"
        self.inflight = 0  # engine requests this server has queued or running
        self.tokenizers = TokenizerPool(engine, self.require_ready)
        self.routes: dict[str, dict[str, Callable]] = {
            "/v1/chat/completions": {"POST": self.chat_completions},
            "/v1/completions": {"POST": self.completions},
            "/v1/embeddings": {"POST": self.embeddings},
            "/v1/models": {"GET": self.list_models},
            "/tokenize": {"POST": self.tokenize},
            "/v1/tokenize": {"POST": self.tokenize},
            "/detokenize": {"POST": self.detokenize},
            "/v1/detokenize": {"POST": self.detokenize},
            "/health": {"GET": self.health, "HEAD": self.health},
            "/ping": {"GET": self.ping, "POST": self.ping, "HEAD": self.ping},
            "/version": {"GET": self.version},
            "/metrics": {"GET": self.metrics_text},
        }
        self._model_route = {"GET": self.get_model}

    # -- dispatch ------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response | StreamingResponse:
        request.started = time.perf_counter()
        path = request.path
        route = self.routes.get(path)
        if route is None:
            if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
                route = self._model_route
            else:
                return self._finish(
                    request,
                    path,
                    error_response(
                        APIError(404, f"Not found: {request.method} {path}", code="not_found"),
                        self.cors_headers(request),
                    ),
                )
        if request.method == "OPTIONS":
            return self._preflight(request, route)
        handler = route.get(request.method)
        if handler is None:
            allow = ", ".join([*route, "OPTIONS"])
            return self._finish(
                request,
                path,
                error_response(
                    APIError(
                        405, f"Method {request.method} is not allowed on {path}", code="method_not_allowed"
                    ),
                    [("allow", allow), *self.cors_headers(request)],
                ),
            )
        try:
            if self._api_key is not None and path not in _OPEN_PATHS:
                self._check_key(request)
            response = await handler(request)
        except APIError as err:
            response = error_response(err)
        except EngineDeadError as exc:
            response = error_response(APIError(503, str(exc), code="engine_unavailable"))
        cors = self.cors_headers(request)
        if cors:
            response.headers.extend(cors)
        return self._finish(request, path, response)

    def _finish(self, request: Request, path: str, response: Response | StreamingResponse):
        endpoint = (
            path
            if path in self.routes
            else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        )
        self.metrics.request_done(endpoint, response.status)
        # Generations that started log their own line when they end (with token counts); the rest here.
        if not (getattr(response, "logged_by_job", False) or isinstance(response, StreamingResponse)):
            level = logging.DEBUG if path in _QUIET_PATHS and response.status != 500 else logging.INFO
            if logger.isEnabledFor(level):
                logger.log(
                    level,
                    "%s %s %s status=%d latency=%.1fms",
                    request.client,
                    request.method,
                    path,
                    response.status,
                    (time.perf_counter() - request.started) * 1e3,
                )
        return response

    def _check_key(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Constant time: the comparison does not leak how much of the key matched.
        if not hmac.compare_digest(given, self._api_key):
            raise APIError(
                401,
                "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                type="invalid_request_error",
                code="invalid_api_key",
            )

    # -- CORS ----------------------------------------------------------------------------------------
    def _origin_allowed(self, origin: str) -> bool:
        return "*" in self._origins or origin in self._origins

    def cors_headers(self, request: Request | None) -> list[tuple[str, str]]:
        if not self._origins or request is None:
            return []
        origin = request.headers.get("origin")
        if origin is None or not self._origin_allowed(origin):
            return []
        return [("access-control-allow-origin", "*" if "*" in self._origins else origin), ("vary", "Origin")]

    def _preflight(self, request: Request, route: dict) -> Response:
        methods = ", ".join([*route, "OPTIONS"])
        origin = request.headers.get("origin")
        wanted = request.headers.get("access-control-request-method")
        if origin is None or wanted is None:
            return Response(204, headers=[("allow", methods)])
        if not self._origin_allowed(origin):
            return self._finish(
                request,
                request.path,
                error_response(
                    APIError(
                        403,
                        f"Origin {origin} is not allowed (see --allowed-origins)",
                        code="cors_origin_denied",
                    )
                ),
            )
        if wanted not in route and wanted != "OPTIONS":
            return error_response(
                APIError(405, f"Method {wanted} is not allowed on {request.path}"), self.cors_headers(request)
            )
        headers = [
            *self.cors_headers(request),
            ("access-control-allow-methods", methods),
            (
                "access-control-allow-headers",
                request.headers.get("access-control-request-headers", "authorization, content-type"),
            ),
            ("access-control-max-age", "600"),
        ]
        return Response(204, headers=headers)

    # -- helpers -------------------------------------------------------------------------------------

    def close(self) -> None:
        self.tokenizers.close()

    def require_ready(self) -> None:
        if self.engine.state == "loading":
            raise APIError(503, "The model is still loading; retry shortly", code="model_loading")
        if self.engine.state != "ready":
            raise APIError(
                503,
                f"The engine is unavailable ({self.engine.state}: {self.engine.error})",
                code="engine_unavailable",
            )

    @staticmethod
    def json_body(request: Request) -> dict:
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object", code="invalid_json")
        return body

    @property
    def _model_config(self):
        return self.engine.model_config

    @staticmethod
    def json_response(obj, status: int = 200) -> Response:
        return Response(status, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode())

    # -- simple endpoints ----------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        replicas = self.engine.replica_states()
        if replicas and self.engine.state == "ready":
            # Engine replicas: 200 while any serves, with "degraded" and the state of each.
            status = "ok" if all(r["state"] == "ready" for r in replicas) else "degraded"
            return self.json_response(
                {
                    "status": status,
                    "api_server": self.config.api_server_index,
                    "pid": os.getpid(),
                    "replicas": [
                        {k: r[k] for k in ("replica", "state", "pid", "restarts", "error")} for r in replicas
                    ],
                }
            )
        if self.engine.state == "ready":
            return Response(200, b"", content_type="text/plain")
        if self.engine.state == "loading":
            raise APIError(503, "The model is still loading", code="model_loading")
        raise APIError(
            503,
            f"The engine is unavailable ({self.engine.state}: {self.engine.error})",
            code="engine_unavailable",
        )

    async def ping(self, request: Request) -> Response:
        return Response(200, b"pong", content_type="text/plain")

    async def version(self, request: Request) -> Response:
        return self.json_response({"version": __version__})

    def _model_card(self, name: str) -> dict:
        card = {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "fast_inference",
            "root": self.config.model_path,
        }
        if self.engine.state == "ready":
            card["max_model_len"] = self._model_config.max_model_len
        return card

    async def list_models(self, request: Request) -> Response:
        return self.json_response(
            {"object": "list", "data": [self._model_card(n) for n in self.config.served_model_names]}
        )

    async def get_model(self, request: Request) -> Response:
        name = unquote(request.path[len("/v1/models/") :])
        if name not in self.config.served_model_names:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return self.json_response(self._model_card(name))

    async def metrics_text(self, request: Request) -> Response:
        def gauges() -> dict:
            stats = self.engine.stats_snapshot
            values = {"num_open_connections": self._connections()}
            for src, dst in (
                ("num_running", "num_requests_running"),
                ("num_waiting", "num_requests_waiting"),
                ("kv_cache_usage", "kv_cache_usage_perc"),
                ("prefix_cache_hit_rate", "prefix_cache_hit_rate"),
                ("num_total_blocks", "num_kv_cache_blocks"),
            ):
                if stats.get(src) is not None:
                    values[dst] = stats[src]
            return values

        text = self.metrics.render(gauges, self.engine.replica_states())
        return Response(200, text.encode(), content_type="text/plain; version=0.0.4; charset=utf-8")

    async def tokenize(self, request: Request) -> Response:
        """Tokenize a prompt, or a conversation rendered by the chat template."""
        body = self.json_body(request)
        protocol.check_model(body, self.config.served_model_names)
        fields = protocol.read_fields(body, protocol.TOKENIZE)
        tokenizer = self.tokenizers.tokenizer
        add_special = fields["add_special_tokens"]
        if fields["messages"] is not None:
            text = protocol.render_chat(
                tokenizer, fields["messages"], self.config.chat_template, fields["add_generation_prompt"]
            )
            add_special = False if add_special is None else add_special  # the template has them
        else:
            text = fields["prompt"]
            if text is None:
                raise invalid("'prompt' (a string) or 'messages' is required", "prompt")
            add_special = True if add_special is None else add_special
        ids = tokenizer.encode(text, add_special_tokens=add_special)
        result = {"count": len(ids), "max_model_len": self._model_config.max_model_len, "tokens": ids}
        if fields["return_token_strs"]:
            result["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return self.json_response(result)

    async def detokenize(self, request: Request) -> Response:
        """Decode token ids to text."""
        body = self.json_body(request)
        protocol.check_model(body, self.config.served_model_names)
        tokens = protocol.read_fields(body, protocol.DETOKENIZE)["tokens"]
        vocab = self._model_config.vocab_size
        if tokens == []:
            return self.json_response({"prompt": ""})
        try:
            check_token_ids(tokens, vocab, "tokens")
        except InvalidRequestError as exc:
            raise invalid(str(exc), "tokens") from None
        return self.json_response({"prompt": self.tokenizers.tokenizer.decode(tokens)})

    # -- the handlers that live in their own modules -----------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        return await embeddings_handler(self, request)

    # -- generation ----------------------------------------------------------------------------------
    def admit(self, count: int) -> None:
        if self.inflight + count > self.config.max_pending_requests:
            raise APIError(
                429,
                f"The server is overloaded: {self.inflight} requests already queued "
                f"(limit {self.config.max_pending_requests}); retry later",
                type="rate_limit_error",
                code="server_overloaded",
            )
        self.inflight += count

    async def chat_completions(self, request: Request) -> Response | StreamingResponse:
        return await generate(self, request, chat=True)

    async def completions(self, request: Request) -> Response | StreamingResponse:
        return await generate(self, request, chat=False)
