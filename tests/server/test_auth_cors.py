"""API-key auth (Bearer, constant-time) and CORS (allowed origins, preflight)."""

import openai
import pytest

from .conftest import MODEL_NAME, start_server
from .rawhttp import call

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def secured(model_dir):
    thread = start_server(model_dir, api_key=KEY, allowed_origins=["https://app.example"])
    yield thread
    thread.stop()


def test_api_key(secured, schemas):
    port = secured.port
    missing = call(port, "GET", "/v1/models")
    assert missing.status == 401
    schemas.validate("ErrorResponse", missing.json())
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert call(port, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"}).status == 401
    assert call(port, "GET", "/v1/models", headers={"Authorization": f"Basic {KEY}"}).status == 401
    assert call(port, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status == 200
    assert call(port, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "x"}).status == 401
    # open routes
    assert call(port, "GET", "/health").status == 200
    assert call(port, "GET", "/ping").status == 200
    assert call(port, "GET", "/metrics").status == 401
    good = openai.OpenAI(base_url=secured.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=secured.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_cors(secured):
    port = secured.port
    origin = {"Origin": "https://app.example"}
    pre = call(
        port,
        "OPTIONS",
        "/v1/chat/completions",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert pre.status == 204
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"]
    # actual requests carry the header, errors included
    ok = call(port, "GET", "/v1/models", headers={**origin, "Authorization": f"Bearer {KEY}"})
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    denied = call(port, "GET", "/v1/models", headers=origin)
    assert denied.status == 401 and denied.headers["access-control-allow-origin"] == "https://app.example"
    # a foreign origin gets no CORS grant
    evil = {"Origin": "https://evil.example"}
    assert "access-control-allow-origin" not in call(port, "GET", "/health", headers=evil).headers
    bad_pre = call(port, "OPTIONS", "/v1/models", headers={**evil, "Access-Control-Request-Method": "GET"})
    assert bad_pre.status == 403 and "access-control-allow-origin" not in bad_pre.headers


def test_no_cors_by_default(server):
    r = call(server.port, "GET", "/health", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers
