"""/v1/responses: create (a response object, or the response.* event stream), retrieve, delete and cancel.
Requests are parsed by protocol.py (its RESPONSES fields), generated on chat's engine path
(generation.start_job and GenerationJob), and kept in the bounded store of response_store.py."""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..engine.async_engine import EngineDeadError
from . import protocol
from .errors import APIError, invalid
from .generation import GenerationJob, require_generation, start_job
from .http import Request, Response, StreamingResponse
from .response_store import StoredResponse

if TYPE_CHECKING:
    from .routes import OpenAIApp

logger = logging.getLogger("fast_inference.server")

RESPONSE_PATH = "/v1/responses/{response_id}"
CANCEL_PATH = "/v1/responses/{response_id}/cancel"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _not_found(response_id: str) -> APIError:
    return APIError(
        404, f"No response with id '{response_id}' is stored", param="response_id", code="not_found"
    )


async def create_response(app: "OpenAIApp", request: Request) -> Response | StreamingResponse:
    arrival = time.perf_counter()
    body = app.json_body(request)
    model = protocol.check_model(body, app.config.served_model_names)
    require_generation(app)
    fields = protocol.read_fields(body, protocol.RESPONSES)
    history: list[dict] = []
    previous_id = fields["previous_response_id"]
    if previous_id is not None:
        previous = app.responses.get(previous_id)
        if previous is None:
            raise APIError(
                404,
                f"Previous response with id '{previous_id}' not found (never stored, deleted or evicted)",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if previous.body["status"] in ("in_progress", "queued"):
            raise invalid(f"Previous response '{previous_id}' is still in progress", "previous_response_id")
        history = previous.history
    config = app.config
    gen = await app.tokenizers.run(
        request,
        lambda tokenizer: protocol.parse_response(fields, history, model, tokenizer, config.chat_template),
    )
    response_id = "resp_" + uuid.uuid4().hex
    job = await start_job(app, gen, response_id, arrival, "input")
    run = ResponseRun(app, job, fields, history)
    if gen.stream:
        return StreamingResponse(200, run.events(), on_close=run.close)
    try:
        response = app.json_response(await run.collect())
        response.logged_by_job = True
        return response
    except asyncio.CancelledError:
        job.status = 499  # the client went away: close() aborts the engine request
        raise
    except APIError as err:
        job.status = err.status
        raise
    finally:
        run.close()


async def retrieve_response(app: "OpenAIApp", request: Request) -> Response:
    response_id = _path_id(request, RESPONSE_PATH)
    entry = app.responses.get(response_id)
    if entry is None:
        raise _not_found(response_id)
    return app.json_response(entry.body)


async def delete_response(app: "OpenAIApp", request: Request) -> Response:
    response_id = _path_id(request, RESPONSE_PATH)
    entry = app.responses.get(response_id)
    if entry is None:
        raise _not_found(response_id)
    if entry.cancel is not None:
        entry.cancel()  # deleting a response that is being generated stops it
    app.responses.delete(response_id)
    return app.json_response({"id": response_id, "object": "response", "deleted": True})


async def cancel_response(app: "OpenAIApp", request: Request) -> Response:
    response_id = _path_id(request, CANCEL_PATH)
    entry = app.responses.get(response_id)
    if entry is None:
        raise _not_found(response_id)
    if entry.cancel is not None:
        entry.cancel()  # stores the final (cancelled) object; the run answers its own client with it
        entry = app.responses.get(response_id) or entry
    return app.json_response(entry.body)


def _path_id(request: Request, template: str) -> str:
    from .routes import path_id  # routes imports this module

    return path_id(request, template)


class ResponseRun:
    """One response being generated: folds the engine's outputs into the output items, answers with the
    object or the event stream, and keeps its store entry current (in progress, then final)."""

    def __init__(self, app: "OpenAIApp", job: GenerationJob, fields: dict, history: list[dict]) -> None:
        self.app = app
        self.job = job
        self.fields = fields
        self.history = history
        self.id = job.request_id
        self.message_id = "msg_" + uuid.uuid4().hex
        self.created_at = int(time.time())
        self.sequence_number = 0
        self.cancelled = False
        self.final: dict | None = None
        if fields["store"]:
            app.responses.put(self.id, StoredResponse(self.snapshot("in_progress", []), [], self.cancel))

    # -- the objects ---------------------------------------------------------------------------------
    def snapshot(self, status: str, output: list[dict], usage: dict | None = None, **extra) -> dict:
        fields = self.fields
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": extra.get("error"),
            "incomplete_details": extra.get("incomplete_details"),
            "instructions": fields["instructions"],
            "max_output_tokens": fields["max_output_tokens"],
            "model": self.job.gen.model,
            "output": output,
            "parallel_tool_calls": fields["parallel_tool_calls"],
            "previous_response_id": fields["previous_response_id"],
            "reasoning": None,
            "store": fields["store"],
            "temperature": fields["temperature"],
            "text": fields["text"] or {"format": {"type": "text"}},
            "tool_choice": fields["tool_choice"] or "auto",
            "tools": [],
            "top_p": fields["top_p"],
            "truncation": fields["truncation"],
            "metadata": fields["metadata"] or {},
        } | ({} if usage is None else {"usage": usage})  # the schema has no null usage: absent until known

    def _message(self, text: str | None, status: str) -> dict:
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [] if status == "in_progress" and text is None else [self._text_part(text or "")],
        }

    @staticmethod
    def _text_part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _usage(self) -> dict:
        job = self.job
        final = job.finals[0]
        input_tokens = len(job.gen.prompts[0])
        output_tokens = sum(job.token_counts)
        return {
            "input_tokens": input_tokens,
            # The automatic prefix cache only reads; this server has no explicit cache writes.
            "input_tokens_details": {
                "cached_tokens": final.num_cached_tokens if final is not None else 0,
                "cache_write_tokens": 0,
            },
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }

    def _finish(self, error: APIError | None = None) -> dict:
        """The final object from what the engine returned (once); stored with the conversation when asked."""
        if self.final is not None:
            return self.final
        final = self.job.finals[0]
        output = final.outputs[0] if final is not None and final.outputs else None
        text = output.text if output is not None else ""
        reason = output.finish_reason if output is not None else None
        extra: dict = {}
        if error is not None:
            status, item_status = "failed", "incomplete"
            extra["error"] = {"code": "server_error", "message": error.message}
        elif self.cancelled:
            status, item_status = "cancelled", "incomplete"
        elif reason == "length":
            status, item_status = "incomplete", "incomplete"
            extra["incomplete_details"] = {"reason": "max_output_tokens"}
        elif reason is None or reason == "abort":
            status, item_status = "failed", "incomplete"
            extra["error"] = {"code": "server_error", "message": "The request was aborted by the server"}
        else:
            status, item_status = "completed", "completed"
        items = [self._message(text, item_status)]
        self.final = self.snapshot(status, items, self._usage(), **extra)
        if self.fields["store"]:
            conversation = [*self.history, *self.fields["input"], {"role": "assistant", "content": text}]
            if not self.app.responses.put(self.id, StoredResponse(self.final, conversation)):
                logger.warning("%s is larger than the whole response store; not stored", self.id)
        return self.final

    # -- cancel and clean-up ---------------------------------------------------------------------------
    def cancel(self) -> None:
        """POST .../cancel or DELETE while generating: stop the engine request and settle the final object
        now, from what was generated so far (the run's own answer is that object too)."""
        if self.final is None:
            self.cancelled = True
            for stream in self.job.streams:
                stream.abort()
            self._finish()

    def close(self) -> None:
        if self.final is None and self.fields["store"]:
            # Ended before its final object (client gone): the stored entry must not stay in progress.
            self.cancelled = True
            self._finish()
        self.job.close()

    # -- the two answers ---------------------------------------------------------------------------------
    async def collect(self) -> dict:
        try:
            async for _ in self.job.outputs():
                pass
        except EngineDeadError as exc:
            err = APIError(503, str(exc), code="engine_unavailable")
            self._finish(err)
            raise err from None
        return self._finish()

    def _event(self, kind: str, **fields) -> bytes:
        obj = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {_dumps(obj)}\n\n".encode()

    async def events(self) -> AsyncIterator[bytes]:
        """response.created, .in_progress, .output_item.added, .content_part.added, .output_text.delta...,
        .output_text.done, .content_part.done, .output_item.done, then the end: response.completed;
        response.incomplete for a length cut and for a cancelled response (status "cancelled"; the
        stream has no event of its own for it); response.failed (no done events) for a fault."""
        item = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        started = self.snapshot("in_progress", [])
        try:
            yield self._event("response.created", response=started)
            yield self._event("response.in_progress", response=started)
            yield self._event(
                "response.output_item.added", output_index=0, item=self._message(None, "in_progress")
            )
            yield self._event("response.content_part.added", **item, part=self._text_part(""))
            async for _, delta in self.job.outputs():
                if self.final is not None:
                    break  # cancelled: the final object already holds the text up to here
                for c in delta.outputs:
                    if c.text:
                        yield self._event("response.output_text.delta", **item, delta=c.text, logprobs=[])
            error = None
        except asyncio.CancelledError:
            self.job.status = 499  # client closed the connection
            raise
        except Exception as exc:
            if isinstance(exc, APIError):
                error = exc
            elif isinstance(exc, EngineDeadError):
                error = APIError(503, str(exc), code="engine_unavailable")
            else:
                logger.exception("stream %s failed", self.id)
                error = APIError(500, "Internal server error during streaming")
            self.job.status = error.status
        final = self._finish(error)
        message = final["output"][0]
        text = message["content"][0]["text"]
        if final["status"] != "failed":
            yield self._event("response.output_text.done", **item, text=text, logprobs=[])
            yield self._event("response.content_part.done", **item, part=message["content"][0])
            yield self._event("response.output_item.done", output_index=0, item=message)
        kind = {"completed": "response.completed", "failed": "response.failed"}.get(
            final["status"], "response.incomplete"
        )
        yield self._event(kind, response=final)
