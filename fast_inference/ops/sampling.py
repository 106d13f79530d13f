"""Python wrappers for the sampling kernels: fused filtered sampling, penalties, logit bias, token bitmask,
logprobs.

Every check lives in the C++ ops (csrc/checks/sampling_checks.h), the same for CPU and CUDA tensors:
wrong shapes, dtypes or devices raise RuntimeError, bad values (NaN logits, parameters out of range,
ragged offsets, token ids) raise ValueError, each naming the argument. The value checks read the
tensors on the host, so on CUDA they are skipped while a CUDA graph is being captured; whatever the
values, the CUDA kernels never access memory out of bounds (out-of-range token ids are skipped, and
a row that cannot be sampled gets a negative token: -1 for NaN/+inf logits, -2 for all -inf).
"""

import torch

import fast_inference._C as _C

# The most top logprobs per token (OpenAI's limit): defined once, in csrc/checks/sampling_checks.h.
MAX_LOGPROBS: int = _C.MAX_LOGPROBS


def sample(
    logits: torch.Tensor,  # float [B, V] (float32, float16 or bfloat16; stride(1) == 1)
    temperature: torch.Tensor,  # f32 [B]; 0 = greedy
    top_k: torch.Tensor,  # int32 [B]; <= 0 or >= V: off
    top_p: torch.Tensor,  # f32 [B] in (0, 1]; 1: off
    min_p: torch.Tensor,  # f32 [B] in [0, 1]; 0: off
    seeds: torch.Tensor,  # int64 [B]
    offsets: torch.Tensor,  # int64 [B]
) -> torch.Tensor:  # int64 [B]
    """Draw one token per row from softmax(logits / T) filtered by top-k, then top-p, then min-p.

    Temperature 0 is the exact argmax (lowest index on ties). Top-k keeps the logits >= the k-th
    largest (ties kept); top-p keeps the smallest set of most likely top-k tokens holding >= top_p of
    the top-k mass (ties at the threshold kept); min-p keeps p >= min_p * max(p); the survivors are
    renormalized. The draw uses one Philox4x32-10 number keyed by (seeds[b], offsets[b]) alone, so a
    row gives the same token whatever the batch, and CPU and CUDA give the same token. The exact
    semantics are those of fast_inference.ops.reference.sample.
    """
    return torch.ops.fast_inference.sample(logits, temperature, top_k, top_p, min_p, seeds, offsets)


def apply_penalties(
    logits: torch.Tensor,  # float [B, V], modified in place
    prompt_token_ids: torch.Tensor,  # int64 [total_prompt]; row b owns [prompt_cu_lens[b], prompt_cu_lens[b+1])
    prompt_cu_lens: torch.Tensor,  # int32 [B + 1]
    output_token_ids: torch.Tensor,  # int64 [total_output]; row b owns [output_cu_lens[b], output_cu_lens[b+1])
    output_cu_lens: torch.Tensor,  # int32 [B + 1]
    presence_penalty: torch.Tensor,  # f32 [B]; 0: off
    frequency_penalty: torch.Tensor,  # f32 [B]; 0: off
    repetition_penalty: torch.Tensor,  # f32 [B] > 0; 1: off
) -> None:
    """Penalize repeated tokens in place, for a whole batch from ragged token lists.

    First the repetition penalty (Hugging Face RepetitionPenaltyLogitsProcessor): each distinct token
    of the prompt or the output, once: x > 0 ? x / r : x * r. Then presence and frequency penalties
    (OpenAI), over output tokens only: x -= presence * (count > 0) + frequency * count.
    """
    torch.ops.fast_inference.apply_penalties(
        logits,
        prompt_token_ids,
        prompt_cu_lens,
        output_token_ids,
        output_cu_lens,
        presence_penalty,
        frequency_penalty,
        repetition_penalty,
    )


def apply_logit_bias(
    logits: torch.Tensor,  # float [B, V], modified in place
    token_ids: torch.Tensor,  # int64 [total]; row b owns [cu_lens[b], cu_lens[b+1])
    biases: torch.Tensor,  # f32 [total]
    cu_lens: torch.Tensor,  # int32 [B + 1]
) -> None:
    """Add per-row sparse biases in list order (duplicates add up); a bias of -inf masks the token,
    which is how min_tokens hides EOS and stop tokens until the minimum length is reached."""
    torch.ops.fast_inference.apply_logit_bias(logits, token_ids, biases, cu_lens)


def apply_token_bitmask(
    logits: torch.Tensor,  # float [B, V] (float32, float16 or bfloat16; stride(1) == 1), modified in place
    bitmask: torch.Tensor,  # int32 [B, ceil(V / 32)]: bit v % 32 of word v // 32 set = token v allowed
    indices: torch.Tensor | None = None,  # int32 [K]: the rows to mask; None: every row
) -> None:
    """Grammar-constrained decoding: set logits[b, v] = -inf for every token v the row's bitmask
    disallows, for the rows in indices (bitmask row b always belongs to logits row b; the other rows
    are left alone). Bits past V in the last word are ignored. The layout is the one xgrammar fills.
    On CUDA nothing synchronizes with the host: out-of-range indices are skipped there, while the CPU
    op refuses them (ValueError naming indices)."""
    torch.ops.fast_inference.apply_token_bitmask(logits, bitmask, indices)


def compute_logprobs(
    logits: torch.Tensor,  # float [B, V], raw model logits (before temperature and filtering)
    token_ids: torch.Tensor,  # int64 [B], the chosen tokens
    num_top: int,  # 0..MAX_LOGPROBS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # f32 [B], int64 [B, num_top], f32 [B, num_top]
    """Log-probability of each chosen token and the num_top most likely tokens (descending, ties by
    lower id), from log_softmax(logits), in one fused pass per row."""
    return torch.ops.fast_inference.compute_logprobs(logits, token_ids, num_top)
