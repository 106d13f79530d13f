"""Server-sent events framing of OpenAI streams: `data: {json}\\n\\n` events, then `data: [DONE]` (the chunk
shapes are response_builder.py's)."""

import json

DONE = b"data: [DONE]\n\n"
dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
escape = json.encoder.encode_basestring  # the C string escaper json.dumps uses


def event(obj: dict) -> bytes:
    return b"data: " + dumps(obj).encode() + b"\n\n"
