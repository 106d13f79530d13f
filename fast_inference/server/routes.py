"""OpenAIApp: the route table, dispatch, auth, CORS and the small endpoints; generation (generation.py)
and embeddings (embeddings.py) have their own modules, request parsing is protocol.py's."""

import asyncio
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
from . import openapi, protocol, responses_api
from .embeddings import embeddings as embeddings_handler
from .errors import APIError, invalid
from .generation import generate
from .http import Request, Response, StreamingResponse, error_response
from .metrics import Metrics
from .response_store import ResponseStore
from .tokenizers import TokenizerPool

logger = logging.getLogger("fast_inference.server")

# Probes and the API's own description answer without the API key.
_OPEN_PATHS = frozenset({"/health", "/ping", "/openapi.json", "/docs"})
_QUIET_PATHS = frozenset({"/health", "/ping", "/metrics"})  # probes and scrapes: logged at debug only


def _split_template(template: str) -> tuple[str, str]:
    """'/v1/responses/{response_id}/cancel' -> ('/v1/responses/', '/cancel')."""
    head, _, rest = template.partition("{")
    return head, rest.partition("}")[2]


def path_id(request: Request, template: str) -> str:
    """The {id} segment of a path that matched `template` (percent-decoded)."""
    prefix, suffix = _split_template(template)
    return unquote(request.path[len(prefix) : len(request.path) - len(suffix)])


@dataclass(slots=True)
class ServerConfig:
    served_model_names: list[str]
    model_path: str = ""
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_pending_requests: int = 2048  # engine requests queued or running; more -> 429
    chat_template: str | None = None
    tool_call_parser: str | None = None  # hermes | llama3_json | mistral; None: the template's markup says
    reasoning_parser: str | None = None  # qwen3 | deepseek_r1; None: reasoning stays in content
    responses_max_stored: int = 1024  # /v1/responses store bounds (least recently used out first)
    responses_max_bytes: int = 64 << 20
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
        self._openapi: bytes | None = None  # built on the first GET /openapi.json
        self.responses = ResponseStore(config.responses_max_stored, config.responses_max_bytes)
        self.background_runs: set[asyncio.Task] = set()  # /v1/responses with background: true
        self.open_paths = _OPEN_PATHS
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
            "/v1/responses": {"POST": self.create_response},
            "/openapi.json": {"GET": self.openapi_json},
            "/docs": {"GET": self.docs},
        }
        # Paths with one {id} segment, tried when no exact path matches: template -> methods.
        self.id_routes: dict[str, dict[str, Callable]] = {
            "/v1/models/{model}": {"GET": self.get_model},
            responses_api.RESPONSE_PATH: {"GET": self.retrieve_response, "DELETE": self.delete_response},
            responses_api.CANCEL_PATH: {"POST": self.cancel_response},
        }
        self._id_matchers = [(*_split_template(t), t, methods) for t, methods in self.id_routes.items()]

    # -- dispatch ------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response | StreamingResponse:
        request.started = time.perf_counter()
        path = request.path
        route = self.routes.get(path)
        if route is None:
            route = self._id_route(path)
            if route is None:
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

    def _id_route(self, path: str) -> dict[str, Callable] | None:
        return next((methods for _, methods in self._match_id(path)), None)

    def _match_id(self, path: str):
        """(template, methods) of the id routes `path` matches: the id is one non-empty segment."""
        for prefix, suffix, template, methods in self._id_matchers:
            if path.startswith(prefix) and path.endswith(suffix):
                segment = path[len(prefix) : len(path) - len(suffix)]
                if segment and "/" not in segment:
                    yield template, methods

    def _finish(self, request: Request, path: str, response: Response | StreamingResponse):
        endpoint = path if path in self.routes else next((t for t, _ in self._match_id(path)), "other")
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
        """Readiness: 200 once the model can serve, 503 while it loads or after a fault. With engine
        replicas: JSON, 200 while any replica serves ("degraded" when some do not)."""
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
        """Liveness: always pong."""
        return Response(200, b"pong", content_type="text/plain")

    async def version(self, request: Request) -> Response:
        """The server's version."""
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
        """The served model names."""
        return self.json_response(
            {"object": "list", "data": [self._model_card(n) for n in self.config.served_model_names]}
        )

    async def get_model(self, request: Request) -> Response:
        """One served model."""
        name = path_id(request, "/v1/models/{model}")
        if name not in self.config.served_model_names:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return self.json_response(self._model_card(name))

    async def metrics_text(self, request: Request) -> Response:
        """Prometheus metrics (text exposition format)."""

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

    async def openapi_json(self, request: Request) -> Response:
        """This API's OpenAPI 3.1 description, generated from the routing and request-field tables."""
        if self._openapi is None:
            self._openapi = json.dumps(openapi.document(self), ensure_ascii=False).encode()
        return Response(200, self._openapi)

    async def docs(self, request: Request) -> Response:
        """A page that renders /openapi.json (self-contained: works offline)."""
        return Response(200, openapi.docs_page(), content_type="text/html; charset=utf-8")

    # -- the handlers that live in their own modules -----------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        """Embed texts or token ids."""
        return await embeddings_handler(self, request)

    async def create_response(self, request: Request) -> Response | StreamingResponse:
        """Create a model response (Responses API): a response object, or with stream the response.* events.

        store (default true) keeps it for GET, previous_response_id and cancel in a bounded in-memory
        store. background answers at once with the in-progress object and generates it on the server.
        cancel stops a stored response while it is generating (in the background, or while another
        request streams or waits for it) and returns a finished one unchanged."""
        return await responses_api.create_response(self, request)

    async def retrieve_response(self, request: Request) -> Response:
        """A stored response (in progress or finished)."""
        return await responses_api.retrieve_response(self, path_id(request, responses_api.RESPONSE_PATH))

    async def delete_response(self, request: Request) -> Response:
        """Delete a stored response (one still generating is stopped first)."""
        return await responses_api.delete_response(self, path_id(request, responses_api.RESPONSE_PATH))

    async def cancel_response(self, request: Request) -> Response:
        """Cancel a stored response that is still generating: it ends with status cancelled and the text
        so far. A finished response is returned unchanged."""
        return await responses_api.cancel_response(self, path_id(request, responses_api.CANCEL_PATH))

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
        """Generate the next assistant message of a conversation."""
        return await generate(self, request, chat=True)

    async def completions(self, request: Request) -> Response | StreamingResponse:
        """Complete a prompt."""
        return await generate(self, request, chat=False)
