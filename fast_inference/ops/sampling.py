"""Python wrappers for the sampling kernels: fused filtered sampling, penalties, logit bias, logprobs."""

import torch


def sample(
    logits: torch.Tensor,  # float [B, V]
    temperature: torch.Tensor,  # f32 [B]; 0 = greedy
    top_k: torch.Tensor,  # int32 [B]; <= 0 or >= V: off
    top_p: torch.Tensor,  # f32 [B]; 1: off
    min_p: torch.Tensor,  # f32 [B]; 0: off
    seeds: torch.Tensor,  # int64 [B]
    offsets: torch.Tensor,  # int64 [B]
) -> torch.Tensor:  # int64 [B]
    """Draw one token per row from softmax(logits / T) filtered by top-k, then top-p, then min-p."""
    return torch.ops.fast_inference.sample(logits, temperature, top_k, top_p, min_p, seeds, offsets)


def apply_penalties(
    logits: torch.Tensor,  # float [B, V], modified in place
    prompt_token_ids: torch.Tensor,  # int64 [total_prompt]
    prompt_cu_lens: torch.Tensor,  # int32 [B + 1]
    output_token_ids: torch.Tensor,  # int64 [total_output]
    output_cu_lens: torch.Tensor,  # int32 [B + 1]
    presence_penalty: torch.Tensor,  # f32 [B]
    frequency_penalty: torch.Tensor,  # f32 [B]
    repetition_penalty: torch.Tensor,  # f32 [B]
) -> None:
    """Presence/frequency penalties (over generated tokens) and repetition penalty (prompt + generated)."""
    torch.ops.fast_inference.apply_penalties(
        logits, prompt_token_ids, prompt_cu_lens, output_token_ids, output_cu_lens,
        presence_penalty, frequency_penalty, repetition_penalty,
    )


def apply_logit_bias(
    logits: torch.Tensor,  # float [B, V], modified in place
    token_ids: torch.Tensor,  # int64 [total]
    biases: torch.Tensor,  # f32 [total]
    cu_lens: torch.Tensor,  # int32 [B + 1]
) -> None:
    """Add per-row sparse biases; a bias of -inf masks the token (how min_tokens hides EOS)."""
    torch.ops.fast_inference.apply_logit_bias(logits, token_ids, biases, cu_lens)


def compute_logprobs(
    logits: torch.Tensor,  # float [B, V], raw model logits
    token_ids: torch.Tensor,  # int64 [B], the chosen tokens
    num_top: int,  # 0..20
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probability of each chosen token and the num_top most likely tokens, from log_softmax(logits)."""
    return torch.ops.fast_inference.compute_logprobs(logits, token_ids, num_top)
