"""Tests of apply_token_bitmask (grammar-constrained decoding) against the reference, on every CPU ISA and CUDA."""

import pytest
import torch

from fast_inference import ops
from fast_inference.ops import reference as ref

ISAS = ["portable", "avx2", "avx512"]


def random_bitmask(batch: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """int32 [batch, ceil(vocab / 32)] mixing the word kinds a grammar produces: all zero, all ones, sparse."""
    words = (vocab + 31) // 32
    bits = torch.randint(0, 2**32, (batch, words), generator=gen, dtype=torch.int64)
    kind = torch.randint(0, 4, (batch, words), generator=gen)
    bits = torch.where(kind == 0, torch.zeros_like(bits), bits)
    bits = torch.where(kind == 1, torch.full_like(bits, 2**32 - 1), bits)
    bits = torch.where(kind == 2, bits & (1 << torch.randint(0, 32, bits.shape, generator=gen)), bits)
    return as_int32_words(bits)


def as_int32_words(bits: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> the int32 words with the same bit patterns."""
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 1000, 49152, 151936])
def test_matches_reference_cpu(monkeypatch, isa, dtype, vocab):
    monkeypatch.setenv("FI_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen).to(dtype)
    bitmask = random_bitmask(5, vocab, gen)
    expected = logits.clone()
    ref.apply_token_bitmask(expected, bitmask)
    ops.apply_token_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)
    # the masked entries are exactly the cleared bits: nothing else changed
    assert ((logits == float("-inf")) == (expected == float("-inf"))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(3)
    vocab = 5003
    logits = torch.randn(7, vocab, generator=gen).to(dtype)
    bitmask = random_bitmask(7, vocab, gen)
    indices = torch.tensor([5, 0, 3], dtype=torch.int32)
    expected = logits.clone()
    ref.apply_token_bitmask(expected, bitmask, indices)
    out = logits.to(device)
    ops.apply_token_bitmask(out, bitmask.to(device), indices.to(device))
    assert torch.equal(out.cpu(), expected)
    untouched = [1, 2, 4, 6]
    assert torch.equal(out.cpu()[untouched], logits[untouched])
    all_rows = logits.to(device)
    ops.apply_token_bitmask(all_rows, bitmask.to(device))
    expected_all = logits.clone()
    ref.apply_token_bitmask(expected_all, bitmask)
    assert torch.equal(all_rows.cpu(), expected_all)


def test_strided_rows_and_bits_past_the_vocabulary(device):
    # A [B, V] slice of a wider buffer (row stride > V) and a last word whose bits past V are all clear.
    buffer = torch.zeros(3, 80, device=device)
    logits = buffer[:, :40]
    bitmask = torch.tensor([[-1, 0xFF], [0, 0], [-1, -1]], dtype=torch.int32, device=device)
    ops.apply_token_bitmask(logits, bitmask)
    out = buffer.cpu()
    assert (out[0, :40] == 0).all()
    assert (out[1, :40] == float("-inf")).all()
    assert (out[2, :40] == 0).all()
    assert (out[:, 40:] == 0).all()  # past the view: never written


def test_sampling_after_the_mask_picks_an_allowed_token(device):
    gen = torch.Generator().manual_seed(9)
    vocab = 1000
    logits = torch.randn(4, vocab, generator=gen).to(device)
    allowed = [[7], [31, 32, 999], [0, 500], list(range(900, 1000))]
    bitmask = torch.zeros(4, (vocab + 31) // 32, dtype=torch.int64)
    for b, ids in enumerate(allowed):
        for t in ids:
            bitmask[b, t // 32] |= 1 << (t % 32)
    bitmask = as_int32_words(bitmask).to(device)
    ops.apply_token_bitmask(logits, bitmask)
    ones = torch.ones(4)
    tokens = ops.sample(
        logits,
        ones.to(device),
        torch.zeros(4, dtype=torch.int32, device=device),
        ones.to(device),
        torch.zeros(4, device=device),
        torch.arange(4, dtype=torch.int64, device=device),
        torch.zeros(4, dtype=torch.int64, device=device),
    ).tolist()
    for b, t in enumerate(tokens):
        assert t in allowed[b]


def test_opcheck(device):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 100, generator=gen).to(device)
    bitmask = random_bitmask(3, 100, gen).to(device)
    op = torch.ops.fast_inference.apply_token_bitmask.default
    torch.library.opcheck(op, (logits, bitmask, None))
    torch.library.opcheck(op, (logits, bitmask, torch.tensor([2, 0], dtype=torch.int32, device=device)))


def test_rejects_bad_arguments(device):
    logits = torch.zeros(2, 64, device=device)
    good = torch.full((2, 2), -1, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="bitmask must have shape \\[2, 2\\]"):
        ops.apply_token_bitmask(logits, good[:, :1])
    with pytest.raises(RuntimeError, match="bitmask must have shape"):
        ops.apply_token_bitmask(logits, good[:1])
    with pytest.raises(RuntimeError, match="bitmask must be int32"):
        ops.apply_token_bitmask(logits, good.long())
    with pytest.raises(RuntimeError, match="bitmask must be contiguous"):
        ops.apply_token_bitmask(logits, torch.full((2, 4), -1, dtype=torch.int32, device=device)[:, ::2])
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        ops.apply_token_bitmask(logits[0], good)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        ops.apply_token_bitmask(logits.long(), good)
    with pytest.raises(RuntimeError, match="logits must be contiguous"):
        ops.apply_token_bitmask(torch.zeros(64, 2, device=device).t(), good)
    with pytest.raises(RuntimeError, match="indices must be int32"):
        ops.apply_token_bitmask(logits, good, torch.tensor([0], device=device))
    with pytest.raises(RuntimeError, match="indices must be 1-D"):
        ops.apply_token_bitmask(logits, good, torch.zeros(1, 1, dtype=torch.int32, device=device))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="bitmask must be on"):
            ops.apply_token_bitmask(logits, good.cpu())


def test_cpu_rejects_out_of_range_indices():
    logits = torch.zeros(2, 64)
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="indices must hold logits rows in \\[0, 2\\), got 2 at position 1"):
        ops.apply_token_bitmask(logits, bitmask, torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="got -1"):
        ops.apply_token_bitmask(logits, bitmask, torch.tensor([-1], dtype=torch.int32))


@pytest.mark.cuda
def test_cuda_skips_out_of_range_indices_without_a_sync():
    logits = torch.zeros(2, 64, device="cuda")
    bitmask = torch.zeros(2, 2, dtype=torch.int32, device="cuda")
    ops.apply_token_bitmask(logits, bitmask, torch.tensor([1, 2, -1], dtype=torch.int32, device="cuda"))
    out = logits.cpu()
    assert (out[0] == 0).all() and (out[1] == float("-inf")).all()
