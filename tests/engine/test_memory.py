"""Resident memory stays flat over 1000 requests through the engine, and every block comes back."""

import gc

from engine_utils import PROMPTS, assert_no_leak

from fast_inference.engine.config import EngineArgs
from fast_inference.engine.llm_engine import LLMEngine
from fast_inference.engine.sampling_params import SamplingParams


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_thousand_requests_leave_memory_flat(llama_dir):
    engine = LLMEngine(
        EngineArgs(model=str(llama_dir), dtype="float32", kv_cache_memory="2MiB", max_num_seqs=64)
    )
    params = [
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=4, seed=1, stop=["e"], logprobs=2),
        SamplingParams(temperature=0.8, max_tokens=2, n=2, ignore_eos=True),
    ]
    rss = {}
    done = 0
    for batch in range(20):
        for i in range(50):
            k = batch * 50 + i
            engine.add_request(f"r{k}", PROMPTS[k % len(PROMPTS)] + f" {k}", params[k % len(params)])
        if batch % 7 == 3:
            engine.abort_request([f"r{batch * 50 + j}" for j in range(0, 50, 5)])
        while engine.has_unfinished_requests():
            done += sum(o.finished for o in engine.step())
        if batch in (3, 19):
            gc.collect()
            rss[batch] = _rss_bytes()
    assert done == 1000
    assert_no_leak(engine)
    growth = rss[19] - rss[3]
    assert growth < 8 * (1 << 20), f"RSS grew by {growth / (1 << 20):.1f} MiB between 200 and 1000 requests"
