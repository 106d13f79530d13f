"""GET /openapi.json and /docs: every route and every declared request field is described, the document is
structurally OpenAPI 3.1, the declarations are what the parsers enforce, and the page is self-contained."""

import re

import jsonschema
import pytest

from fast_inference.server import protocol
from fast_inference.server.openapi import body_schema_name

from .conftest import MODEL_NAME, start_server
from .rawhttp import call

_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def doc(server):
    r = call(server.port, "GET", "/openapi.json")
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    return r.json()


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _pointer(doc: dict, ref: str):
    assert ref.startswith("#/"), ref
    node = doc
    for key in ref[2:].split("/"):
        node = node[key]
    return node


def test_every_route_is_documented(server, doc):
    app = server.server.app
    table = {**app.routes, **app.id_routes}
    assert set(doc["paths"]) == set(table)
    for path, methods in table.items():
        assert set(doc["paths"][path]) == {m.lower() for m in methods}, path
        for method in methods:
            op = doc["paths"][path][method.lower()]
            assert op["summary"], (path, method)  # the handler's docstring
            assert "200" in op["responses"]
    # The routes the issue names are among them.
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/tokenize",
                 "/detokenize", "/health", "/metrics", "/version", "/v1/models/{model}", "/v1/responses",
                 "/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel"):  # fmt: skip
        assert path in doc["paths"]


def test_every_declared_field_is_in_its_body_schema(doc):
    schemas = doc["components"]["schemas"]
    for route, fields in protocol.ROUTE_FIELDS.items():
        body = schemas[body_schema_name(route)]
        assert set(body["properties"]) == {f.name for f in fields}, route
        assert set(body.get("required", [])) == {f.name for f in fields if f.required}
        for field in fields:
            prop = body["properties"][field.name]
            assert prop["description"] == field.description
            if field.default is not None:
                assert prop["default"] == field.default
            if field.maximum is not None:
                assert prop["maximum"] == field.maximum
        # Each body is the requestBody of the route's POST operations.
        ops = [
            op
            for methods in doc["paths"].values()
            for op in methods.values()
            if op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            == {"$ref": f"#/components/schemas/{body_schema_name(route)}"}
        ]
        assert ops, route
    chat = schemas["ChatCompletionsRequest"]["properties"]
    assert chat["temperature"]["minimum"] == 0.0 and chat["temperature"]["maximum"] == 2.0
    assert chat["top_p"]["exclusiveMinimum"] == 0.0
    assert schemas["CompletionsRequest"]["properties"]["max_tokens"]["default"] == 16


def test_document_is_structurally_openapi_31(doc):
    """The rules of the OpenAPI 3.1 specification a client generator relies on."""
    assert re.fullmatch(r"3\.1\.\d+", doc["openapi"])
    assert doc["info"]["title"] and doc["info"]["version"]
    assert set(doc) <= {"openapi", "info", "jsonSchemaDialect", "servers", "paths", "webhooks", "components",
                        "security", "tags", "externalDocs"}  # fmt: skip
    operation_ids = []
    for path, item in doc["paths"].items():
        assert path.startswith("/")
        templated = re.findall(r"\{([^}/]+)\}", path)
        for method, op in item.items():
            assert method in _METHODS, method
            operation_ids.append(op["operationId"])
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(templated), path
            for param in op.get("parameters", []):
                assert param["in"] in {"query", "header", "path", "cookie"}
                assert param["in"] != "path" or param["required"] is True
                jsonschema.Draft202012Validator.check_schema(param["schema"])
            assert op["responses"]
            for status, response in op["responses"].items():
                assert status == "default" or re.fullmatch(r"[1-5](\d\d|XX)", status)
                assert isinstance(response["description"], str)
                for media in response.get("content", {}).values():
                    if "schema" in media:
                        jsonschema.Draft202012Validator.check_schema(media["schema"])
            if "requestBody" in op:
                assert op["requestBody"]["content"]
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"
    for name, schema in doc["components"]["schemas"].items():
        assert re.fullmatch(r"[a-zA-Z0-9.\-_]+", name)
        jsonschema.Draft202012Validator.check_schema(schema)
    for ref in _refs(doc):
        _pointer(doc, ref)  # every $ref resolves inside the document


def test_declared_ranges_are_enforced(server):
    """The table is what the parsers read: a value just outside each declared bound is a 400 naming it."""
    bodies = {
        protocol.CHAT: ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        protocol.COMPLETIONS: ("/v1/completions", {"prompt": "hi"}),
    }
    checked = 0
    for route, (path, base) in bodies.items():
        for field in protocol.ROUTE_FIELDS[route]:
            if field.type not in ("number", "integer"):
                continue
            bad = []
            if field.minimum is not None:
                bad.append(field.minimum if field.exclusive_minimum else field.minimum - 1)
            if field.maximum is not None:
                bad.append(field.maximum + 1)
            bad.append("not a number")
            for value in bad:
                r = call(server.port, "POST", path, {**base, "max_tokens": 2, field.name: value})
                assert r.status == 400, (route, field.name, value, r.body)
                assert r.json()["error"]["param"] == field.name, (route, field.name, r.body)
                checked += 1
    assert checked > 30


def test_docs_page_renders_the_document_offline(server):
    r = call(server.port, "GET", "/docs")
    assert r.status == 200 and r.headers["content-type"].startswith("text/html")
    page = r.body.decode()
    assert "/openapi.json" in page and "<script>" in page
    # Nothing loaded from elsewhere: no src/href to another origin, no imports.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "import(" not in page and "@import" not in page


def test_docs_are_open_behind_an_api_key(model_dir):
    thread = start_server(model_dir, api_key="sk-test")
    try:
        assert call(thread.port, "GET", "/v1/models").status == 401
        r = call(thread.port, "GET", "/openapi.json")
        assert r.status == 200
        doc = r.json()
        assert doc["security"] == [{"bearer": []}]
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert doc["paths"]["/health"]["get"]["security"] == []
        assert "security" not in doc["paths"]["/v1/chat/completions"]["post"]
        assert call(thread.port, "GET", "/docs").status == 200
        models = call(thread.port, "GET", "/v1/models", headers={"Authorization": "Bearer sk-test"})
        assert models.json()["data"][0]["id"] == MODEL_NAME
    finally:
        thread.stop()
