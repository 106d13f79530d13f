"""Server-sent events in OpenAI's streaming format: `data: {json}\\n\\n` chunks, then `data: [DONE]`.

The hot path (a content delta with no logprobs) splices a JSON-escaped string into pre-encoded bytes,
so a token costs one string escape instead of a dict build plus a full json.dumps.
"""

import json

DONE = b"data: [DONE]\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_escape = json.encoder.encode_basestring  # the C string escaper json.dumps uses


def event(obj: dict) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


class ChunkEncoder:
    """Builds the chunks of one streamed response (chat.completion.chunk or text_completion)."""

    __slots__ = ("chat", "_head", "_prefix", "_key", "_suffix")

    def __init__(self, *, chat: bool, request_id: str, created: int, model: str, fingerprint: str) -> None:
        self.chat = chat
        self._head = {
            "id": request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint,
        }
        head = _dumps(self._head)[:-1]  # without the closing brace
        self._prefix = ("data: " + head + ',"choices":[{"index":').encode()
        self._key = ',"delta":{"content":' if chat else ',"text":'
        self._suffix = ("}" if chat else "").encode() + b',"logprobs":null,"finish_reason":null}]}\n\n'

    def text(self, index: int, text: str) -> bytes:
        """A plain content delta (the per-token hot path)."""
        return self._prefix + f"{index}{self._key}{_escape(text)}".encode() + self._suffix

    def choice(
        self,
        index: int,
        text: str | None,
        *,
        role: bool = False,
        logprobs: dict | None = None,
        finish_reason: str | None = None,
        stop_reason=None,
        fields: dict | None = None,
    ) -> bytes:
        """Any other chunk of one choice: the first (role) chunk, chunks with logprobs, the finishing chunk."""
        if self.chat:
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if fields:
                delta.update(fields)  # reasoning_content, tool_calls, function_call (chat_output.py)
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        if finish_reason is not None and stop_reason is not None:
            choice["stop_reason"] = stop_reason
        return event({**self._head, "choices": [choice]})

    def usage(self, usage: dict) -> bytes:
        return event({**self._head, "choices": [], "usage": usage})


def error_event(body: dict) -> bytes:
    return event(body)
