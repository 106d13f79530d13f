"""Request-level behaviour: n > 1, stop strings / token ids, min/max tokens, seeds, logprobs, streaming, abort."""

import pytest
from engine_utils import PROMPTS, assert_no_leak, hf_greedy

from fast_inference import LLM, SamplingParams
from fast_inference.engine.config import EngineArgs
from fast_inference.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", kv_cache_memory="8MiB")


def _greedy(**kw):
    return SamplingParams(temperature=0.0, ignore_eos=True, **kw)


def test_n_greater_than_one_shares_prompt_blocks(llm, llama_dir):
    tok = llm.get_tokenizer()
    out = llm.generate(PROMPTS[1], _greedy(n=3, max_tokens=10), use_tqdm=False)[0]
    ref = hf_greedy(str(llama_dir), tuple(tok.encode(PROMPTS[1])), 10)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == ref for c in out.outputs)  # greedy: every copy is the same
    sampled = llm.generate(
        PROMPTS[1],
        SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True),
        use_tqdm=False,
    )[0]
    seqs = [tuple(c.token_ids) for c in sampled.outputs]
    assert len(set(seqs)) > 1  # independent random streams
    assert_no_leak(llm.engine)


def test_n_forks_share_blocks_in_the_cache(llama_dir):
    engine = LLMEngine(
        EngineArgs(model=str(llama_dir), dtype="float32", kv_cache_memory="8MiB", enable_prefix_caching=False)
    )
    prompt = PROMPTS[1] * 2  # several full blocks
    engine.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, max_tokens=4, seed=1))
    while not engine.requests["r"].seqs[0].num_output_tokens:
        engine.step()
    req = engine.requests["r"]
    assert len(req.seqs) == 4
    first_block = req.seqs[0].block_table[0]
    assert all(s.block_table[0] == first_block for s in req.seqs)
    assert engine.block_manager.ref_counts[first_block] == 4
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leak(engine)


def test_stop_strings(llm):
    base = llm.generate(PROMPTS[3], _greedy(max_tokens=20), use_tqdm=False)[0].outputs[0]
    text = base.text
    assert len(text) > 6
    stop = text[3:6]
    idx = text.find(stop)
    out = llm.generate(PROMPTS[3], _greedy(max_tokens=20, stop=[stop, "\x00never"]), use_tqdm=False)[
        0
    ].outputs[0]
    assert out.text == text[:idx]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    inc = llm.generate(
        PROMPTS[3], _greedy(max_tokens=20, stop=stop, include_stop_str_in_output=True), use_tqdm=False
    )[0].outputs[0]
    assert inc.text == text[: idx + len(stop)]
    assert_no_leak(llm.engine)


def test_stop_token_ids_and_eos(llm, llama_dir):
    base = llm.generate(PROMPTS[0], _greedy(max_tokens=12), use_tqdm=False)[0].outputs[0].token_ids
    target = base[5]
    first = base.index(target)
    out = llm.generate(PROMPTS[0], _greedy(max_tokens=12, stop_token_ids=[target]), use_tqdm=False)[
        0
    ].outputs[0]
    assert out.token_ids == base[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target
    # The same token as EOS: generation stops there unless ignore_eos.
    engine = llm.engine
    saved = set(engine.model_config.eos_token_ids)
    engine.model_config.eos_token_ids = {target}
    try:
        eos_out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[
            0
        ].outputs[0]
        assert eos_out.token_ids == base[: first + 1] and eos_out.finish_reason == "stop"
        assert eos_out.stop_reason is None
        ignored = llm.generate(PROMPTS[0], _greedy(max_tokens=12), use_tqdm=False)[0].outputs[0]
        assert ignored.token_ids == base
        # min_tokens masks the stop token (through apply_logit_bias) until min_tokens are out.
        if first < 11:
            masked = llm.generate(
                PROMPTS[0],
                SamplingParams(temperature=0.0, max_tokens=12, min_tokens=first + 1),
                use_tqdm=False,
            )[0].outputs[0]
            assert len(masked.token_ids) > first + 1 or masked.finish_reason == "length"
            assert target not in masked.token_ids[: first + 1]
    finally:
        engine.model_config.eos_token_ids = saved
    assert_no_leak(engine)


def test_max_tokens_capped_to_context(llama_dir):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory="8MiB", max_model_len=40)
    tok = llm.get_tokenizer()
    n_prompt = len(tok.encode(PROMPTS[1]))
    out = llm.generate(PROMPTS[1], _greedy(max_tokens=None), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 40 - n_prompt and out.finish_reason == "length"
    out = llm.generate(PROMPTS[1], _greedy(max_tokens=1000), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 40 - n_prompt
    out = llm.generate(PROMPTS[1], _greedy(max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3
    assert_no_leak(llm.engine)


def test_seeded_sampling_reproducible_across_batches(llm):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)
    mixed = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[4]], [others, params, others], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    different = llm.generate(
        PROMPTS[2],
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=12, seed=99, ignore_eos=True),
        use_tqdm=False,
    )
    assert different[0].outputs[0].token_ids != alone
    assert_no_leak(llm.engine)


def test_engine_seed_makes_unseeded_requests_reproducible(llama_dir):
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = LLM(llama_dir, dtype="float32", kv_cache_memory="4MiB", seed=5)
        runs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], params, use_tqdm=False)])
    assert runs[0] == runs[1]


