"""Model directory loading: configs old and new, sharded weights, dtype choice, clear errors, chat and embed."""

import json
import shutil

import pytest
import torch
from engine_utils import PROMPTS, assert_no_leak, hf_greedy

from fast_inference import LLM, SamplingParams
from fast_inference.models.config import SUPPORTED_ARCHITECTURES, load_model_config


def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("isa, dtype", [("avx2", torch.bfloat16), ("portable", torch.float32)])
def test_sharded_checkpoint_and_auto_dtype(llama_dir, monkeypatch, isa, dtype):
    # auto: bf16 wherever our bf16 kernels run (AVX2 and up), f32 on the portable path.
    monkeypatch.setenv("FI_CPU_ISA", isa)
    assert (llama_dir / "model.safetensors.index.json").is_file()
    cfg = load_model_config(llama_dir, "auto", torch.device("cpu"), None)
    assert cfg.dtype == dtype
    assert cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.eos_token_ids and cfg.max_model_len == 2048


def test_legacy_rope_scaling_keys_give_same_model(model_dirs, tmp_path):
    # transformers < 5 wrote rope_theta and rope_scaling at the top level instead of rope_parameters.
    src = model_dirs["mistral"]
    dst = _copy(src, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type": params["rope_type"], "factor": params["factor"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    llm = LLM(dst, dtype="float32", kv_cache_memory="4MiB")
    assert llm.engine.model_config.rope_scaling["type"] == "linear"
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[
        0
    ]
    assert out.outputs[0].token_ids == hf_greedy(str(src), tuple(ids), 12)


def test_unsupported_architecture_lists_supported(llama_dir, tmp_path):
    dst = _copy(llama_dir, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        LLM(dst, kv_cache_memory="1MiB")
    assert all(a in str(e.value) for a in SUPPORTED_ARCHITECTURES)


def test_missing_files_are_named(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        LLM(tmp_path / "nope")
    dst = _copy(llama_dir, tmp_path, "noconfig")
    (dst / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        LLM(dst)
    dst = _copy(llama_dir, tmp_path, "noshard")
    shard = sorted(dst.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        LLM(dst, kv_cache_memory="1MiB")
    dst = _copy(llama_dir, tmp_path, "notokenizer")
    (dst / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(dst, kv_cache_memory="1MiB")
    dst = _copy(llama_dir, tmp_path, "noweights")
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        LLM(dst, kv_cache_memory="1MiB")


def test_missing_lm_head_of_untied_model(model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = _copy(model_dirs["qwen3"], tmp_path)
    weights = load_file(dst / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head"):
        LLM(dst, kv_cache_memory="1MiB")


def test_chat_uses_template(llama_dir):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory="4MiB")
    messages = [{"role": "user", "content": "Hello, world!"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    expected = tok.encode("<|im_start|>user\nHello, world!<|im_end|>\n<|im_start|>assistant\n")
    assert out.prompt_token_ids == expected
    assert out.outputs[0].token_ids == hf_greedy(str(llama_dir), tuple(expected), 6)
    two = llm.chat(
        [messages, messages + [{"role": "assistant", "content": "Hi"}]],
        SamplingParams(temperature=0, max_tokens=3),
        use_tqdm=False,
    )
    assert len(two) == 2
    assert_no_leak(llm.engine)


def test_embed_matches_transformers_last_hidden_state(llama_dir):
    import transformers

    llm = LLM(llama_dir, dtype="float32", kv_cache_memory="4MiB")
    emb = llm.embed(PROMPTS[:3])
    assert emb.shape == (3, llm.engine.model_config.hidden_size) and emb.dtype == torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    tok = llm.get_tokenizer()
    for i, p in enumerate(PROMPTS[:3]):
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            h = model.model(ids).last_hidden_state[0, -1]
        torch.testing.assert_close(emb[i], torch.nn.functional.normalize(h, dim=-1), atol=1e-4, rtol=1e-4)
    assert_no_leak(llm.engine)
