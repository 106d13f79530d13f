"""/v1/responses: create (a response object, or the response.* event stream), retrieve, delete and cancel.
Requests are parsed by responses_protocol.py (the RESPONSES fields of protocol.py's table), generated on
chat's engine path (generation.start_job and GenerationJob), and kept in the bounded store of
response_store.py."""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..engine.async_engine import EngineDeadError
from . import protocol, responses_protocol
from .errors import APIError, invalid, unsupported
from .generation import GenerationJob, json_answer, require_generation, start_job, stream_error
from .http import Request, Response, StreamingResponse
from .response_store import StoredResponse

if TYPE_CHECKING:
    from .routes import OpenAIApp

logger = logging.getLogger("fast_inference.server")

RESPONSE_PATH = "/v1/responses/{response_id}"
CANCEL_PATH = "/v1/responses/{response_id}/cancel"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _where_stored(app: "OpenAIApp") -> str:
    """With several API server processes each keeps its own store: say so in the 404s."""
    if app.config.api_server_index is None:
        return ""
    return (
        f" on this API server process (#{app.config.api_server_index}; with --api-server-count > 1 each "
        "process has its own response store)"
    )


def _not_found(app: "OpenAIApp", response_id: str) -> APIError:
    return APIError(
        404,
        f"No response with id '{response_id}' is stored{_where_stored(app)}",
        param="response_id",
        code="not_found",
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
                f"Previous response with id '{previous_id}' not found (never stored, deleted or evicted)"
                + _where_stored(app),
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if previous.body["status"] == "in_progress":
            raise invalid(f"Previous response '{previous_id}' is still in progress", "previous_response_id")
        history = previous.history
    if fields["background"]:
        if not fields["store"]:
            raise invalid("'background' needs 'store' (the result is fetched with GET)", "background")
        if fields["stream"]:
            raise unsupported("background", "Streaming a background response")
    config = app.config
    gen = await app.tokenizers.run(
        request,
        lambda tokenizer: responses_protocol.parse_response(
            fields,
            history,
            model,
            tokenizer,
            config.chat_template,
            tool_call_parser=config.tool_call_parser,
            reasoning_parser=config.reasoning_parser,
        ),
    )
    response_id = "resp_" + uuid.uuid4().hex
    job = await start_job(app, gen, response_id, arrival, "input")
    run = ResponseRun(app, job, fields, history)
    if fields["background"]:
        task = asyncio.ensure_future(run.in_background())
        app.background_runs.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(app.background_runs.discard)
        return app.json_response(run.snapshot("in_progress", []))
    if gen.stream:
        return StreamingResponse(200, run.events(), on_close=run.close)
    return await json_answer(app, job, run)


async def retrieve_response(app: "OpenAIApp", response_id: str) -> Response:
    entry = app.responses.get(response_id)
    if entry is None:
        raise _not_found(app, response_id)
    return app.json_response(entry.body)


async def delete_response(app: "OpenAIApp", response_id: str) -> Response:
    entry = app.responses.get(response_id)
    if entry is None:
        raise _not_found(app, response_id)
    if entry.cancel is not None:
        entry.cancel()  # deleting a response that is being generated stops it
    app.responses.delete(response_id)
    return app.json_response({"id": response_id, "object": "response", "deleted": True})


async def cancel_response(app: "OpenAIApp", response_id: str) -> Response:
    entry = app.responses.get(response_id)
    if entry is None:
        raise _not_found(app, response_id)
    if entry.cancel is not None:
        entry.cancel()  # stores the final (cancelled) object; the run answers its own client with it
        entry = app.responses.get(response_id) or entry
    return app.json_response(entry.body)


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class OutputItems:
    """A response's output items folded from its choice's deltas in chat's shape ({"content": text},
    {"reasoning_content": text} and {"tool_calls": [piece]}, a call's first piece carrying its id and
    name): one message item per run of text, one reasoning item per run of thinking, one function_call
    item per call. The same fold gives the stream's events (through `emit`) and
    the final object's output, so the two cannot disagree. `emit` encodes an event when it is called, so
    what an item becomes later does not reach the events sent before."""

    def __init__(self, emit) -> None:
        self.items: list[dict] = []
        self._emit = emit  # (event type, fields) -> None
        self._open: dict | None = None
        self._calls: dict[int, dict] = {}  # the tool call's index in the choice -> its item

    def add(self, delta: dict) -> None:
        if delta.get("reasoning_content"):
            self._reasoning(delta["reasoning_content"])
        if delta.get("content"):
            self._text(delta["content"])
        for piece in delta.get("tool_calls") or ():
            self._call(piece)

    def finish(self, status: str) -> None:
        """Close the open item with `status` (completed / incomplete); a response without items gets an
        empty message, as one that said nothing."""
        if not self.items:
            self._start_message()
        self._close(status)

    def _start(self, item: dict) -> dict:
        self._close("completed")
        self.items.append(item)
        self._open = item
        self._emit(
            "response.output_item.added",
            output_index=len(self.items) - 1,
            item=dict(item, content=[]) if "content" in item else item,
        )
        return item

    def _start_message(self) -> dict:
        item = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "status": "in_progress",
                "content": [_text_part("")]}  # fmt: skip
        self._start(item)
        self._emit("response.content_part.added", **self._where(item), content_index=0, part=_text_part(""))
        return item

    def _text(self, text: str) -> None:
        item = self._open
        if item is None or item["type"] != "message":
            item = self._start_message()
        item["content"][0]["text"] += text
        self._emit(
            "response.output_text.delta", **self._where(item), content_index=0, delta=text, logprobs=[]
        )

    def _reasoning(self, text: str) -> None:
        item = self._open
        if item is None or item["type"] != "reasoning":
            item = {"id": "rs_" + uuid.uuid4().hex, "type": "reasoning", "summary": [], "status": "in_progress",
                    "content": [{"type": "reasoning_text", "text": ""}]}  # fmt: skip
            self._start(item)
        item["content"][0]["text"] += text
        self._emit("response.reasoning_text.delta", **self._where(item), content_index=0, delta=text)

    def _call(self, piece: dict) -> None:
        function = piece.get("function") or {}
        item = self._calls.get(piece["index"])
        if item is not None and item is not self._open:
            # The tool-call parsers finish a call before the next one starts; an item once done stays done.
            raise ValueError(f"tool call {piece['index']} continued after another output item started")
        if item is None:
            item = {"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "call_id": piece["id"],
                    "name": function["name"], "arguments": "", "status": "in_progress"}  # fmt: skip
            self._calls[piece["index"]] = self._start(item)
        if function.get("arguments"):
            item["arguments"] += function["arguments"]
            self._emit(
                "response.function_call_arguments.delta", **self._where(item), delta=function["arguments"]
            )

    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.items.index(item)}

    def _close(self, status: str) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        item["status"] = status
        where = self._where(item)
        if item["type"] == "message":
            part = item["content"][0]
            self._emit("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[])
            self._emit("response.content_part.done", **where, content_index=0, part=part)
        elif item["type"] == "reasoning":
            text = item["content"][0]["text"]
            self._emit("response.reasoning_text.done", **where, content_index=0, text=text)
        else:
            self._emit(
                "response.function_call_arguments.done",
                **where,
                name=item["name"],
                arguments=item["arguments"],
            )
        self._emit("response.output_item.done", output_index=where["output_index"], item=item)


class ResponseRun:
    """One response being generated: folds the engine's outputs into its output items, answers with the
    object or the event stream, and keeps its store entry current (in progress, then final)."""

    def __init__(self, app: "OpenAIApp", job: GenerationJob, fields: dict, history: list[dict]) -> None:
        self.app = app
        self.job = job
        self.fields = fields
        self.history = history
        self.id = job.request_id
        self.created_at = int(time.time())
        self.sequence_number = 0
        self.pending: list[bytes] | None = None  # streaming: the encoded events not yet sent
        self.output = OutputItems(self._event)
        # Tools or a reasoning parser: chat's choice parser splits the text into thinking, text and calls.
        self.parser = job.gen.output.new_choice() if job.gen.output is not None else None
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
            "background": fields["background"],
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
            "tools": [
                {"description": None, "parameters": None, "strict": None, **tool}
                for tool in fields["tools"] or []
            ],
            "top_p": fields["top_p"],
            "truncation": fields["truncation"],
            "metadata": fields["metadata"] or {},
        } | ({} if usage is None else {"usage": usage})  # the schema has no null usage: absent until known

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

    def _feed(self, delta) -> None:
        for c in delta.outputs:
            if not c.text:
                continue
            if self.parser is None:
                self.output.add({"content": c.text})
            else:
                for piece in self.parser.feed(c.text):
                    self.output.add(piece)

    def _finish(self, error: APIError | None = None) -> dict:
        """The final object (once): the open item closed, the status from how the engine ended; stored
        with the conversation (history + input + this output) when asked."""
        if self.final is not None:
            return self.final
        final = self.job.finals[0]
        reason = final.outputs[0].finish_reason if final is not None and final.outputs else None
        extra: dict = {}
        if error is not None:
            status = "failed"
            extra["error"] = {"code": "server_error", "message": error.message}
        elif self.cancelled:
            status = "cancelled"
        elif reason == "length":
            status = "incomplete"
            extra["incomplete_details"] = {"reason": "max_output_tokens"}
        elif reason is None or reason == "abort":
            status = "failed"
            extra["error"] = {"code": "server_error", "message": "The request was aborted by the server"}
        else:
            status = "completed"
        if self.parser is not None:
            for piece in self.parser.finish():  # what the parser held back (a partial marker, a call)
                self.output.add(piece)
        self.output.finish("completed" if status == "completed" else "incomplete")
        self.final = self.snapshot(status, self.output.items, self._usage(), **extra)
        if self.fields["store"]:
            # The output items are input items too: the next turn reads them like any input.
            conversation = [
                *self.history,
                *self.fields["input"],
                *responses_protocol.response_input(self.output.items),
            ]
            if not self.app.responses.put(self.id, StoredResponse(self.final, conversation)):
                logger.warning("%s is larger than the whole response store; not stored", self.id)
        kind = {"completed": "response.completed", "failed": "response.failed"}.get(
            status, "response.incomplete"
        )
        self._event(kind, response=self.final)
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

    # -- the three answers -------------------------------------------------------------------------------
    async def in_background(self) -> None:
        """background: generate with no client waiting; the result is the stored entry."""
        try:
            await self.collect()
        except APIError:
            pass  # collect settled the failed object
        except Exception:
            logger.exception("background response %s failed", self.id)
            self.job.status = 500
            self._finish(APIError(500, "Internal server error"))
        finally:
            self.close()

    async def collect(self) -> dict:
        try:
            async for _, delta in self.job.outputs():
                if self.final is not None:
                    break  # cancelled: the final object is settled
                self._feed(delta)
        except EngineDeadError as exc:
            err = APIError(503, str(exc), code="engine_unavailable")
            self._finish(err)
            raise err from None
        return self._finish()

    def _event(self, kind: str, **fields) -> None:
        if self.pending is None:
            return  # not streaming: only the final object is answered
        obj = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        self.pending.append(f"event: {kind}\ndata: {_dumps(obj)}\n\n".encode())

    async def events(self) -> AsyncIterator[bytes]:
        """response.created, response.in_progress, then per output item: output_item.added,
        content_part.added, output_text.delta..., output_text.done, content_part.done, output_item.done
        (a call: output_item.added, function_call_arguments.delta..., .done, output_item.done), then
        response.completed; response.incomplete for a length cut and for a cancelled response (status
        "cancelled": the stream has no event of its own for it); response.failed for a fault."""
        self.pending = []
        started = self.snapshot("in_progress", [])
        self._event("response.created", response=started)
        self._event("response.in_progress", response=started)
        error = None
        try:
            async for _, delta in self.job.outputs():
                if self.final is not None:
                    break  # cancelled: the final object already holds the text up to here
                self._feed(delta)
                if self.pending:
                    # Swapped before the yield: a cancel() while the send waits adds to the new list.
                    chunk, self.pending = b"".join(self.pending), []
                    yield chunk
        except asyncio.CancelledError:
            self.job.status = 499  # client closed the connection
            raise
        except Exception as exc:
            error = stream_error(exc, self.id)
            self.job.status = error.status
        self._finish(error)
        chunk, self.pending = b"".join(self.pending), []
        yield chunk
