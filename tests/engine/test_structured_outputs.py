"""Grammar-constrained decoding through the LLM API: JSON schema / json_object / regex / choice / GBNF outputs
are valid for every seed on a random-weight model (only the constraint can make them so), with n > 1,
preemption, prefix caching, seeds, logprobs, bias; bad specs are refused at intake; the grammar cache."""

import json
import re

import jsonschema
import pytest
from engine_utils import assert_no_leak

from fast_inference import LLM, SamplingParams, StructuredOutputsParams
from fast_inference.engine import structured_outputs
from fast_inference.engine.intake import InvalidRequestError

PROMPT = "Hello, world! How are"
# Strings bounded by patterns and enums, numbers by ranges, arrays by maxItems: a random model's reply
# must close within the budget. (xgrammar's maxLength strings admit raw control characters, invalid
# JSON, so the schemas bound strings with patterns.)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z ]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
    },
    "required": ["name", "age", "tags", "ok", "city"],
}


def so(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", kv_cache_memory="8MiB")


def quote_and_brace_bias(llm) -> dict[int, float]:
    """A push toward the tokens that close strings and objects, so that free JSON (json_object) closes
    within the budget on a random model; the grammar still decides which of them are allowed."""
    tok = llm.get_tokenizer()
    return {tok.convert_tokens_to_ids(t): 6.0 for t in ('"', "}")}


def test_json_schema_outputs_validate_for_every_seed(llm):
    params = [
        SamplingParams(n=3, seed=seed, max_tokens=300, structured_outputs=so(json=SCHEMA))
        for seed in range(4)
    ]
    outs = llm.generate([PROMPT] * 4, params, use_tqdm=False)
    eos = llm.get_tokenizer().convert_tokens_to_ids("<|im_end|>")
    texts = set()
    for out in outs:
        assert len(out.outputs) == 3
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)
            # Ended by the grammar's completion itself: the closing brace is the last token, no EOS sampled.
            assert c.text.rstrip().endswith("}") and eos not in c.token_ids
            texts.add(c.text)
    assert len(texts) > 6  # different seeds and forks really sample differently
    assert_no_leak(llm.engine)


def test_unconstrained_output_is_not_json(llm):
    # The same requests without the constraint: the random model does not write JSON by itself, so the
    # test above checks the mask and not luck.
    outs = llm.generate(
        [PROMPT] * 4, [SamplingParams(seed=s, max_tokens=60) for s in range(4)], use_tqdm=False
    )
    for out in outs:
        with pytest.raises(ValueError):
            json.loads(out.outputs[0].text)


def test_json_schema_as_text_and_pretty_whitespace(llm):
    out = llm.generate(
        PROMPT,
        SamplingParams(seed=5, max_tokens=300, structured_outputs=so(json=json.dumps(SCHEMA))),
        use_tqdm=False,
    )[0]
    jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


def test_json_object_outputs_are_objects(llm):
    bias = quote_and_brace_bias(llm)
    params = [
        SamplingParams(seed=seed, max_tokens=400, logit_bias=bias, structured_outputs=so(json_object=True))
        for seed in range(6)
    ]
    for out in llm.generate([PROMPT] * 6, params, use_tqdm=False):
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        assert isinstance(json.loads(c.text), dict)


def test_regex_choice_and_grammar(llm):
    regex = r"[0-9]{3}-[a-z]{2,5}"
    choices = ["yes", "no", 'a "quoted" \\ answer', "ünïcode ✓"]
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | "x" [0-9]'
    params = []
    for seed in range(4):
        params += [
            SamplingParams(seed=seed, max_tokens=40, structured_outputs=so(regex=regex)),
            SamplingParams(seed=seed, max_tokens=40, structured_outputs=so(choice=choices)),
            SamplingParams(seed=seed, max_tokens=80, structured_outputs=so(grammar=grammar)),
        ]
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    picked = set()
    for i, out in enumerate(outs):
        c = out.outputs[0]
        kind = i % 3
        if kind == 0:
            assert re.fullmatch(regex, c.text), c.text
            assert c.finish_reason == "stop" and len(c.text) <= 9
        elif kind == 1:
            assert c.text in choices and c.finish_reason == "stop"
            picked.add(c.text)
        else:
            assert re.fullmatch(r"\(([a-c]|x[0-9])(,([a-c]|x[0-9]))*\)", c.text), c.text
            assert c.finish_reason == "stop"
    assert len(picked) > 1


def test_greedy_choice_differs_from_unconstrained_greedy(llm):
    free = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    out = llm.generate(
        PROMPT,
        SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=so(choice=["zebra", "42"])),
        use_tqdm=False,
    )[0]
    assert out.outputs[0].text in ("zebra", "42") and free.outputs[0].text not in ("zebra", "42")


