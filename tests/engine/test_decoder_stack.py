"""The C++ DecoderStack (csrc/cpu/decoder_stack.cpp) against the Python layers it replaces on CPU: bit-identical
hidden states on every path (dense bf16 fused kernels / oneDNN / f32 torch ops, quantized and mixed-format
projections, q/k norm, qkv bias), for prefill, chunked and decode steps."""

import pytest
import torch
from gguf import GGMLQuantizationType as GT
from test_gguf import write_gguf

from fast_inference import LLM
from fast_inference.models.demo import build_model_dir
from fast_inference.ops.attention_metadata import build_metadata


def _forward_both(model, block_size: int):
    """Run three steps (a two-sequence prefill, a chunk on one of them, a two-row decode) with the stack and
    with the Python layers; return the pairs of hidden states. The cache ends up holding the same K/V either
    way (each step writes identical values before it reads them)."""
    steps = [
        ([[0, 1], [2]], [0, 0], [7, 5]),  # block tables, start positions, new tokens
        ([[0, 1]], [7], [6]),
        ([[0, 1], [2]], [13, 5], [1, 1]),
    ]
    stack = model.layer_stack
    assert stack is not None
    pairs = []
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        for tables, starts, num_new in steps:
            positions, meta = build_metadata(tables, starts, num_new, block_size, torch.device("cpu"))
            ids = torch.randint(0, vocab, (sum(num_new),), generator=gen)
            model.layer_stack = stack
            fused = model(ids, positions, meta)
            model.layer_stack = None
            python = model(ids, positions, meta)
            pairs.append((fused, python))
    model.layer_stack = stack
    return pairs


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_stack_equals_python_layers_dense(model_dirs, name, dtype):
    llm = LLM(model_dirs[name], dtype=dtype, kv_cache_memory="4MiB", block_size=16)
    for fused, python in _forward_both(llm.engine.runner.model, 16):
        assert torch.equal(fused, python)


@pytest.mark.parametrize("qtype", [GT.Q4_1, GT.Q8_0, GT.Q4_K])
def test_stack_equals_python_layers_quantized(tmp_path, qtype):
    # Q4_K on attn_v is written as Q6_K (a Q4_K_M-style mix): the qkv projection has parts in two formats.
    kquant = qtype == GT.Q4_K
    hf = build_model_dir(
        tmp_path / "hf",
        "Qwen2ForCausalLM",
        hidden_size=256 if kquant else 64,
        intermediate_size=512 if kquant else 128,
        num_heads=4,
        num_kv_heads=2,
        seed=3,
    )
    overrides = {"v_proj.weight": GT.Q6_K} if kquant else None
    write_gguf(hf, tmp_path / "m.gguf", qtype, "qwen2", overrides)
    llm = LLM(str(tmp_path / "m.gguf"), kv_cache_memory="4MiB", block_size=16)
    model = llm.engine.runner.model
    if kquant:
        assert len(model.layers[0].self_attn.qkv_proj.parts) > 1
    for fused, python in _forward_both(model, 16):
        assert torch.equal(fused, python)
    ids = torch.tensor([3, 70, 17, 3])  # the token lookup: one row (slices) equals the batched rows
    batched = model.embedding.embed(ids)
    for i in range(len(ids)):
        assert torch.equal(model.embedding.embed(ids[i : i + 1]), batched[i : i + 1])


def test_stack_without_cache_says_so():
    stack = torch.classes.fast_inference.DecoderStack(2, 1, 8, 16, 1e-5, 8**-0.5)
    x = torch.zeros(1, 16)
    idx = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="bind_kv_cache"):
        stack.forward(
            x, x[:, :8], x[:, :8], idx.long(), idx.view(1, 1), idx + 1, torch.tensor([0, 1]).int(), True
        )


@pytest.mark.parametrize("qtype", [GT.Q4_1, GT.Q8_0])
def test_decode_rows_are_batch_invariant(tmp_path, qtype):
    # A decode step's quantized projections (and the head) run each row through the decode GEMV, 8 rows at a
    # time: 12 sequences decoded together give the same hidden states and logits as the same rows in steps of
    # 8 and 4 (where they would otherwise go through the dequantized slabs above 8 rows), or next to a prompt.
    hf = build_model_dir(tmp_path / "hf", hidden_size=64, intermediate_size=128, seed=4)
    write_gguf(hf, tmp_path / "m.gguf", qtype)
    llm = LLM(str(tmp_path / "m.gguf"), kv_cache_memory="4MiB", block_size=16)
    model = llm.engine.runner.model
    cpu = torch.device("cpu")
    n = 12
    tables = [[i] for i in range(n)]
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        positions, meta = build_metadata(tables, [0] * n, [5] * n, 16, cpu)  # prefill, 5 tokens each
        model(torch.randint(0, 100, (5 * n,), generator=gen), positions, meta)
        ids = torch.randint(0, 100, (n,), generator=gen)
        positions, meta = build_metadata(tables, [5] * n, [1] * n, 16, cpu)
        together = model(ids, positions, meta)
        logits = model.compute_logits(together)
        apart = []
        for rows in (slice(0, 8), slice(8, n)):
            positions, meta = build_metadata(
                tables[rows], [5] * len(ids[rows]), [1] * len(ids[rows]), 16, cpu
            )
            apart.append(model(ids[rows], positions, meta))
        apart = torch.cat(apart)
        # The same decode rows ahead of a prompt chunk of another sequence (a mixed step; prompt rows on the slabs)
        positions, meta = build_metadata(tables + [[n, n + 1]], [5] * n + [0], [1] * n + [20], 16, cpu)
        mixed = model(torch.cat([ids, torch.randint(0, 100, (20,), generator=gen)]), positions, meta)
    assert torch.equal(together, apart)
    assert torch.equal(mixed[:n], together)
    assert torch.equal(logits, torch.cat([model.compute_logits(apart[:8]), model.compute_logits(apart[8:])]))
