"""Incremental detokenization: UTF-8 safe, SentencePiece spaces kept, concatenated deltas == final decode."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fast_inference.engine.detokenizer import decode_new_text, find_stop, flush_text, held_back, init_offsets
from fast_inference.engine.outputs import RequestMetrics
from fast_inference.engine.sampling_params import SamplingParams
from fast_inference.engine.sequence import Request, Sequence
from fast_inference.models.demo import build_tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "Émile visited Zürich and São Paulo; naïve café déjà vu — “quotes”",
    "你好，世界。 こんにちは 🙂 and 🙂🙂 again",
    "  leading spaces and\nnew lines\n\n  indented",
]


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A Metaspace (SentencePiece-style '▁' spaces) BPE tokenizer: decoding a token alone drops its space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator(TEXTS * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def _stream(tokenizer, prompt_ids, output_ids):
    req = Request("r", None, list(prompt_ids), SamplingParams(), RequestMetrics(0.0))
    seq = Sequence(
        seq_id=0,
        request=req,
        index=0,
        token_ids=list(prompt_ids),
        num_prompt_tokens=len(prompt_ids),
        seed=0,
        max_tokens=10**6,
    )
    init_offsets(seq)
    deltas = []
    for t in output_ids:
        seq.token_ids.append(t)
        deltas.append(decode_new_text(tokenizer, seq, True))
    deltas.append(flush_text(tokenizer, seq, True))
    return deltas


@pytest.mark.parametrize("tok_name", ["byte_bpe", "sentencepiece_like"])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_final_decode(request, tok_name, text):
    tok = request.getfixturevalue(tok_name)
    prompt = tok.encode("Say:", add_special_tokens=False)
    ids = tok.encode(" " + text, add_special_tokens=False)
    deltas = _stream(tok, prompt, ids)
    final = tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    assert "".join(deltas) == final
    assert all("\ufffd" not in d for d in deltas)


def test_byte_level_never_emits_half_a_character(byte_bpe):
    # One token per byte of multi-byte characters: nothing shows until a character is whole.
    text = "é🙂你"
    byte_token = _gpt2_byte_to_unicode()
    ids = [byte_bpe.convert_tokens_to_ids(byte_token[b]) for b in text.encode()]
    deltas = _stream(byte_bpe, byte_bpe.encode("A", add_special_tokens=False), ids)
    assert "".join(deltas) == text
    assert [d for d in deltas if d] == ["é", "🙂", "你"]


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (each byte is a base token)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def test_stop_string_helpers():
    assert find_stop("abc STOP def", 0, ["STOP"]) == (4, "STOP")
    assert find_stop("abc STOP def STO", 9, ["STOP"]) is None  # before `start`, already checked
    assert find_stop("xxab", 2, ["ab", "xa"]) == (1, "xa")
    assert held_back("hello ST", ["STOP"]) == 2
    assert held_back("hello", ["STOP"]) == 0
    assert held_back("abab", ["abac", "b"]) == 2
