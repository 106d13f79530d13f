"""SamplingParams.prompt_logprobs: each prompt token's logprob (and top candidates) checked against a full
transformers forward of the same prompt, through chunked prefill, prefix caching, n > 1 and the step deltas."""

import pytest
import torch
from engine_utils import PROMPTS, _hf_model, assert_no_leak

from fast_inference import LLM, SamplingParams
from fast_inference.engine.config import EngineArgs
from fast_inference.engine.llm_engine import LLMEngine

TOP = 3


def _reference(llama_dir, prompt_ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every prompt position: float32 [len(prompt_ids), V]."""
    model = _hf_model(str(llama_dir))
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _check(prompt_logprobs, prompt_ids, ref, tokenizer) -> None:
    assert len(prompt_logprobs) == len(prompt_ids)
    assert prompt_logprobs[0] is None  # nothing predicts the first token
    for p in range(1, len(prompt_ids)):
        entry = prompt_logprobs[p]
        row = ref[p - 1]  # position p - 1 predicts token p
        target = prompt_ids[p]
        assert target in entry
        assert entry[target].logprob == pytest.approx(row[target].item(), abs=1e-4)
        assert entry[target].rank == int((row > row[target]).sum()) + 1
        assert entry[target].decoded_token == tokenizer.decode([target])
        top = torch.topk(row, TOP)
        ranked = {t: lp for t, lp in entry.items() if lp.rank is not None and lp.rank <= TOP}
        assert sorted(ranked) == sorted(top.indices.tolist())
        for t, lp in ranked.items():
            assert lp.logprob == pytest.approx(row[t].item(), abs=1e-4)
        assert len(entry) in (TOP, TOP + 1)  # the top candidates, plus the prompt token when not among them


def _params(**kw):
    return SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=TOP, **kw)


@pytest.mark.parametrize("chunk", [2048, 7], ids=["one_prefill", "chunked_prefill"])
def test_prompt_logprobs_match_a_full_forward(llama_dir, chunk):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=chunk)
    tok = llm.get_tokenizer()
    outs = llm.generate(PROMPTS[:2], _params(), use_tqdm=False)
    for prompt, out in zip(PROMPTS[:2], outs):
        ids = tok.encode(prompt)
        assert out.prompt_token_ids == ids
        _check(out.prompt_logprobs, ids, _reference(llama_dir, ids), tok)
        assert len(out.outputs[0].token_ids) == 2
    assert_no_leak(llm.engine)


def test_prompt_logprobs_with_prefix_cache_hits_and_n(llama_dir):
    """A prompt already in the prefix cache still gets every position's logprob (its hits are not used,
    its prefill is chunked), and the n forks of one request share the one list."""
    llm = LLM(
        llama_dir,
        dtype="float32",
        kv_cache_memory="8MiB",
        enable_prefix_caching=True,
        max_num_batched_tokens=5,
    )
    tok = llm.get_tokenizer()
    prompt = PROMPTS[1] * 2
    ids = tok.encode(prompt)
    llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # fills the cache
    out = llm.generate(prompt, _params(n=2), use_tqdm=False)[0]
    assert len(out.outputs) == 2
    _check(out.prompt_logprobs, ids, _reference(llama_dir, ids), tok)
    without = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)[0]
    assert without.prompt_logprobs is None
    assert_no_leak(llm.engine)


def test_prompt_logprobs_are_sent_once_in_the_deltas(llama_dir):
    engine = LLMEngine(
        EngineArgs(model=str(llama_dir), dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=5)
    )
    engine.add_request("r", PROMPTS[3], _params())
    sent = []
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.prompt_logprobs is not None:
                sent.append(delta.prompt_logprobs)
    assert len(sent) == 1
    ids = engine.tokenizer.encode(PROMPTS[3])
    _check(sent[0], ids, _reference(llama_dir, ids), engine.tokenizer)
    assert_no_leak(engine)


def test_prompt_logprobs_range_is_checked():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
