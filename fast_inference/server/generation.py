"""/v1/chat/completions and /v1/completions: parse, admit, add to the engine, then one GenerationJob per
request reads the engine's deltas and answers (a JSON body, or SSE chunks as the deltas come)."""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..engine.async_engine import EngineDeadError, RequestStream
from ..engine.intake import InvalidRequestError
from ..engine.outputs import CompletionOutput, RequestOutput
from . import protocol, sse
from .errors import APIError, invalid
from .http import Request, Response, StreamingResponse

if TYPE_CHECKING:
    from .routes import OpenAIApp

logger = logging.getLogger("fast_inference.server")


async def generate(app: "OpenAIApp", request: Request, chat: bool) -> Response | StreamingResponse:
    arrival = time.perf_counter()
    body = app.json_body(request)
    protocol.check_model(body, app.config.served_model_names)
    app.require_ready()
    if not app.engine.supports_generation:
        raise invalid(
            f"The model '{app.config.served_model_names[0]}' is an embedding model and does "
            "not support generation; use /v1/embeddings",
            "model",
        )
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
            param = ("messages" if chat else "prompt") if exc.param == "prompt" else exc.param
            raise APIError(400, str(exc), param=param, code=exc.code) from None
        raise
    job = GenerationJob(app, gen, request_id, streams, arrival)
    if gen.stream:
        return StreamingResponse(200, job.stream(), on_close=job.close)
    try:
        response = app.json_response(await job.collect())
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
                    logprobs = self._logprobs(c, 0)
                    message = {"role": "assistant", "content": c.text, "refusal": None}
                    if gen.output is not None:  # reasoning / tool calls split out of the text
                        parser = gen.output.new_choice()
                        message.update(parser.message(c.text))
                        reason = parser.finish_reason(reason)
                    choices.append(
                        {
                            "index": index,
                            "message": message,
                            "logprobs": logprobs,
                            "finish_reason": reason,
                            "stop_reason": c.stop_reason,
                        }
                    )
                else:
                    prefix = self._echo_text(i) if gen.echo else ""
                    logprobs = self._logprobs(c, len(prefix))
                    if logprobs is not None and gen.echo:
                        logprobs = protocol.join_logprobs(self._echo_logprobs(i), logprobs)
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
            "system_fingerprint": app.fingerprint,
            "choices": choices,
            "usage": protocol.usage(prompt_tokens, self.completion_tokens, cached),
        }

    def _token_text(self, token_id: int) -> str:
        return self.app.tokenizers.tokenizer.decode([token_id])

    def _logprobs(self, c: CompletionOutput, text_offset: int) -> dict | None:
        """The logprobs field of one choice, for a whole body and for a stream chunk alike: chat's
        content list, or completions' arrays with text offsets counted from text_offset."""
        if self.gen.logprobs is None:
            return None
        if self.gen.chat:
            return {"content": protocol.chat_logprobs(c, self.gen.logprobs), "refusal": None}
        return protocol.completion_logprobs(c, self.gen.logprobs, text_offset)

    def _echo_logprobs(self, i: int) -> dict:
        """echo + logprobs: the logprobs of prompt i's tokens (the first None), from its prompt logprobs."""
        return protocol.prompt_completion_logprobs(self.finals[i], self.gen.logprobs, self._token_text)

    def _echo_text(self, i: int) -> str:
        text = self.gen.prompt_texts[i]
        return text if text is not None else self.app.tokenizers.tokenizer.decode(self.gen.prompts[i])

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
            fingerprint=app.fingerprint,
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
            parsers = [gen.output.new_choice() for _ in range(total)] if gen.output is not None else None
            async for i, delta in self._outputs():
                if gen.echo and gen.logprobs is not None and not echo_sent[i]:
                    # The prompt's logprobs come with its first delta: echo it (and them) first.
                    echo_sent[i] = True
                    echo = self._echo_text(i)
                    prompt_lps = self._echo_logprobs(i)
                    for k in range(i * n, (i + 1) * n):
                        text_offsets[k] = len(echo)
                        yield enc.choice(k, echo, logprobs=prompt_lps)
                for c in delta.outputs:
                    k = i * n + c.index
                    if done[k]:
                        continue
                    reason = protocol.finish_reason(c.finish_reason)
                    logprobs = self._logprobs(c, text_offsets[k]) if c.token_ids else None
                    if logprobs is not None and not gen.chat:
                        text_offsets[k] += sum(len(t) for t in logprobs["tokens"])
                    if parsers is not None:
                        if reason is not None:
                            done[k] = True
                        for chunk in self._parsed_chunks(enc, k, parsers[k], c, reason, logprobs):
                            yield chunk
                        continue
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

    @staticmethod
    def _parsed_chunks(enc, k: int, parser, c: CompletionOutput, reason: str | None, logprobs) -> list[bytes]:
        """One delta of a parsed chat choice -> its chunks: content, reasoning_content and tool-call pieces
        in order, the logprobs on the first chunk and the finish reason on the last."""
        pieces = parser.feed(c.text)
        if reason is not None:
            pieces += parser.finish()
            reason = parser.finish_reason(reason)
        if not pieces and (logprobs is not None or reason is not None):
            pieces = [{}]
        chunks = []
        for j, fields in enumerate(pieces):
            last = j == len(pieces) - 1
            finishing = last and reason is not None
            if j == 0 and logprobs is not None or finishing:
                chunks.append(
                    enc.choice(
                        k,
                        None,
                        logprobs=logprobs if j == 0 else None,
                        finish_reason=reason if last else None,
                        stop_reason=c.stop_reason if last else None,
                        fields=fields,
                    )
                )
            elif list(fields) == ["content"]:
                chunks.append(enc.text(k, fields["content"]))
            else:
                chunks.append(enc.choice(k, None, fields=fields))
        return chunks

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
