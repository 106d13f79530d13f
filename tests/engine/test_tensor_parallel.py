"""Tensor parallelism on CPU (gloo over loopback): tensor_parallel_size=2 against one process for llama, qwen2
(one KV head: replicated) and qwen3, greedy and seeded sampling, chunked prefill, embeddings, quantized
weights (at load and GGUF), the size checks, a killed worker, and no process left behind."""

import dataclasses
import os
import signal
import time

import pytest
import torch

from fast_inference import LLM, SamplingParams
from fast_inference.engine.distributed import (
    MESSAGE_WORDS,
    TensorParallelError,
    _Step,
    pack_step,
    unpack_step,
)
from fast_inference.models.config import load_model_config
from fast_inference.models.demo import build_model_dir
from fast_inference.models.parallel_layers import (
    TensorParallel,
    check_tensor_parallel,
    kv_heads_of_rank,
    vocab_shard,
)

gguf = pytest.importorskip("gguf")

# Below this top-2 log-probability gap in the single-process run, the other summation order of the
# all-reduce (rank partial sums added in another order: differences ~1e-6) may pick the other token.
NEAR_TIE = 1e-4

MODELS = {
    "llama": dict(architecture="LlamaForCausalLM", tie_word_embeddings=False),
    "qwen2": dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True, num_kv_heads=1),
    "qwen3": dict(architecture="Qwen3ForCausalLM", tie_word_embeddings=False, head_dim=32),
}
PROMPTS = [
    "Hello, world! How are",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "Language models predict the next token from the tokens before it.",
    "Paris",
    [5, 17, 300, 2, 2, 9],
]
# A small token budget: the long prompt is prefilled in chunks next to the others' decode steps.
ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory="4MiB", max_num_batched_tokens=32)


