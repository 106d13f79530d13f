"""/v1/chat/completions and /v1/completions: parse, admit, add to the engine, then one GenerationJob per
request reads the engine's deltas and answers (a JSON body, or SSE chunks as the deltas come) in the
shapes response_builder.py builds."""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..engine.async_engine import EngineDeadError, RequestStream
from ..engine.intake import InvalidRequestError
from ..engine.outputs import RequestOutput
from . import protocol, sse
from .errors import APIError, invalid
from .http import Request, Response, StreamingResponse
from .response_builder import ChoiceState, ResponseBuilder, usage

if TYPE_CHECKING:
    from .routes import OpenAIApp

logger = logging.getLogger("fast_inference.server")


async def generate(app: "OpenAIApp", request: Request, chat: bool) -> Response | StreamingResponse:
    arrival = time.perf_counter()
    body = app.json_body(request)
    protocol.check_model(body, app.config.served_model_names)
    require_generation(app)
    names = app.config.served_model_names

    def parse(tokenizer) -> protocol.GenerationRequest:
        if chat:
            return protocol.parse_chat(
                body,
                names,
                tokenizer,
                app.config.chat_template,
                tool_call_parser=app.config.tool_call_parser,
                reasoning_parser=app.config.reasoning_parser,
            )
        return protocol.parse_completion(body, names, tokenizer)

    gen = await app.tokenizers.run(request, parse)
    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    job = await start_job(app, gen, request_id, arrival, "messages" if chat else "prompt")
    if gen.stream:
        return StreamingResponse(200, job.stream(), on_close=job.close)
    return await json_answer(app, job, job)


async def json_answer(app: "OpenAIApp", job: "GenerationJob", source) -> Response:
    """A non-streamed answer: the body source.collect() builds, then source.close() (source: the job, or
    /v1/responses' run over it). The job keeps the status its log line reports."""
    try:
        response = app.json_response(await source.collect())
        response.logged_by_job = True
        return response
    except asyncio.CancelledError:
        job.status = 499  # the client went away: the engine request is aborted in close()
        raise
    except APIError as err:
        job.status = err.status
        raise
    finally:
        source.close()


def require_generation(app: "OpenAIApp") -> None:
    """503 while the engine is not ready, 400 for an embedding model."""
    app.require_ready()
    if not app.engine.supports_generation:
        raise invalid(
            f"The model '{app.config.served_model_names[0]}' is an embedding model and does "
            "not support generation; use /v1/embeddings",
            "model",
        )