def test_penalties_and_logit_bias(llm):
    base = llm.generate(PROMPTS[0], _greedy(max_tokens=8), use_tqdm=False)[0].outputs[0].token_ids
    banned = base[0]
    out = llm.generate(PROMPTS[0], _greedy(max_tokens=8, logit_bias={banned: -100.0}), use_tqdm=False)[0]
    assert out.outputs[0].token_ids[0] != banned
    forced = llm.generate(PROMPTS[0], _greedy(max_tokens=4, logit_bias={7: 100.0}), use_tqdm=False)[0]
    assert forced.outputs[0].token_ids == [7, 7, 7, 7]
    rep = llm.generate(
        PROMPTS[0],
        _greedy(max_tokens=8, frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=1.5),
        use_tqdm=False,
    )[0]
    assert len(rep.outputs[0].token_ids) == 8
    assert_no_leak(llm.engine)


def test_logprobs(llm):
    out = llm.generate(PROMPTS[0], _greedy(max_tokens=5, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry
        assert entry[token].rank == 1  # greedy picks the most likely token
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks == [1, 2, 3]
        vals = sorted((lp.logprob for lp in entry.values()), reverse=True)
        assert vals[0] <= 0.0
        assert all(isinstance(lp.decoded_token, str) for lp in entry.values())
        total += entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_step_outputs_are_deltas(llama_dir):
    engine = LLMEngine(EngineArgs(model=str(llama_dir), dtype="float32", kv_cache_memory="8MiB"))
    params = SamplingParams(
        temperature=1.0, max_tokens=30, seed=3, stop=["e t", "qq"], ignore_eos=True, logprobs=1
    )
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    finals = {}
    steps = {str(i): 0 for i in range(len(PROMPTS))}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            (comp,) = delta.outputs
            # One sampled token per step, with exactly its own logprob entry: nothing is resent.
            assert len(comp.token_ids) == 1 and len(comp.logprobs) == 1
            assert comp.token_ids[0] in comp.logprobs[0]
            steps[delta.request_id] += 1
            if delta.request_id in finals:
                finals[delta.request_id].add(delta)
            else:
                finals[delta.request_id] = delta
    tok = engine.tokenizer
    for rid, out in finals.items():
        assert out.finished
        comp = out.outputs[0]
        assert len(comp.token_ids) == len(comp.logprobs) == steps[rid]
        assert comp.cumulative_logprob == pytest.approx(
            sum(e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs))
        )
        full = tok.decode(comp.token_ids, skip_special_tokens=True)
        if comp.finish_reason == "length":
            assert comp.text == full
        else:
            assert full.startswith(comp.text)
    assert_no_leak(engine)


def test_abort_frees_blocks_next_step(llama_dir):
    engine = LLMEngine(EngineArgs(model=str(llama_dir), dtype="float32", kv_cache_memory="8MiB"))
    engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPTS[2], SamplingParams(max_tokens=3, ignore_eos=True, n=2))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.num_total_blocks
    engine.abort_request(["a", "b", "nonexistent"])
    outs = {o.request_id: o for o in engine.step()}
    assert outs["a"].finished and outs["a"].outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    assert_no_leak(engine)
    engine.abort_request("a")  # already gone: ignored
    assert engine.step() == []


def test_bad_inputs_raise_value_error(llama_dir):
    engine = LLMEngine(
        EngineArgs(model=str(llama_dir), dtype="float32", kv_cache_memory="8MiB", max_model_len=32)
    )
    params = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("x", "", params)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("x", [], params)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("x", list(range(1, 40)), params)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("x", [1, 2, engine.model_config.vocab_size], params)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("x", [-1], params)
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("x", [1], SamplingParams(logit_bias={10**6: 1.0}))
    engine.add_request("dup", [1, 2], params)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [1, 2], params)
    engine.abort_request("dup")
    engine.step()
    assert_no_leak(engine)
    with pytest.raises(ValueError, match="sampling_params"):
        LLM(llama_dir, dtype="float32", kv_cache_memory="1MiB").generate(["a", "b"], [params])
    with pytest.raises(ValueError, match="dtype"):
        LLMEngine(EngineArgs(model=str(llama_dir), dtype="int8"))
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLMEngine(EngineArgs(model=str(llama_dir), kv_cache_memory="lots"))


def test_abort_mid_chunked_prefill_and_embed_between_steps(llama_dir):
    engine = LLMEngine(
        EngineArgs(model=str(llama_dir), dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=8)
    )
    engine.add_request("long", PROMPTS[1] * 2, SamplingParams(max_tokens=5, ignore_eos=True))
    engine.add_request("short", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    engine.step()
    assert 0 < engine.requests["long"].seqs[0].num_computed < engine.requests["long"].seqs[0].num_tokens
    emb_during = engine.embed([engine.tokenizer.encode(PROMPTS[0])])  # borrows and returns blocks
    engine.abort_request("long")
    outs = engine.step()
    assert any(o.request_id == "long" and o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leak(engine)
    emb_after = engine.embed([engine.tokenizer.encode(PROMPTS[0])])
    assert emb_during.shape == (1, engine.model_config.hidden_size)
    assert abs(float(emb_during.norm()) - 1.0) < 1e-5
    assert (emb_during - emb_after).abs().max() < 1e-5


def test_n_with_stop_strings_and_logprobs(llm):
    params = SamplingParams(
        n=3, temperature=1.0, seed=5, max_tokens=10, stop=["e"], logprobs=1, ignore_eos=True
    )
    out = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    assert len(out.outputs) == 3
    for comp in out.outputs:
        assert "e" not in comp.text
        assert len(comp.logprobs) == len(comp.token_ids)
        assert comp.finish_reason in ("stop", "length")
    assert_no_leak(llm.engine)
