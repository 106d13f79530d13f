"""Greedy generation through the real ops is token-identical to transformers, under every scheduling mode."""

import pytest
from engine_utils import PROMPTS, assert_no_leak, hf_greedy

from fast_inference import LLM, SamplingParams, ops

MAX_NEW = 24


def _check_against_hf(llm: LLM, path, prompts=PROMPTS, max_new=MAX_NEW):
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == list(prompts)
    for prompt, out in zip(prompts, outs):
        ids = tok.encode(prompt)
        assert out.prompt_token_ids == ids
        ref = hf_greedy(str(path), tuple(ids), max_new)
        assert out.outputs[0].token_ids == ref, f"mismatch for prompt {prompt!r}"
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].text == tok.decode(ref, skip_special_tokens=True)
    assert_no_leak(llm.engine)
    return outs


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_transformers(model_dirs, name):
    llm = LLM(model_dirs[name], dtype="float32", kv_cache_memory="8MiB")
    cfg = llm.engine.model_config
    assert cfg.architecture.lower().startswith(name)
    _check_against_hf(llm, model_dirs[name])


def test_preemption_keeps_output_identical(llama_dir):
    # 4 blocks of 16 tokens: far less than the batch needs, so the youngest requests are preempted
    # and recomputed, several times.
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * 16
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory=4 * bytes_per_block)
    assert llm.engine.num_total_blocks == 4
    _check_against_hf(llm, llama_dir)
    assert llm.engine.stats()["num_preemptions"] > 0


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prefix_caching_on_and_off(llama_dir, prefix_caching):
    shared = PROMPTS[1] + " " + PROMPTS[4]
    prompts = [shared + " one", shared + " two", shared, shared + " three four"]
    llm = LLM(
        llama_dir,
        dtype="float32",
        kv_cache_memory="8MiB",
        enable_prefix_caching=prefix_caching,
        max_num_seqs=1,
    )  # one at a time, so later requests find the earlier ones' blocks cached
    _check_against_hf(llm, llama_dir, prompts)
    hit_rate = llm.engine.stats()["prefix_cache_hit_rate"]
    assert (hit_rate > 0.5) if prefix_caching else (hit_rate == 0.0)
    # A second round hits the cache (freed cached blocks survive on the LRU list) and stays identical.
    outs = _check_against_hf(llm, llama_dir, prompts)
    if prefix_caching:
        assert all(o.num_cached_tokens >= 16 for o in outs)


def test_chunked_prefill_mixes_decodes_and_chunks(llama_dir):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=7)
    engine = llm.engine
    seen_mixed = False
    original = engine.scheduler.schedule

    def spy():
        out = original()
        news = out.num_new_tokens
        nonlocal seen_mixed
        seen_mixed |= any(n == 1 for n in news) and any(n > 1 for n in news)
        assert sum(news) <= 7
        return out

    engine.scheduler.schedule = spy
    _check_against_hf(llm, llama_dir)
    assert seen_mixed


def test_token_id_prompts_and_single_prompt(llama_dir):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory="8MiB")
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPTS[0])
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    by_ids = llm.generate([ids], params, use_tqdm=False)[0]
    by_text = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    assert by_ids.prompt is None and by_ids.prompt_token_ids == ids
    assert (
        by_ids.outputs[0].token_ids
        == by_text.outputs[0].token_ids
        == hf_greedy(str(llama_dir), tuple(ids), 8)
    )
    assert_no_leak(llm.engine)


