"""The step token budget: the step cost model's fit, decode-first scheduling with long prompts chunked under the
latency target, and greedy output unchanged by the chunking."""

import pytest
from engine_utils import PROMPTS, assert_no_leak, hf_greedy

from fast_inference import LLM, SamplingParams
from fast_inference.engine.block_manager import BlockManager
from fast_inference.engine.config import EngineArgs, SchedulerConfig
from fast_inference.engine.outputs import RequestMetrics
from fast_inference.engine.scheduler import Scheduler, StepCostModel
from fast_inference.engine.sequence import Request, Sequence


class FixedCost(StepCostModel):
    """A cost model with given a and b that observed steps do not move."""

    def __init__(self, fixed: float, per_token: float):
        super().__init__()
        self.weight, self.fixed, self.per_token = 1.0, fixed, per_token

    def observe(self, tokens: int, seconds: float) -> None:
        pass


def test_cost_model_recovers_fixed_and_per_token_cost():
    model = StepCostModel()
    assert not model.ready
    for tokens in (1, 32, 200, 1, 64, 512, 32):
        model.observe(tokens, 0.020 + 0.0005 * tokens)
    assert model.ready
    assert model.fixed == pytest.approx(0.020, rel=1e-6)
    assert model.per_token == pytest.approx(0.0005, rel=1e-6)
    assert model.tokens_within(0.070) == 100  # (70 - 20) ms / 0.5 ms


def test_cost_model_same_size_steps_fall_back_to_cost_per_token():
    model = StepCostModel()
    for _ in range(5):
        model.observe(32, 0.032)  # a and b cannot be separated: b = 1 ms per token, a = 0
    assert model.fixed == 0.0 and model.per_token == pytest.approx(0.001)


def _seq(seq_id: int, num_prompt: int) -> Sequence:
    req = Request(str(seq_id), None, list(range(num_prompt)), SamplingParams(), RequestMetrics(0.0))
    seq = Sequence(
        seq_id=seq_id,
        request=req,
        index=0,
        token_ids=list(range(num_prompt)),
        num_prompt_tokens=num_prompt,
        seed=0,
        max_tokens=1000,
    )
    req.seqs.append(seq)
    return seq


def _scheduler(target_itl_ms: float, max_batched: int = 2048) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=64,
        max_num_batched_tokens=max_batched,
        max_model_len=4096,
        block_size=16,
        enable_prefix_caching=False,
        target_itl_ms=target_itl_ms,
    )
    return Scheduler(config, BlockManager(512, 16, False))


def _run_step(sched: Scheduler) -> dict[int, int]:
    """Schedule one step and apply it as the engine would (sampled tokens appended); seq_id -> new tokens."""
    out = sched.schedule()
    samplers, _ = sched.update(out)
    for seq in samplers:
        seq.token_ids.append(7)
    return {seq.seq_id: n for seq, n in zip(out.seqs, out.num_new_tokens)}


def test_long_prompt_is_chunked_under_the_budget_while_decodes_run_every_step():
    sched = _scheduler(target_itl_ms=50.0)
    sched.step_cost = FixedCost(fixed=0.010, per_token=0.001)  # 10 ms + 1 ms per token
    decoding = [_seq(i, 8) for i in range(4)]
    for seq in decoding:
        sched.add(seq)
    assert _run_step(sched) == {0: 8, 1: 8, 2: 8, 3: 8}  # no decodes yet: the prompts run whole
    long_prompt = _seq(99, 300)
    sched.add(long_prompt)
    # Target max(50 ms, 2 x cost(4 decodes) = 28 ms) = 50 ms: 40 tokens, 4 of them the decodes.
    chunks = []
    while long_prompt.num_output_tokens == 0:
        step = _run_step(sched)
        assert all(step[s.seq_id] == 1 for s in decoding)  # every decode advances every step
        chunks.append(step[99])
        assert sum(step.values()) <= 40
    assert chunks[:-1] == [36] * 8 and chunks[-1] == 300 - 8 * 36
    assert long_prompt.num_output_tokens == 1  # sampled once its last chunk was computed


def test_budget_grows_with_the_decode_batch_and_keeps_prompts_moving():
    sched = _scheduler(target_itl_ms=0.0)
    sched.step_cost = FixedCost(fixed=0.010, per_token=0.001)
    assert sched.prefill_budget(0, 2048) == 2048  # no decode waits: the whole budget
    # 2 x cost(40 decodes) = 100 ms holds 90 tokens: 50 prompt tokens besides the 40 decodes.
    assert sched.prefill_budget(40, 2048 - 40) == 50
    sched.step_cost = FixedCost(fixed=0.5, per_token=0.01)
    assert sched.prefill_budget(40, 2048 - 40) == 90  # 2 x 0.9 s holds 130 tokens: 90 of prompt
    sched.step_cost = FixedCost(fixed=1.0, per_token=1.0)
    assert sched.prefill_budget(3, 100) == 16  # decodes alone past the target: one block's worth


def test_without_observations_the_budget_is_max_num_batched_tokens():
    sched = _scheduler(target_itl_ms=1.0, max_batched=64)
    assert sched.prefill_budget(5, 59) == 59


def test_target_itl_is_validated():
    with pytest.raises(ValueError, match="target_itl_ms"):
        EngineArgs(model="m", target_itl_ms=-1.0).validate()


def test_greedy_output_unchanged_when_prompts_are_chunked_next_to_decodes(llama_dir):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory="8MiB")
    engine = llm.engine
    # One token per ms: every step with decodes takes max(target, 2 x decodes) = few prompt tokens.
    engine.scheduler.step_cost = FixedCost(fixed=0.0, per_token=0.001)
    engine.scheduler.config.target_itl_ms = 0.0
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [tok.encode(p) for p in PROMPTS]
    chunked = []
    original = engine.scheduler.schedule

    def spy():
        out = original()
        if any(n == 1 for n in out.num_new_tokens):
            chunked.extend(n for n in out.num_new_tokens if n > 1)
        return out

    engine.scheduler.schedule = spy
    outputs = {}
    engine.add_request("0", prompts[0], params)
    pending = list(enumerate(prompts))[1:]
    while engine.has_unfinished_requests() or pending:
        if pending:  # a new prompt arrives every step, while the earlier ones decode
            index, ids = pending.pop(0)
            engine.add_request(str(index), ids, params)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    assert chunked and max(chunked) <= 16  # prompts were cut into one-block chunks beside the decodes
    for index, ids in enumerate(prompts):
        assert outputs[str(index)] == hf_greedy(str(llama_dir), tuple(ids), 12)
    assert_no_leak(engine)
