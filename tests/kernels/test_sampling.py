"""Tests of the sampling ops (sample, apply_penalties, apply_logit_bias, compute_logprobs) against the references."""

import pytest
import torch

from fast_inference import ops
from fast_inference.ops import reference as ref


def params(batch, device="cpu", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offsets=None):
    """Per-row parameter tensors (scalars broadcast to the batch)."""

    def full(v, dtype):
        t = v if isinstance(v, torch.Tensor) else torch.full((batch,), v)
        return t.to(dtype=dtype, device=device)

    off = torch.arange(batch) if offsets is None else offsets
    return (
        full(temperature, torch.float32),
        full(top_k, torch.int32),
        full(top_p, torch.float32),
        full(min_p, torch.float32),
        full(seed, torch.int64),
        full(off, torch.int64),
    )


# ---- Philox and exp ---------------------------------------------------------------------------


def test_philox_known_answers():
    # Random123 known-answer vectors of philox4x32_10.
    assert ref.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert ref.philox4x32_10((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == (
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    )


def test_reference_exp_is_accurate():
    z = torch.linspace(-85.9, 0.0, 100001)
    rel = (ref.fi_exp(z).double() / torch.exp(z.double()) - 1).abs().max()
    assert rel < 5e-7
    assert ref.fi_exp(torch.tensor([0.0])).item() == 1.0
    assert ref.fi_exp(torch.tensor([-87.0, float("-inf")])).tolist() == [0.0, 0.0]


# ---- greedy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_first_argmax(device, dtype):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(33, 5003, generator=gen) * 3).round()  # rounding makes many ties at the max
    logits[3, :] = 1.0  # all tied: index 0
    logits[4, 7] = logits[4, 4000] = 100.0
    logits = logits.to(dtype)
    out = ops.sample(logits.to(device), *params(33, device, temperature=0.0, top_k=5, top_p=0.5))
    expect = torch.stack([(row == row.max()).nonzero()[0, 0] for row in logits.float()])
    assert torch.equal(out.cpu(), expect)
    assert out[3] == 0 and out[4] == 7


# ---- exact agreement with the reference draw -----------------------------------------------------


def mixed_batch(batch, vocab, gen, device="cpu"):
    logits = torch.randn(batch, vocab, generator=gen) * 3
    logits[::7] = logits[::7].round()  # ties at every threshold
    logits[5, : vocab // 2] = float("-inf")
    temperature = torch.rand(batch, generator=gen) * 1.5 + 0.1
    temperature[::9] = 0.0
    top_k = torch.randint(-1, 300, (batch,), generator=gen)
    top_k[1::6] = 2000  # above the small-k path limit
    top_k[2::6] = vocab + 5
    top_p = torch.rand(batch, generator=gen) * 0.95 + 0.02
    top_p[::4] = 1.0
    min_p = torch.rand(batch, generator=gen) * 0.3
    min_p[::3] = 0.0
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=gen)
    offsets = torch.randint(0, 2**40, (batch,), generator=gen)
    args = params(batch, device, temperature, top_k, top_p, min_p, seeds, offsets)
    return logits.to(device), args


def test_sample_matches_reference_draw(device):
    gen = torch.Generator().manual_seed(2)
    logits, args = mixed_batch(96, 4099, gen, device)
    out = ops.sample(logits, *args)
    expect = ref.sample(logits.cpu(), *(a.cpu() for a in args))
    assert torch.equal(out.cpu(), expect)
    probs = ref.sampling_probs(logits.cpu(), *(a.cpu() for a in args[:4]))
    assert (probs[torch.arange(96), out.cpu()] > 0).all()


def test_portable_cpu_kernels_draw_the_same_tokens(monkeypatch):
    # The vectorized and portable row kernels must agree bit for bit (the kernel reads FI_CPU_ISA per call).
    if ops.cpu_isa() != "avx512":  # the sampling row kernels are vectorized for AVX-512 only
        pytest.skip(f"no vectorized sampling kernels on this CPU ({ops.cpu_isa()}): nothing to compare")
    logits, args = mixed_batch(64, 4099, torch.Generator().manual_seed(2))
    fast = ops.sample(logits, *args)
    monkeypatch.setenv("FI_CPU_ISA", "portable")
    assert ops.cpu_isa() == "portable"
    out = ops.sample(logits, *args)
    lp = ops.compute_logprobs(logits, out, 5)
    assert torch.equal(out, fast)
    assert torch.equal(out, ref.sample(logits, *args))
    full = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(lp[2].double(), full.topk(5).values, rtol=0, atol=2e-5)


def test_sample_matches_reference_draw_at_llm_vocab_size(device):
    gen = torch.Generator().manual_seed(12)
    vocab = 151936
    logits = (torch.randn(4, vocab, generator=gen) * 2.5).to(device)
    args = params(
        4,
        device,
        temperature=torch.tensor([0.7, 1.0, 1.3, 0.9]),
        top_k=torch.tensor([0, 40, 5000, 0]),
        top_p=torch.tensor([0.9, 0.95, 0.5, 1.0]),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.02]),
        seed=torch.tensor([1, 2, 3, 4]),
        offsets=torch.tensor([10, 20, 30, 40]),
    )
    assert torch.equal(ops.sample(logits, *args).cpu(), ref.sample(logits.cpu(), *(a.cpu() for a in args)))


