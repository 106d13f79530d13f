"""Helpers of the engine tests: transformers greedy references and block-leak checks."""

import functools

import torch
import transformers

PROMPTS = [
    "Hello, world! How are",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Paris",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159. Code: def main(): return print",
    "Attention lets every token look back at the context; a paged key-value cache stores",
]


@functools.cache
def _hf_model(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@functools.cache
def hf_greedy(path: str, prompt_ids: tuple[int, ...], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt (batch of one: no padding), EOS ignored."""
    model = _hf_model(str(path))
    ids = torch.tensor([list(prompt_ids)])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


def assert_no_leak(engine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.num_total_blocks
    assert all(rc == 0 for rc in engine.block_manager.ref_counts)
