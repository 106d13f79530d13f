"""GET /openapi.json and GET /docs: the OpenAPI 3.1 document of this server's own routes, built from
routes.py's routing table and protocol.py's request-field table (with the Responses fields that
responses_protocol.py declares into it; nothing is written twice), and the self-contained page that
renders it."""

from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

from .. import __version__
from . import protocol, responses_protocol  # noqa: F401 (responses_protocol declares its fields into the table)

if TYPE_CHECKING:
    from .routes import OpenAIApp

# What each handler answers with (the request side comes from protocol.ROUTE_FIELDS): a description and
# its media types. A handler missing here is documented as answering JSON.
_JSON = ("application/json",)
_JSON_OR_SSE = ("application/json", "text/event-stream")
_ANSWERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "chat_completions": (
        "A chat.completion object; with stream, chat.completion.chunk events.",
        _JSON_OR_SSE,
    ),
    "completions": ("A text_completion object; with stream, text_completion chunk events.", _JSON_OR_SSE),
    "embeddings": ("A list of embedding objects and the usage.", _JSON),
    "list_models": ("A list of model objects.", _JSON),
    "get_model": ("A model object.", _JSON),
    "tokenize": ("{count, max_model_len, tokens[, token_strs]}.", _JSON),
    "detokenize": ("{prompt}: the decoded text.", _JSON),
    "health": ("Empty: the model is loaded and the engine runs.", ("text/plain",)),
    "ping": ("pong", ("text/plain",)),
    "version": ("{version}.", _JSON),
    "metrics_text": ("Prometheus text exposition format.", ("text/plain",)),
    "openapi_json": ("This document.", _JSON),
    "docs": ("An HTML page rendering this document.", ("text/html",)),
    "create_response": ("A response object; with stream, the response.* events.", _JSON_OR_SSE),
    "retrieve_response": ("A stored response object.", _JSON),
    "delete_response": ("{id, object: response, deleted: true}.", _JSON),
    "cancel_response": (
        "The response object (see the route's description for what can be cancelled).",
        _JSON,
    ),
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
    "description": "OpenAI's error envelope; 'param' names the request field at fault.",
}


def body_schema_name(route: str) -> str:
    """'chat_completions' -> 'ChatCompletionsRequest' (the component of its request body)."""
    return "".join(part.capitalize() for part in route.split("_")) + "Request"


def request_body_schema(route: str) -> dict:
    fields = protocol.ROUTE_FIELDS[route]
    schema: dict = {
        "type": "object",
        "properties": {f.name: f.json_schema() for f in fields},
        "additionalProperties": True,  # unknown fields are ignored, as OpenAI's API does
    }
    required = [f.name for f in fields if f.required]
    if required:
        schema["required"] = required
    return schema


def _operation(app: "OpenAIApp", path: str, method: str, handler) -> dict:
    name = handler.__name__
    doc = (handler.__doc__ or "").strip()
    summary, _, description = doc.partition("\n")
    answer, media = _ANSWERS.get(name, ("OK", _JSON))
    op: dict = {
        "operationId": f"{method.lower()}{path.replace('/', '_').replace('.', '_').replace('{', '').replace('}', '')}",
        "summary": summary.strip(),
        "tags": [_tag(path)],
        "responses": {
            "200": {"description": answer, "content": {m: {} for m in media}},
            "default": {
                "description": "An error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
    if description.strip():
        op["description"] = " ".join(line.strip() for line in description.strip().splitlines())
    if method != "GET" and method != "HEAD" and name in protocol.ROUTE_FIELDS:
        op["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{body_schema_name(name)}"}}
            },
        }
    if "{" in path:
        param = path[path.index("{") + 1 : path.index("}")]
        op["parameters"] = [{"name": param, "in": "path", "required": True, "schema": {"type": "string"}}]
    if app.config.api_key is not None and path in app.open_paths:
        op["security"] = []  # answers without the key
    return op


def _tag(path: str) -> str:
    parts = [p for p in path.split("/") if p and p != "v1"]
    return parts[0].partition("{")[0] if parts else "server"


def document(app: "OpenAIApp") -> dict:
    """The OpenAPI 3.1 document of every route in app's routing tables."""
    paths: dict = {}
    for path, methods in {**app.routes, **app.id_routes}.items():
        paths[path] = {m.lower(): _operation(app, path, m, h) for m, h in methods.items()}
    schemas: dict = {"Error": _ERROR}
    for route in protocol.ROUTE_FIELDS:
        schemas[body_schema_name(route)] = request_body_schema(route)
    doc: dict = {
        "openapi": "3.1.0",
        "info": {
            "title": "fast_inference",
            "version": __version__,
            "description": "OpenAI-compatible API of fast_inference, serving "
            + ", ".join(app.config.served_model_names)
            + ". Request fields this server does not know are ignored.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if app.config.api_key is not None:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


@cache
def docs_page() -> bytes:
    """The /docs page: HTML with its own small renderer inline, no external resource."""
    return resources.files(__package__).joinpath("docs.html").read_bytes()