@pytest.mark.cuda
def test_cpu_and_cuda_draw_identical_tokens():
    gen = torch.Generator().manual_seed(3)
    logits, args = mixed_batch(256, 32000, gen)
    out_cpu = ops.sample(logits, *args)
    out_cuda = ops.sample(logits.cuda(), *(a.cuda() for a in args))
    assert torch.equal(out_cpu, out_cuda.cpu())


def test_half_precision_logits_sample_like_float32(device):
    gen = torch.Generator().manual_seed(4)
    logits, args = mixed_batch(40, 1000, gen, device)
    for dtype in (torch.float16, torch.bfloat16):
        low = logits.to(dtype)
        assert torch.equal(ops.sample(low, *args), ops.sample(low.float(), *args))


# ---- distributions ----------------------------------------------------------------------------------

FIXED_LOGITS = torch.tensor([2.0, 1.5, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0, float("-inf"), 0.9, -3.0])
CONFIGS = {
    "temperature": dict(temperature=0.7),
    "hot": dict(temperature=2.5),
    "top_k": dict(top_k=3),  # the tie at 1.5 sits inside the top 3
    "top_k_tie": dict(top_k=2),  # k-th value 1.5 is tied: both kept
    "top_p": dict(top_p=0.6),
    "top_p_tie": dict(top_p=0.35),
    "min_p": dict(min_p=0.3),
    "combined": dict(temperature=0.8, top_k=6, top_p=0.8, min_p=0.1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sample_distribution(device, name):
    draws = 40000
    kwargs = CONFIGS[name]
    logits = FIXED_LOGITS.expand(draws, -1).contiguous()
    args = params(draws, device, seed=1234, offsets=torch.arange(draws) * 3 + 11, **kwargs)
    tokens = ops.sample(logits.to(device), *args).cpu()
    counts = torch.bincount(tokens, minlength=logits.shape[1]).double()
    exact = ref.sampling_probs(logits[:1], *(a[:1].cpu() for a in args[:4]))[0]
    assert counts[exact == 0].sum() == 0, "a filtered-out token was drawn"
    tv = 0.5 * (counts / draws - exact).abs().sum().item()
    # Sampling noise gives TV ~ 0.005 here; a wrong threshold or temperature moves >= 0.03 of mass.
    assert tv < 0.015, f"total variation {tv:.4f}"


def test_distribution_tests_detect_a_wrong_temperature():
    draws = 40000
    logits = FIXED_LOGITS.expand(draws, -1).contiguous()
    tokens = ops.sample(logits, *params(draws, temperature=0.9))
    counts = torch.bincount(tokens, minlength=logits.shape[1]).double()
    exact = ref.sampling_probs(logits[:1], *params(1, temperature=0.7)[:4])[0]
    assert 0.5 * (counts / draws - exact).abs().sum().item() > 0.015


def test_single_finite_logit_is_sampled():
    logits = torch.full((4, 100), float("-inf"))
    logits[torch.arange(4), torch.tensor([0, 17, 99, 50])] = torch.tensor([-1e30, 3.0, 0.0, 1e30])
    out = ops.sample(logits, *params(4, temperature=torch.tensor([1.0, 0.5, 0.0, 2.0]), top_p=0.5, min_p=0.5))
    assert out.tolist() == [0, 17, 99, 50]


# ---- reproducibility ------------------------------------------------------------------------------


def test_same_seed_and_offset_same_token_in_any_batch(device):
    gen = torch.Generator().manual_seed(5)
    logits, args = mixed_batch(64, 3000, gen, device)
    full = ops.sample(logits, *args)
    for row in (0, 1, 13, 37, 63):
        single = ops.sample(logits[row : row + 1], *(a[row : row + 1] for a in args))
        assert single.item() == full[row].item()
    perm = torch.randperm(64, generator=gen).to(device)
    assert torch.equal(ops.sample(logits[perm], *(a[perm] for a in args)), full[perm])
    # the offset, not the position, decides: new offsets change the draws
    moved = ops.sample(logits, *args[:5], args[5] + 1)
    assert not torch.equal(moved, full)


# ---- bad input ------------------------------------------------------------------------------------


# One check per argument, in C++ for both devices: wrong metadata -> RuntimeError, bad values -> ValueError.


def test_sample_rejects_bad_values(device):
    logits = torch.randn(3, 50)
    good = params(3, device)
    bad = logits.clone()
    bad[1, 4] = float("nan")
    with pytest.raises(ValueError, match="logits row 1 contains NaN or \\+inf"):
        ops.sample(bad.to(device), *good)
    bad = logits.clone()
    bad[2, 4] = float("inf")
    with pytest.raises(ValueError, match="logits row 2 contains NaN or \\+inf"):
        ops.sample(bad.to(device), *good)
    with pytest.raises(ValueError, match="logits row 0 has no finite value"):
        ops.sample(torch.full((3, 50), float("-inf"), device=device), *good)
    logits = logits.to(device)
    with pytest.raises(ValueError, match="top_p must be in"):
        ops.sample(logits, *params(3, device, top_p=1.5))
    with pytest.raises(ValueError, match="top_p must be in"):
        ops.sample(logits, *params(3, device, top_p=0.0))
    with pytest.raises(ValueError, match="min_p must be in"):
        ops.sample(logits, *params(3, device, min_p=-0.1))
    with pytest.raises(ValueError, match="temperature must be finite"):
        ops.sample(logits, *params(3, device, temperature=-1.0))
    with pytest.raises(ValueError, match="temperature must be finite"):
        ops.sample(logits, *params(3, device, temperature=float("nan")))


def test_sample_rejects_bad_metadata(device):
    logits = torch.randn(3, 50, device=device)
    good = params(3, device)
    with pytest.raises(RuntimeError, match="temperature must have shape"):
        ops.sample(logits, *params(2, device))
    with pytest.raises(RuntimeError, match="top_k must be"):
        ops.sample(logits, good[0], good[1].long(), *good[2:])
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        ops.sample(logits[0], *good)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        ops.sample(logits.long(), *good)
    with pytest.raises(RuntimeError, match="stride"):
        ops.sample(torch.randn(50, 3, device=device).t(), *good)


# ---- penalties and logit bias ---------------------------------------------------------------------


def ragged(lists, device="cpu"):
    ids = torch.tensor([t for row in lists for t in row], dtype=torch.int64)
    cu = torch.tensor([0] + [len(r) for r in lists], dtype=torch.int64).cumsum(0).to(torch.int32)
    return ids.to(device), cu.to(device)


def random_lists(batch, vocab, max_len, gen):
    return [
        torch.randint(
            0, vocab, (int(torch.randint(0, max_len, (1,), generator=gen)),), generator=gen
        ).tolist()
        for _ in range(batch)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalties_match_reference(device, dtype):
    gen = torch.Generator().manual_seed(6)
    batch, vocab = 24, 700
    logits = (torch.randn(batch, vocab, generator=gen) * 4).to(dtype)
    prompt, output = ragged(random_lists(batch, vocab, 60, gen)), ragged(random_lists(batch, vocab, 90, gen))
    presence = torch.rand(batch, generator=gen) * 4 - 2
    frequency = torch.rand(batch, generator=gen) * 4 - 2
    repetition = torch.rand(batch, generator=gen) * 1.5 + 0.5
    presence[::4] = frequency[::4] = 0.0
    repetition[::3] = 1.0
    expect = logits.clone()
    ref.apply_penalties(expect, *prompt, *output, presence, frequency, repetition)
    got = logits.clone().to(device)
    ops.apply_penalties(got, *(t.to(device) for t in (*prompt, *output, presence, frequency, repetition)))
    assert torch.equal(got.cpu(), expect)
    assert not torch.equal(got.cpu(), logits)


def test_repetition_penalty_matches_transformers(device):
    from transformers import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(7)
    batch, vocab, penalty = 5, 300, 1.7
    logits = torch.randn(batch, vocab, generator=gen) * 3
    history = torch.randint(0, vocab, (batch, 40), generator=gen)  # prompt 25 + output 15, with repeats
    expect = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    prompt, output = ragged(history[:, :25].tolist()), ragged(history[:, 25:].tolist())
    got = logits.clone().to(device)
    zeros = torch.zeros(batch)
    ops.apply_penalties(
        got, *(t.to(device) for t in (*prompt, *output, zeros, zeros, torch.full((batch,), penalty)))
    )
    torch.testing.assert_close(got.cpu(), expect, rtol=1e-6, atol=1e-6)


def test_presence_and_frequency_follow_openai():
    logits = torch.zeros(1, 6)
    prompt, output = ragged([[5, 5, 5]]), ragged([[1, 1, 1, 2, 4]])
    ops.apply_penalties(
        logits, *prompt, *output, torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([1.0])
    )
    # prompt tokens are not penalized by presence/frequency; counts 3, 1, 1
    assert logits[0].tolist() == [0.0, -1.25, -0.75, 0.0, -0.75, 0.0]


def test_logit_bias_matches_reference_and_masks(device):
    gen = torch.Generator().manual_seed(8)
    batch, vocab = 16, 500
    logits = torch.randn(batch, vocab, generator=gen)
    lists = random_lists(batch, vocab, 30, gen)
    ids, cu = ragged(lists)
    biases = torch.randn(ids.numel(), generator=gen) * 5
    expect = logits.clone()
    ref.apply_logit_bias(expect, ids, biases, cu)
    got = logits.clone().to(device)
    ops.apply_logit_bias(got, ids.to(device), biases.to(device), cu.to(device))
    torch.testing.assert_close(got.cpu(), expect, rtol=0, atol=1e-5)
    # min_tokens: -inf on the greedy choice of every row, which then can never be drawn
    top = logits.argmax(-1)
    masked = logits.clone().to(device)
    ops.apply_logit_bias(
        masked,
        top.to(device),
        torch.full((batch,), float("-inf"), device=device),
        torch.arange(batch + 1, dtype=torch.int32, device=device),
    )
    for offset in range(20):
        out = ops.sample(
            masked, *params(batch, device, temperature=0.3, offsets=torch.full((batch,), offset))
        )
        assert (out.cpu() != top).all()


def test_penalties_and_bias_reject_bad_input(device):
    logits = torch.randn(2, 10, device=device)
    ids, cu = ragged([[1, 2], [3]], device)
    pen = tuple(t.to(device) for t in (torch.zeros(2), torch.zeros(2), torch.ones(2)))
    zeros2 = torch.zeros(2, device=device)

    def int32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    with pytest.raises(ValueError, match="prompt_token_ids must hold token ids"):
        ops.apply_penalties(logits, *ragged([[1, 10], [3]], device), ids, cu, *pen)
    with pytest.raises(ValueError, match="output_cu_lens must be non-decreasing"):
        ops.apply_penalties(logits, ids, cu, ids, int32([0, 2, 1]), *pen)
    with pytest.raises(ValueError, match="prompt_cu_lens\\[-1\\]"):
        ops.apply_penalties(logits, ids, int32([0, 1, 2]), ids, cu, *pen)
    with pytest.raises(ValueError, match="repetition_penalty must be finite and > 0"):
        ops.apply_penalties(logits, ids, cu, ids, cu, zeros2, zeros2, zeros2)
    with pytest.raises(ValueError, match="presence_penalty must be finite"):
        ops.apply_penalties(logits, ids, cu, ids, cu, torch.full((2,), float("nan"), device=device), *pen[1:])
    with pytest.raises(ValueError, match="token_ids must hold token ids"):
        ops.apply_logit_bias(
            logits, torch.tensor([1, 2, -1], device=device), torch.zeros(3, device=device), cu
        )
    with pytest.raises(ValueError, match="cu_lens\\[0\\] must be 0"):
        ops.apply_logit_bias(logits, ids, torch.zeros(3, device=device), int32([1, 2, 3]))
    with pytest.raises(RuntimeError, match="prompt_cu_lens must have shape"):
        ops.apply_penalties(logits, ids, cu[:2], ids, cu, *pen)
    with pytest.raises(RuntimeError, match="output_cu_lens must be int32"):
        ops.apply_penalties(logits, ids, cu, ids, cu.long(), *pen)
    with pytest.raises(RuntimeError, match="presence_penalty must have shape"):
        ops.apply_penalties(logits, ids, cu, ids, cu, torch.zeros(3, device=device), *pen[1:])
    with pytest.raises(RuntimeError, match="biases must have shape"):
        ops.apply_logit_bias(logits, ids, zeros2, cu)


# ---- logprobs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_top", [0, 1, 5, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logprobs_match_log_softmax(device, num_top, dtype):
    gen = torch.Generator().manual_seed(9)
    batch, vocab = 12, 5000
    logits = (torch.randn(batch, vocab, generator=gen) * 4).to(dtype)
    logits[3, 100:] = float("-inf")
    tokens = torch.randint(0, 100, (batch,), generator=gen)
    lp, top_ids, top_lp = ops.compute_logprobs(logits.to(device), tokens.to(device), num_top)
    full = torch.log_softmax(logits.double(), dim=-1)
    torch.testing.assert_close(lp.cpu().double(), full[torch.arange(batch), tokens], rtol=0, atol=2e-5)
    top = torch.topk(full, num_top, dim=-1)
    torch.testing.assert_close(top_lp.cpu().double(), top.values, rtol=0, atol=2e-5)
    # ties (half precision) may order equal values differently from topk: compare the values they index
    torch.testing.assert_close(full.gather(1, top_ids.cpu()), top.values, rtol=0, atol=0)
    assert top_ids.shape == (batch, num_top) and top_ids.dtype == torch.int64


def test_logprobs_ties_prefer_lower_ids_and_reject_bad_input(device):
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 1.0]], device=device)
    first = torch.tensor([0], device=device)
    _, ids, _ = ops.compute_logprobs(logits, first, 4)
    assert ids.tolist() == [[1, 3, 2, 4]]
    with pytest.raises(ValueError, match=f"num_top must be in \\[0, {ops.sampling.MAX_LOGPROBS}\\]"):
        ops.compute_logprobs(logits, first, ops.sampling.MAX_LOGPROBS + 1)
    with pytest.raises(ValueError, match="num_top \\(6\\) must not exceed the vocabulary size"):
        ops.compute_logprobs(logits, first, 6)
    with pytest.raises(ValueError, match="token_ids must be in"):
        ops.compute_logprobs(logits, torch.tensor([5], device=device), 2)
    with pytest.raises(RuntimeError, match="token_ids must have shape"):
        ops.compute_logprobs(logits, torch.tensor([0, 1], device=device), 2)
    with pytest.raises(ValueError, match="logits row 0 contains NaN"):
        ops.compute_logprobs(torch.tensor([[0.0, float("nan")]], device=device), first, 1)
    with pytest.raises(ValueError, match="logits row 1 has no finite value"):
        ops.compute_logprobs(
            torch.tensor([[0.0, 1.0], [float("-inf")] * 2], device=device), first.repeat(2), 1
        )


