"""CUDA: decode steps replayed from captured CUDA graphs give the same tokens as eager execution and transformers."""

import pytest
from engine_utils import PROMPTS, assert_no_leak, hf_greedy

from fast_inference import LLM, SamplingParams

pytestmark = (
    pytest.mark.cuda
)  # skipped without a GPU, failed with a GPU and a CPU-only build (tests/conftest.py)


def test_cuda_graph_decode_matches_eager_and_transformers(llama_dir):
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    graphed = LLM(llama_dir, dtype="float32", device="cuda", kv_cache_memory="64MiB", max_num_seqs=8)
    assert graphed.engine.runner.graphs, "decode CUDA graphs were not captured"
    eager = LLM(llama_dir, dtype="float32", device="cuda", kv_cache_memory="64MiB", enforce_eager=True)
    a = graphed.generate(PROMPTS, params, use_tqdm=False)
    b = eager.generate(PROMPTS, params, use_tqdm=False)
    tok = graphed.get_tokenizer()
    for prompt, x, y in zip(PROMPTS, a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].token_ids == hf_greedy(str(llama_dir), tuple(tok.encode(prompt)), 16)
    assert_no_leak(graphed.engine)
    assert_no_leak(eager.engine)