def test_bfloat16_runs(llama_dir):
    llm = LLM(llama_dir, dtype="bfloat16", kv_cache_memory="8MiB")
    outs = llm.generate(
        PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    assert_no_leak(llm.engine)


@pytest.mark.parametrize("cpu_kind", ["this_cpu", "avx512_no_amx", "avx2_only", "portable"])
def test_bfloat16_decode_paths_agree(llama_dir, monkeypatch, cpu_kind):
    # One prompt decoded alone (1 row) and inside a batch of 10 gives the same greedy tokens, on the VNNI
    # tiles every x86 kernel path runs (AMX, AVX512_BF16 or AVX2 register tiles), and on the row layout of
    # the portable build. FI_CPU_ISA=avx512 turns AMX off; avx2 makes the kernels and the bf16 gate behave
    # as on an AVX2-only CPU.
    if cpu_kind != "this_cpu":
        monkeypatch.setenv("FI_CPU_ISA", cpu_kind.split("_")[0])
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm = LLM(llama_dir, dtype="bfloat16", kv_cache_memory="8MiB")
    proj = llm.engine.runner.model.layers[0].mlp.down_proj
    # One copy, every size through ops.linear: no oneDNN bf16 reorder (it raises on AVX2-only CPUs).
    assert proj.weight.dim() == (2 if ops.cpu_isa() == "portable" else 3)
    assert proj.op_rows >= 10
    alone = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate([PROMPTS[1]] * 10, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batch] == [alone] * 10


def test_tied_head_is_one_tiled_copy(tmp_path):
    # A tied bf16 table becomes the head's VNNI tiles only (no row copy); token lookups gather their rows
    # from the tiles, exactly the checkpoint's rows, and decoding alone or in a batch agrees. The test
    # tokenizer has 655 tokens, so the table is padded to 656 rows (as real checkpoints pad theirs) to tile.
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from fast_inference.models.demo import build_model_dir
    from fast_inference.models.llama import _rows_of_tiles

    path = build_model_dir(tmp_path / "tied", "Qwen2ForCausalLM", tie_word_embeddings=True, seed=3)
    (weights_file,) = path.glob("*.safetensors")
    weights = load_file(weights_file)
    table = weights["model.embed_tokens.weight"]
    rows = -(-table.shape[0] // 16) * 16
    weights["model.embed_tokens.weight"] = torch.cat(
        (table, table.new_zeros(rows - table.shape[0], table.shape[1]))
    )
    save_file(weights, weights_file, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = rows
    (path / "config.json").write_text(json.dumps(config))

    llm = LLM(path, dtype="bfloat16", kv_cache_memory="8MiB")
    model = llm.engine.runner.model
    if ops.cpu_isa() == "portable":
        assert model.lm_head_tiles is None and model.embed_tokens.numel() > 0
        return
    assert model.lm_head_tiles is not None and model.embed_tokens.numel() == 0
    ids = torch.tensor([0, 1, 17, rows - 1, 17])
    want = weights["model.embed_tokens.weight"].bfloat16()[ids]
    assert torch.equal(_rows_of_tiles(model.lm_head_tiles, ids), want)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate([PROMPTS[0]] * 3, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batch] == [alone] * 3


def test_untiled_bf16_weight_runs_our_kernels_for_every_size():
    # A bf16 weight whose shape does not tile (K % 32) keeps its row layout, one copy, and ops.linear
    # runs it for every size (GEMV, blocked GEMM or at::linear): no oneDNN weight reorder anywhere.
    import sys

    import torch

    from fast_inference.models.llama import Linear

    torch.manual_seed(0)
    layer = Linear(40, 24, bias=True, dtype=torch.bfloat16, device=torch.device("cpu"))
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    xs = {m: torch.randn(m, 40).bfloat16() for m in (1, 10, 300)}
    ref = {m: x.double() @ layer.weight.double().t() + layer.bias.double() for m, x in xs.items()}
    layer.prepack()
    assert layer.weight.shape == (24, 40) and layer.op_rows == sys.maxsize
    for m, x in xs.items():
        torch.testing.assert_close(layer(x).double(), ref[m], atol=0.05, rtol=0.02)


def test_decoder_embeddings_match_transformers_in_packed_batches(llama_dir):
    """LLMEngine.embed: the normalised last hidden state of transformers' forward, the same whether the
    inputs share one forward or are packed into many (token budget 16), with every borrowed block back."""
    import torch
    from engine_utils import _hf_model

    from fast_inference.engine.embed_batches import packed_batches

    assert list(packed_batches([5, 9, 3, 20, 1], max_tokens=12, max_seqs=2)) == [
        (0, 1),
        (1, 3),
        (3, 4),
        (4, 5),
    ]
    wide = LLM(llama_dir, dtype="float32", kv_cache_memory="8MiB")
    narrow = LLM(
        llama_dir, dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=16, max_num_seqs=2
    )
    tok = wide.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    model = _hf_model(str(llama_dir))
    with torch.no_grad():
        want = torch.stack(
            [model(torch.tensor([x]), output_hidden_states=True).hidden_states[-1][0, -1] for x in ids]
        )
    want = torch.nn.functional.normalize(want.float(), dim=-1)
    for llm in (wide, narrow):
        got = llm.engine.embed(ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert_no_leak(llm.engine)
