"""The OpenAI-compatible routes: dispatch, auth, CORS, and the chat/completions/embeddings/tokenize handlers."""

import asyncio
import base64
import copy
import hmac
import json
import logging
import math
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import unquote

from .. import __version__
from ..engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from ..engine.intake import InvalidRequestError, check_token_ids, resolve_truncation
from ..engine.outputs import CompletionOutput, RequestOutput
from . import protocol, sse
from .errors import APIError, invalid
from .http import Request, Response, StreamingResponse, error_response
from .metrics import Metrics

logger = logging.getLogger("fast_inference.server")

_OPEN_PATHS = frozenset({"/health", "/ping"})
# Requests with larger bodies are tokenized (and chat-templated) off the event loop.
_INLINE_TOKENIZE_BYTES = 16 * 1024
_QUIET_PATHS = frozenset({"/health", "/ping", "/metrics"})  # probes and scrapes: logged at debug only


@dataclass(slots=True)
class ServerConfig:
    served_model_names: list[str]
    model_path: str = ""
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    max_pending_requests: int = 2048  # engine requests queued or running; more -> 429
    chat_template: str | None = None


class OpenAIApp:
    """Request -> Response | StreamingResponse. Runs on the event loop; model work goes to the AsyncEngine."""

    def __init__(
        self, engine: AsyncEngine, config: ServerConfig, *, connections: Callable[[], int] = lambda: 0
    ) -> None:
        self.engine = engine
        self.config = config
        self.metrics = Metrics(config.served_model_names[0])
        self._connections = connections
        self._api_key = config.api_key.encode() if config.api_key else None
        self._origins = set(config.allowed_origins)
        self._created = int(time.time())
        self._fingerprint = f"fp_fast_inference_{__version__}"
        self._tokenizer = None
        self.inflight = 0  # engine requests this server has queued or running
        self._pool: ThreadPoolExecutor | None = None  # the tokenizer thread, started on first need
        self._pool_tokenizer = None
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
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._require_ready()
            # A private copy: Rust tokenizers are not safe to share with the engine thread's detokenizer.
            try:
                self._tokenizer = copy.deepcopy(self.engine.tokenizer)
            except Exception:
                self._tokenizer = self.engine.tokenizer
        return self._tokenizer

    async def _tokenizing(self, request: Request, fn: Callable):
        """fn(tokenizer): in line for small requests; for large ones on the tokenizer thread, with that
        thread's own tokenizer copy, so a long prompt never stalls the event loop and every other stream."""
        tokenizer = self.tokenizer
        if len(request.body) <= _INLINE_TOKENIZE_BYTES:
            return fn(tokenizer)
        if self._pool is None:
            try:
                self._pool_tokenizer = copy.deepcopy(tokenizer)
            except Exception:  # cannot get a private copy: sharing one across threads is not safe
                return fn(tokenizer)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fast-inference-tokenizer")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, self._pool_tokenizer)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _require_ready(self) -> None:
        if self.engine.state == "loading":
            raise APIError(503, "The model is still loading; retry shortly", code="model_loading")
        if self.engine.state != "ready":
            raise APIError(
                503,
                f"The engine is unavailable ({self.engine.state}: {self.engine.error})",
                code="engine_unavailable",
            )

    @staticmethod
    def _json_body(request: Request) -> dict:
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
    def _json(obj, status: int = 200) -> Response:
        return Response(status, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode())

    # -- simple endpoints ----------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
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
        return self._json({"version": __version__})

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
        return self._json(
            {"object": "list", "data": [self._model_card(n) for n in self.config.served_model_names]}
        )

    async def get_model(self, request: Request) -> Response:
        name = unquote(request.path[len("/v1/models/") :])
        if name not in self.config.served_model_names:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return self._json(self._model_card(name))

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

        return Response(
            200, self.metrics.render(gauges).encode(), content_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def tokenize(self, request: Request) -> Response:
        body = self._json_body(request)
        protocol.check_model(body, self.config.served_model_names)
        tokenizer = self.tokenizer
        if "messages" in body:
            messages = protocol.chat_messages(body)
            add_generation_prompt = protocol._bool(body, "add_generation_prompt", True)
            try:
                text = tokenizer.apply_chat_template(
                    messages,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    chat_template=self.config.chat_template,
                )
            except Exception as exc:
                raise invalid(f"The chat template could not be applied: {exc}", "messages") from None
            add_special = protocol._bool(body, "add_special_tokens", False)
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise invalid("'prompt' (a string) or 'messages' is required", "prompt")
            add_special = protocol._bool(body, "add_special_tokens", True)
        ids = tokenizer.encode(text, add_special_tokens=add_special)
        result = {"count": len(ids), "max_model_len": self._model_config.max_model_len, "tokens": ids}
        if protocol._bool(body, "return_token_strs", False):
            result["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return self._json(result)

    async def detokenize(self, request: Request) -> Response:
        body = self._json_body(request)
        protocol.check_model(body, self.config.served_model_names)
        tokens = body.get("tokens")
        vocab = self._model_config.vocab_size
        if tokens == []:
            return self._json({"prompt": ""})
        try:
            check_token_ids(tokens, vocab, "tokens")
        except InvalidRequestError as exc:
            raise invalid(str(exc), "tokens") from None
        return self._json({"prompt": self.tokenizer.decode(tokens)})

    # -- embeddings ----------------------------------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        body = self._json_body(request)
        model = protocol.check_model(body, self.config.served_model_names)
        self._require_ready()
        if "input" not in body:
            raise invalid("'input' is required", "input")
        cfg = self._model_config
        prompts = await self._tokenizing(
            request, lambda tokenizer: protocol.prompts_of(body["input"], tokenizer, "input")[0]
        )
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise invalid("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        dimensions = _embedding_dimensions(body, cfg, model)
        self._admit(len(prompts))
        try:
            vectors = await self.engine.embed(prompts, body.get("truncate_prompt_tokens"))
        except InvalidRequestError as exc:  # the engine's intake refused it
            param = "truncate_prompt_tokens" if exc.param == "truncate_prompt_tokens" else "input"
            raise APIError(400, str(exc), param=param, code=exc.code) from None
        finally:
            self.inflight -= len(prompts)
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
        cut = resolve_truncation(body.get("truncate_prompt_tokens"), cfg.max_model_len)
        tokens = sum(len(p) if cut is None else min(len(p), cut) for p in prompts)
        self.metrics.prompt_tokens += tokens
        return self._json(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    # -- generation ----------------------------------------------------------------------------------
    def _admit(self, count: int) -> None:
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
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response | StreamingResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response | StreamingResponse:
        arrival = time.perf_counter()
        body = self._json_body(request)
        protocol.check_model(body, self.config.served_model_names)
        self._require_ready()
        if not self.engine.supports_generation:
            raise invalid(
                f"The model '{self.config.served_model_names[0]}' is an embedding model and does "
                "not support generation; use /v1/embeddings",
                "model",
            )
        names = self.config.served_model_names

        def parse(tokenizer) -> protocol.GenerationRequest:
            if chat:
                return protocol.parse_chat(body, names, tokenizer, self.config.chat_template)
            return protocol.parse_completion(body, names, tokenizer)

        gen = await self._tokenizing(request, parse)
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self._admit(len(gen.prompts))
        streams: list[RequestStream] = []
        try:
            if len(gen.prompts) == 1:
                streams.append(
                    await self.engine.add_request(
                        request_id, gen.prompts[0], gen.params, max_tokens_must_fit=True
                    )
                )
            else:
                results = await asyncio.gather(
                    *(
                        self.engine.add_request(
                            f"{request_id}-{i}", ids, gen.params, max_tokens_must_fit=True
                        )
                        for i, ids in enumerate(gen.prompts)
                    ),
                    return_exceptions=True,
                )
                streams = [r for r in results if isinstance(r, RequestStream)]
                for r in results:
                    if isinstance(r, BaseException):
                        raise r
        except BaseException as exc:
            for stream in streams:
                stream.abort()
            self.inflight -= len(gen.prompts)
            if isinstance(exc, InvalidRequestError):  # the engine's intake refused it
                param = ("messages" if chat else "prompt") if exc.param == "prompt" else exc.param
                raise APIError(400, str(exc), param=param, code=exc.code) from None
            raise
        job = _Job(self, gen, request_id, streams, arrival)
        if gen.stream:
            return StreamingResponse(200, job.stream(), on_close=job.close)
        try:
            response = self._json(await job.collect())
            response.logged_by_job = True
            return response
        except asyncio.CancelledError:
            job.status = 499  # the client went away: the engine request is aborted in close()
            raise
        except APIError as err:
            job.status = err.status
            raise
        finally:
            job.close()


class _Job:
    """One generation request's life after admission: reading outputs, metrics, logging, clean-up."""

    def __init__(
        self,
        app: OpenAIApp,
        gen: protocol.GenerationRequest,
        request_id: str,
        streams: list[RequestStream],
        arrival: float,
    ) -> None:
        self.app = app
        self.gen = gen
        self.request_id = request_id
        self.streams = streams
        self.arrival = arrival
        self.created = int(time.time())
        self.first_token_time: float | None = None
        self.last_token_time = arrival
        self.completion_tokens = 0
        self.status = 200
        self.closed = False
        self.finals: list[RequestOutput | None] = [None] * len(streams)
        self.token_counts = [0] * (len(streams) * gen.params.n)

    def _observe(self, prompt_index: int, output: RequestOutput) -> None:
        """Token counts and TTFT/ITL from one delta; the deltas are folded into self.finals."""
        n = self.gen.params.n
        new = 0
        for c in output.outputs:
            self.token_counts[prompt_index * n + c.index] += len(c.token_ids)
            new += len(c.token_ids)
        final = self.finals[prompt_index]
        if final is None:
            # The stream's own copy: the delta object itself is folded into, the engine never reuses it.
            self.finals[prompt_index] = RequestOutput(
                output.request_id, output.prompt, output.prompt_token_ids,
                [CompletionOutput(c.index, c.text, list(c.token_ids), c.cumulative_logprob,
                                  list(c.logprobs) if c.logprobs is not None else None,
                                  c.finish_reason, c.stop_reason) for c in output.outputs],
                output.finished, output.metrics, output.num_cached_tokens, output.prompt_logprobs,
            )  # fmt: skip
        else:
            final.add(output)
        if new <= 0:
            return
        now = time.perf_counter()
        metrics = self.app.metrics
        if self.first_token_time is None:
            self.first_token_time = now
            metrics.ttft.observe(now - self.arrival)
            new -= 1
        if new > 0:
            metrics.itl.observe((now - self.last_token_time) / new, new)
        self.last_token_time = now

    async def _outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self.streams) == 1:
            async for output in self.streams[0]:
                self._observe(0, output)
                yield 0, output
            return
        # Several prompts: merge their streams in arrival order.
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    merged.put_nowait((i, output, None))
            except BaseException as exc:
                merged.put_nowait((i, None, exc))
                return
            merged.put_nowait((i, None, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, output, exc = await merged.get()
                if exc is not None:
                    raise exc
                if output is None:
                    remaining -= 1
                    continue
                self._observe(i, output)
                yield i, output
        finally:
            for task in tasks:
                task.cancel()

    async def collect(self) -> dict:
        try:
            async for _ in self._outputs():
                pass
        except EngineDeadError as exc:
            self.status = 503
            raise APIError(503, str(exc), code="engine_unavailable") from None
        return self._response_body()

    def _response_body(self) -> dict:
        gen = self.gen
        app = self.app
        choices = []
        prompt_tokens = cached = 0
        for i, final in enumerate(self.finals):
            if final is None:
                raise APIError(500, "The engine finished a request without output")
            prompt_tokens += len(gen.prompts[i])
            cached += final.num_cached_tokens
            for c in final.outputs:
                index = i * gen.params.n + c.index
                reason = protocol.finish_reason(c.finish_reason)
                if gen.chat:
                    logprobs = None
                    if gen.logprobs is not None:
                        logprobs = {
                            "content": protocol.chat_logprobs(c, gen.logprobs),
                            "refusal": None,
                        }
                    choices.append(
                        {
                            "index": index,
                            "message": {"role": "assistant", "content": c.text, "refusal": None},
                            "logprobs": logprobs,
                            "finish_reason": reason,
                            "stop_reason": c.stop_reason,
                        }
                    )
                else:
                    prefix = self._echo_text(i) if gen.echo else ""
                    logprobs = None
                    if gen.logprobs is not None:
                        logprobs = protocol.completion_logprobs(c, gen.logprobs, len(prefix))
                        if gen.echo:
                            logprobs = protocol.join_logprobs(
                                protocol.prompt_completion_logprobs(final, gen.logprobs, self._token_text),
                                logprobs,
                            )
                    choices.append(
                        {
                            "index": index,
                            "text": prefix + c.text,
                            "logprobs": logprobs,
                            "finish_reason": reason,
                            "stop_reason": c.stop_reason,
                        }
                    )
        choices.sort(key=lambda c: c["index"])
        self.completion_tokens = sum(self.token_counts)
        return {
            "id": self.request_id,
            "object": "chat.completion" if gen.chat else "text_completion",
            "created": self.created,
            "model": gen.model,
            "system_fingerprint": app._fingerprint,
            "choices": choices,
            "usage": protocol.usage(prompt_tokens, self.completion_tokens, cached),
        }

    def _token_text(self, token_id: int) -> str:
        return self.app.tokenizer.decode([token_id])

    def _echo_text(self, i: int) -> str:
        text = self.gen.prompt_texts[i]
        return text if text is not None else self.app.tokenizer.decode(self.gen.prompts[i])

    async def stream(self) -> AsyncIterator[bytes]:
        gen = self.gen
        app = self.app
        n = gen.params.n
        total = len(self.streams) * n
        enc = sse.ChunkEncoder(
            chat=gen.chat,
            request_id=self.request_id,
            created=self.created,
            model=gen.model,
            fingerprint=app._fingerprint,
        )
        done = [False] * total
        try:
            if gen.chat:
                for k in range(total):
                    yield enc.choice(k, "", role=True)
            elif gen.echo and gen.logprobs is None:
                for k in range(total):
                    yield enc.choice(k, self._echo_text(k // n))
            text_offsets = [0] * total
            echo_sent = [False] * len(self.streams)
            async for i, delta in self._outputs():
                if gen.echo and gen.logprobs is not None and not echo_sent[i]:
                    # The prompt's logprobs come with its first delta: echo it (and them) first.
                    echo_sent[i] = True
                    echo = self._echo_text(i)
                    prompt_lps = protocol.prompt_completion_logprobs(
                        self.finals[i], gen.logprobs, self._token_text
                    )
                    for k in range(i * n, (i + 1) * n):
                        text_offsets[k] = len(echo)
                        yield enc.choice(k, echo, logprobs=prompt_lps)
                for c in delta.outputs:
                    k = i * n + c.index
                    if done[k]:
                        continue
                    reason = protocol.finish_reason(c.finish_reason)
                    logprobs = None
                    if gen.logprobs is not None and c.token_ids:
                        if gen.chat:
                            logprobs = {"content": protocol.chat_logprobs(c, gen.logprobs), "refusal": None}
                        else:
                            logprobs = protocol.completion_logprobs(c, gen.logprobs, text_offsets[k])
                            text_offsets[k] += sum(len(t) for t in logprobs["tokens"])
                    if reason is None and logprobs is None:
                        if c.text:
                            yield enc.text(k, c.text)
                        continue
                    if reason is not None:
                        done[k] = True
                    yield enc.choice(
                        k,
                        c.text if (c.text or not gen.chat) else None,
                        logprobs=logprobs,
                        finish_reason=reason,
                        stop_reason=c.stop_reason,
                    )
            if gen.include_usage:
                prompt_tokens = sum(len(p) for p in gen.prompts)
                cached = sum(f.num_cached_tokens for f in self.finals if f is not None)
                yield enc.usage(protocol.usage(prompt_tokens, sum(self.token_counts), cached))
        except asyncio.CancelledError:
            self.status = 499  # client closed the connection
            raise
        except Exception as exc:
            # Headers are gone already: report the fault in-band, then end the stream properly.
            if isinstance(exc, APIError):
                err = exc
            elif isinstance(exc, EngineDeadError):
                err = APIError(503, str(exc), code="engine_unavailable")
            else:
                logger.exception("stream %s failed", self.request_id)
                err = APIError(500, "Internal server error during streaming")
            self.status = err.status
            yield sse.error_event(err.body())
        finally:
            self.close()
        yield sse.DONE

    def close(self) -> None:
        """Abort what is still running (client gone, fault), account the request, and log it once."""
        if self.closed:
            return
        self.closed = True
        for stream in self.streams:
            stream.abort()
        app = self.app
        app.inflight -= len(self.streams)
        metrics = app.metrics
        now = time.perf_counter()
        prompt_tokens = sum(len(p) for p in self.gen.prompts)
        completion_tokens = sum(self.token_counts)
        metrics.prompt_tokens += prompt_tokens
        metrics.generation_tokens += completion_tokens
        for final in self.finals:
            if final is not None:
                for c in final.outputs:
                    if c.finish_reason is not None:
                        metrics.finish(c.finish_reason)
        if self.status == 200:
            metrics.e2e.observe(now - self.arrival)
        ttft = f"{(self.first_token_time - self.arrival) * 1e3:.1f}ms" if self.first_token_time else "-"
        logger.info(
            "%s status=%d prompt_tokens=%d completion_tokens=%d ttft=%s latency=%.1fms%s",
            self.request_id,
            self.status,
            prompt_tokens,
            completion_tokens,
            ttft,
            (now - self.arrival) * 1e3,
            " stream" if self.gen.stream else "",
        )


def _embedding_dimensions(body: dict, cfg, model: str) -> int | None:
    """'dimensions': only for Matryoshka models (config.json is_matryoshka / matryoshka_dimensions), as OpenAI
    and vLLM do: cutting the vector of a model not trained for it gives poor embeddings."""
    dims = body.get("dimensions")
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