async def start_job(
    app: "OpenAIApp", gen: protocol.GenerationRequest, request_id: str, arrival: float, prompt_param: str
) -> "GenerationJob":
    """Admit gen and add its prompts to the engine; the job reads their outputs. An engine refusal of the
    prompt is a 400 naming prompt_param, the request field the prompt came from."""
    app.admit(len(gen.prompts))
    streams: list[RequestStream] = []
    try:
        if len(gen.prompts) == 1:
            streams.append(
                await app.engine.add_request(request_id, gen.prompts[0], gen.params, max_tokens_must_fit=True)
            )
        else:
            results = await asyncio.gather(
                *(
                    app.engine.add_request(f"{request_id}-{i}", ids, gen.params, max_tokens_must_fit=True)
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
        app.inflight -= len(gen.prompts)
        if isinstance(exc, InvalidRequestError):  # the engine's intake refused it
            param = prompt_param if exc.param == "prompt" else exc.param
            if param == "structured_outputs" and gen.constrained_by:  # the field the client set
                param = gen.constrained_by
            raise APIError(400, str(exc), param=param, code=exc.code) from None
        raise
    return GenerationJob(app, gen, request_id, streams, arrival)


def stream_error(exc: Exception, request_id: str) -> APIError:
    """The error a stream reports in-band for a fault after its headers went out (unknown ones logged)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable")
    logger.exception("stream %s failed", request_id)
    return APIError(500, "Internal server error during streaming")


class GenerationJob:
    """One generation request's life after admission: reading outputs, metrics, logging, clean-up."""

    def __init__(
        self,
        app: "OpenAIApp",
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
        self.builder = ResponseBuilder(
            chat=gen.chat,
            request_id=request_id,
            created=self.created,
            model=gen.model,
            fingerprint=app.fingerprint,
            top_logprobs=gen.logprobs,
            output=gen.output,
        )

    def _observe(self, prompt_index: int, output: RequestOutput) -> None:
        """Token counts and TTFT/ITL from one delta; the deltas are folded into self.finals."""
        n = self.gen.params.n
        new = 0
        for c in output.outputs:
            self.token_counts[prompt_index * n + c.index] += len(c.token_ids)
            new += len(c.token_ids)
        final = self.finals[prompt_index]
        if final is None:  # a fold of its own: add() copies what it keeps, the delta stays the stream's
            final = self.finals[prompt_index] = RequestOutput(
                output.request_id, output.prompt, output.prompt_token_ids, [], False
            )
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

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
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
            async for _ in self.outputs():
                pass
        except EngineDeadError as exc:
            self.status = 503
            raise APIError(503, str(exc), code="engine_unavailable") from None
        return self._response_body()

    def _response_body(self) -> dict:
        """The JSON body: each choice is the fold of the pieces a stream would have sent for it."""
        gen = self.gen
        builder = self.builder
        states = []
        prompt_tokens = cached = 0
        for i, final in enumerate(self.finals):
            if final is None:
                raise APIError(500, "The engine finished a request without output")
            prompt_tokens += len(gen.prompts[i])
            cached += final.num_cached_tokens
            if gen.echo:
                echo_text, echo_logprobs = self._echo(i)
            for c in final.outputs:
                state = ChoiceState(i * gen.params.n + c.index)
                if gen.echo:
                    state.add(builder.echo_piece(state, echo_text, echo_logprobs))
                state.add(builder.piece(state, c))
                states.append(state)
        self.completion_tokens = sum(self.token_counts)
        return builder.body(states, usage(prompt_tokens, self.completion_tokens, cached))

    def _echo(self, i: int) -> tuple[str, dict | None]:
        """echo: prompt i's text, and with logprobs its tokens' logprobs (from the engine's prompt logprobs)."""
        text = self.gen.prompt_texts[i]
        if text is None:
            text = self.app.tokenizers.tokenizer.decode(self.gen.prompts[i])
        if self.gen.logprobs is None:
            return text, None
        decode = self.app.tokenizers.tokenizer.decode
        return text, self.builder.prompt_logprobs(self.finals[i], lambda token_id: decode([token_id]))

    async def stream(self) -> AsyncIterator[bytes]:
        gen = self.gen
        builder = self.builder
        n = gen.params.n
        states = [ChoiceState(k) for k in range(len(self.streams) * n)]
        try:
            if gen.chat:
                for state in states:
                    yield builder.chunk(builder.role_piece(state))
            elif gen.echo and gen.logprobs is None:
                for state in states:
                    yield builder.chunk(builder.echo_piece(state, self._echo(state.index // n)[0], None))
            echo_sent = [False] * len(self.streams)
            async for i, delta in self.outputs():
                if gen.echo and gen.logprobs is not None and not echo_sent[i]:
                    # The prompt's logprobs come with its first delta: echo it (and them) first.
                    echo_sent[i] = True
                    echo_text, echo_logprobs = self._echo(i)
                    for state in states[i * n : (i + 1) * n]:
                        yield builder.chunk(builder.echo_piece(state, echo_text, echo_logprobs))
                for c in delta.outputs:
                    state = states[i * n + c.index]
                    if not state.finished:
                        chunk = builder.delta_chunk(state, c)
                        if chunk is not None:
                            yield chunk
            if gen.include_usage:
                prompt_tokens = sum(len(p) for p in gen.prompts)
                cached = sum(f.num_cached_tokens for f in self.finals if f is not None)
                yield builder.usage_chunk(usage(prompt_tokens, sum(self.token_counts), cached))
        except asyncio.CancelledError:
            self.status = 499  # client closed the connection
            raise
        except Exception as exc:
            # Headers are gone already: report the fault in-band, then end the stream properly.
            err = stream_error(exc, self.request_id)
            self.status = err.status
            yield sse.event(err.body())
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