def test_seeded_outputs_do_not_depend_on_the_batch_or_the_mask_thread(llama_dir):
    params = SamplingParams(n=2, seed=11, max_tokens=300, structured_outputs=so(json=SCHEMA))
    alone = LLM(llama_dir, dtype="float32", kv_cache_memory="8MiB")
    ref = [c.text for c in alone.generate(PROMPT, params, use_tqdm=False)[0].outputs]
    # The same request in a mixed batch (unconstrained and other constrained rows), mask filled inline.
    mixed = LLM(llama_dir, dtype="float32", kv_cache_memory="8MiB")
    mixed.engine.structured.overlap = False
    others = [SamplingParams(seed=s, max_tokens=20) for s in range(3)]
    others.append(SamplingParams(seed=3, max_tokens=20, structured_outputs=so(regex="[a-z]+")))
    outs = mixed.generate(
        ["other one", PROMPT, "other two", "x", "y"], [others[0], params, *others[1:]], use_tqdm=False
    )
    assert [c.text for c in outs[1].outputs] == ref


def test_preemption_and_prefix_caching_keep_outputs_valid_and_identical(llama_dir):
    prompt = " ".join([PROMPT] * 6)  # more than a block: later requests find its blocks cached
    params = [
        SamplingParams(n=2, seed=s, max_tokens=240, structured_outputs=so(json=SCHEMA)) for s in range(4)
    ]
    roomy = LLM(llama_dir, dtype="float32", kv_cache_memory="8MiB")
    ref = [[c.text for c in o.outputs] for o in roomy.generate([prompt] * 4, params, use_tqdm=False)]
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * 16
    # 20 blocks: each sequence fits, the 8 together do not, so the youngest are preempted and recomputed.
    tight = LLM(llama_dir, dtype="float32", kv_cache_memory=20 * bytes_per_block)
    for _ in range(2):
        outs = tight.generate([prompt] * 4, params, use_tqdm=False)
        assert [[c.text for c in o.outputs] for o in outs] == ref
    stats = tight.engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_rate"] > 0
    for texts in ref:
        for text in texts:
            jsonschema.validate(json.loads(text), SCHEMA)
    assert_no_leak(tight.engine)


def test_matcher_rebuilt_from_the_output_when_out_of_step(llm):
    engine = llm.engine
    engine.add_request(
        "r", PROMPT, SamplingParams(seed=1, max_tokens=300, structured_outputs=so(json=SCHEMA))
    )
    seq = engine.requests["r"].seqs[0]
    for _ in range(6):
        engine.step()
    grammar = seq.grammar
    grammar.matcher.reset()  # as if the tokens had been rolled back and replayed: the count no longer matches
    grammar.num_accepted = 0
    while engine.has_unfinished_requests():
        engine.step()
    jsonschema.validate(json.loads(seq.text), SCHEMA)


def test_logprobs_are_the_models_and_penalties_apply_after_the_mask(llm):
    params = SamplingParams(
        seed=2, max_tokens=300, logprobs=2, presence_penalty=1.5, repetition_penalty=1.3,
        structured_outputs=so(json=SCHEMA),
    )  # fmt: skip
    c = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len(c.logprobs) == len(c.token_ids)
    for token, entry in zip(c.token_ids, c.logprobs):
        assert entry[token].logprob > float("-inf")  # from the raw logits, not the masked ones


def test_bad_specs_are_refused_at_intake(llm):
    bad = [
        (so(json='{"type": '), "not valid JSON"),
        (so(json={"type": "objectx"}), 'invalid JSON schema: Unsupported type "objectx"'),
        (so(regex="a(b"), "invalid regex: .*parenthesis"),
        (so(grammar="root ::= foo"), 'invalid grammar: .*Rule "foo" is not defined'),
    ]
    for spec, message in bad:
        with pytest.raises(InvalidRequestError, match=message) as info:
            llm.engine.add_request("bad", PROMPT, SamplingParams(structured_outputs=spec))
        assert info.value.param == "structured_outputs"
    assert not llm.engine.has_unfinished_requests()


def test_params_take_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one of .* got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="got regex, choice"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="choice must be a non-empty list of strings"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="json must be a JSON schema"):
        StructuredOutputsParams(json=3)
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})


def test_grammar_cache_is_keyed_by_spec_and_bounded(llm, monkeypatch):
    cache = llm.engine.structured
    monkeypatch.setattr(structured_outputs, "GRAMMAR_CACHE_SIZE", 2)
    first = cache.compile(so(regex="[ab]+"))
    assert cache.compile(so(regex="[ab]+")) is first
    cache.compile(so(regex="[cd]+"))
    cache.compile(so(regex="[ef]+"))
    assert len(cache._cache) == 2
    assert cache.compile(so(regex="[ab]+")) is not first  # evicted, compiled again


def test_mask_touches_only_the_constrained_rows(llm):
    outs = llm.generate(
        [PROMPT] * 3,
        [
            SamplingParams(seed=0, max_tokens=5),
            SamplingParams(seed=0, max_tokens=5, structured_outputs=so(choice=["abc"])),
            SamplingParams(seed=0, max_tokens=5),
        ],
        use_tqdm=False,
    )
    assert outs[1].outputs[0].text == "abc"
    assert outs[0].outputs[0].text == outs[2].outputs[0].text != "abc"  # free rows untouched by the mask