def test_max_logprobs_is_the_one_cpp_limit():
    # Python reads the limit from the extension; the engine and the server use that one value.
    import fast_inference._C as _C

    from fast_inference.engine import sampling_params
    from fast_inference.server import protocol

    assert ops.sampling.MAX_LOGPROBS == _C.MAX_LOGPROBS == 20
    assert sampling_params.MAX_LOGPROBS is protocol.MAX_LOGPROBS is ops.sampling.MAX_LOGPROBS


# ---- opcheck --------------------------------------------------------------------------------------


def test_opcheck_all_ops(device):
    gen = torch.Generator().manual_seed(10)
    logits, args = mixed_batch(8, 300, gen, device)
    torch.library.opcheck(torch.ops.fast_inference.sample.default, (logits, *args))
    ids, cu = ragged(random_lists(8, 300, 10, gen), device)
    pen = [torch.rand(8, generator=gen).to(device) + 0.5 for _ in range(3)]
    torch.library.opcheck(
        torch.ops.fast_inference.apply_penalties.default, (logits.clone(), ids, cu, ids, cu, *pen)
    )
    torch.library.opcheck(
        torch.ops.fast_inference.apply_logit_bias.default,
        (logits.clone(), ids, torch.randn(ids.numel(), generator=gen).to(device), cu),
    )
    tokens = torch.randint(0, 300, (8,), generator=gen).to(device)
    torch.library.opcheck(torch.ops.fast_inference.compute_logprobs.default, (logits, tokens, 5))


# ---- CUDA specifics -------------------------------------------------------------------------------


@pytest.mark.cuda
def test_sample_replays_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(11)
    logits, args = mixed_batch(32, 5000, gen, "cuda")
    expect = ops.sample(logits, *args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.sample(logits, *args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.sample(logits, *args)  # no value checks while capturing: no host sync
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expect)
    args[5].add_(1)  # the next step: new offsets, same graph
    graph.replay()
    assert torch.equal(out, ops.sample(logits, *args))


@pytest.mark.cuda
def test_cuda_graph_capture_skips_value_checks_and_marks_bad_rows():
    # Value checks read the host, which a graph cannot: captured, bad rows get status codes, no raise.
    logits = torch.randn(3, 100, device="cuda")
    args = params(3, "cuda")
    ops.sample(logits, *args)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.sample(logits, *args)
    logits[1, 5] = float("nan")
    logits[2] = float("-inf")
    graph.replay()
    torch.cuda.synchronize()
    assert out[1].item() == -1 and out[2].item() == -2 and 0 <= out[0].item() < 100
    with pytest.raises(ValueError, match="logits row 1 contains NaN"):
        ops.sample(logits, *args)  # eager: the same check as on the CPU