def child_pids() -> set[int]:
    """Live (non-zombie) child processes of this process."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.add(int(entry))
    return found


def assert_greedy_agrees(reference, other) -> None:
    """Token-identical, or identical up to the first position where the reference's top-2 gap is below
    NEAR_TIE (the reference ran with logprobs=2); past that position nothing is compared."""
    for ref, out in zip(reference, other, strict=True):
        want, got = ref.outputs[0].token_ids, out.outputs[0].token_ids
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            top = sorted((lp.logprob for lp in ref.outputs[0].logprobs[i].values()), reverse=True)
            if top[0] - top[1] < NEAR_TIE:
                break
            assert a == b, (i, want, got)


def test_sizes_the_heads_do_not_allow_are_refused_before_any_process_starts(model_dirs):
    cfg = load_model_config(model_dirs["llama"], "float32", torch.device("cpu"), None)  # 4 heads, 2 KV heads
    before = child_pids()
    with pytest.raises(
        ValueError, match="tensor_parallel_size=3 does not divide the model's 4 attention heads"
    ):
        LLM(str(model_dirs["llama"]), tensor_parallel_size=3, **ENGINE)
    assert child_pids() == before
    with pytest.raises(ValueError, match="6 KV heads or be a multiple of it"):
        check_tensor_parallel(dataclasses.replace(cfg, num_heads=12, num_kv_heads=6), 4)
    with pytest.raises(ValueError, match="intermediate_size 130"):
        check_tensor_parallel(dataclasses.replace(cfg, intermediate_size=130), 4)
    with pytest.raises(ValueError, match="not a whole number of 32-value blocks"):
        check_tensor_parallel(dataclasses.replace(cfg, quantization="q8_0"), 4)  # 64 / 4 = 16 columns
    check_tensor_parallel(cfg, 4)  # 4 heads, 2 KV heads replicated twice, 128 / 4 intermediate rows


def test_shard_arithmetic(model_dirs):
    cfg = load_model_config(model_dirs["llama"], "float32", torch.device("cpu"), None)
    # KV heads: a share each when they divide, else one replicated head per group of ranks.
    assert [kv_heads_of_rank(cfg, TensorParallel(r, 2)) for r in range(2)] == [(0, 1), (1, 1)]
    assert [kv_heads_of_rank(cfg, TensorParallel(r, 4)) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    # Vocabulary: ceil(V / N) rows each, the last shard padded.
    assert [vocab_shard(655, TensorParallel(r, 2)) for r in range(2)] == [(0, 328, 328), (328, 327, 328)]
    step = _Step(1, list(range(MESSAGE_WORDS)), [0, 7], [MESSAGE_WORDS - 1, 1], [5, 6], [[1, 2, 3], [4]])
    words = pack_step(step)
    assert words.numel() > MESSAGE_WORDS  # a prefill this large takes the two-broadcast path
    back = unpack_step(words)
    assert back.input_ids == step.input_ids and back.block_tables == [[1, 2, 3], [4, 0, 0]]


def test_quantized_at_load_matches_single_process(model_dirs):
    path = str(model_dirs["qwen3"])  # head_dim 32: o_proj's row-parallel slice is 64 columns, whole blocks
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    reference = LLM(path, quantization="q8_0", **ENGINE).generate(PROMPTS, params, use_tqdm=False)
    with LLM(path, quantization="q8_0", tensor_parallel_size=2, **ENGINE) as parallel:
        assert_greedy_agrees(reference, parallel.generate(PROMPTS, params, use_tqdm=False))


def test_gguf_shards_whole_blocks_and_refuses_split_ones(tmp_path):
    """Q8_0 rows split at 32-value boundaries equal one process; a K-quant split mid-block is refused."""
    from test_gguf import write_gguf

    hf = build_model_dir(tmp_path / "hf", hidden_size=64, intermediate_size=128, seed=5)
    q8 = tmp_path / "q8.gguf"
    write_gguf(hf, q8, gguf.GGMLQuantizationType.Q8_0)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    reference = LLM(str(q8), **ENGINE).generate(PROMPTS[:3], params, use_tqdm=False)
    with LLM(str(q8), tensor_parallel_size=2, **ENGINE) as parallel:
        assert_greedy_agrees(reference, parallel.generate(PROMPTS[:3], params, use_tqdm=False))
    # Q4_K blocks hold 256 values: o_proj's 128-column slice of 256 would split them (the file's tensor
    # table says so before any process starts).
    wide = build_model_dir(tmp_path / "wide", hidden_size=256, intermediate_size=512, seed=5)
    k4 = tmp_path / "q4k.gguf"
    write_gguf(wide, k4, gguf.GGMLQuantizationType.Q4_K)
    before = child_pids()
    with pytest.raises(ValueError, match="Q4_K .* splits a block"):
        LLM(str(k4), tensor_parallel_size=2, **ENGINE)
    assert child_pids() == before


def test_killed_worker_is_detected_and_nothing_survives(model_dirs):
    before = child_pids()
    engine = {**ENGINE, "max_num_batched_tokens": 2048}
    llm = LLM(str(model_dirs["llama"]), tensor_parallel_size=2, **engine)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    # A 1500-token prefill: its step message is larger than the fixed buffer (the two-broadcast path).
    long_prompt = [(7 * i) % 600 + 3 for i in range(1500)]
    want = LLM(str(model_dirs["llama"]), **engine).generate([long_prompt], params, use_tqdm=False)
    assert (
        llm.generate([long_prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        == want[0].outputs[0].token_ids
    )
    (worker,) = llm.engine.runner.workers
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    with pytest.raises(TensorParallelError, match=rf"worker rank 1 \(pid {worker.pid}\) exited with code -9"):
        llm.generate(["Hello again"], params, use_tqdm=False)
    with pytest.raises(TensorParallelError, match="group is down"):  # and it stays down
        llm.generate(["Hello again"], params, use_tqdm=False)
    llm.close()
    deadline = time.monotonic() + 5
    while child_pids() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child_pids() <= before


# Last in the file: one tensor-parallel engine per process at a time (torch.distributed's default group),
# and the module-scoped pair below stays open until the module ends.
@pytest.fixture(scope="module", params=list(MODELS))
def engines(request, tmp_path_factory):
    """(single-process LLM, tensor_parallel_size=2 LLM) on the same tiny random model; closing the second
    must leave no process behind."""
    path = build_model_dir(tmp_path_factory.mktemp(request.param), seed=11, **MODELS[request.param])
    before = child_pids()
    single = LLM(str(path), **ENGINE)
    parallel = LLM(str(path), tensor_parallel_size=2, **ENGINE)
    assert len(child_pids() - before) == 1  # one worker: rank 0 is this process
    yield single, parallel
    parallel.close()
    assert child_pids() <= before


def test_greedy_matches_single_process(engines):
    single, parallel = engines
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    reference = single.generate(PROMPTS, params, use_tqdm=False)
    assert_greedy_agrees(reference, parallel.generate(PROMPTS, params, use_tqdm=False))
    assert parallel.engine.block_manager.num_free_blocks == parallel.engine.num_total_blocks


def test_seeded_sampling_matches_single_process(engines):
    # Same seed, same logits up to ~1e-6: a draw flips only if it lands that close to a boundary of the
    # cumulative distribution (odds ~1e-6 per token), so the tokens are required to be identical.
    single, parallel = engines
    params = SamplingParams(
        temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16, n=2, ignore_eos=True
    )
    want = [[c.token_ids for c in o.outputs] for o in single.generate(PROMPTS, params, use_tqdm=False)]
    got = [[c.token_ids for c in o.outputs] for o in parallel.generate(PROMPTS, params, use_tqdm=False)]
    assert got == want


def test_embeddings_match_single_process(engines):
    single, parallel = engines
    texts = ["Hello, world!", "The quick brown fox jumps over the lazy dog."]
    torch.testing.assert_close(parallel.embed(texts), single.embed(texts), atol=1e-5, rtol=1e-5)
