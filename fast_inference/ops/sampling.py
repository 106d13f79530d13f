"""Python wrappers for the sampling kernels: fused filtered sampling, penalties, logit bias, logprobs.

CPU tensors are fully validated in C++ (shapes, dtypes, devices and values, NaN logits included).
For CUDA tensors the kernels check shapes, dtypes and devices; checks that read values would need a
host synchronisation, which a CUDA graph cannot contain, so these wrappers run them only when the
current stream is not capturing and `check_values` is true. Whatever the values, the CUDA kernels
never access memory out of bounds: out-of-range token ids are skipped, and a row that cannot be
sampled (NaN or +inf logits, or all -inf) yields token -1, which the caller sees when it copies the
tokens to the host.
"""

import torch

MAX_LOGPROBS = 20


def _checking(t: torch.Tensor, check_values: bool) -> bool:
    return check_values and t.is_cuda and not torch.cuda.is_current_stream_capturing()


def _check_logits_values(logits: torch.Tensor) -> None:
    row_max = logits.amax(dim=-1).float()  # NaN propagates through amax
    bad = torch.isnan(row_max) | torch.isposinf(row_max) | torch.isneginf(row_max)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        if torch.isneginf(row_max[row]):
            raise ValueError(f"logits row {row} has no finite value (all -inf): nothing can be sampled")
        raise ValueError(f"logits row {row} contains NaN or +inf")


def _check_ragged_values(
    ids: torch.Tensor, ids_name: str, cu_lens: torch.Tensor, cu_name: str, vocab: int
) -> None:
    cu = cu_lens.cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"{cu_name}[0] must be 0, got {int(cu[0])}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{cu_name} must be non-decreasing")
    if int(cu[-1]) != ids.numel():
        raise ValueError(
            f"{cu_name}[-1] must equal the length of {ids_name} ({ids.numel()}), got {int(cu[-1])}"
        )
    if ids.numel() and bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"{ids_name} must hold token ids in [0, {vocab})")


def sample(
    logits: torch.Tensor,  # float [B, V] (float32, float16 or bfloat16; stride(1) == 1)
    temperature: torch.Tensor,  # f32 [B]; 0 = greedy
    top_k: torch.Tensor,  # int32 [B]; <= 0 or >= V: off
    top_p: torch.Tensor,  # f32 [B] in (0, 1]; 1: off
    min_p: torch.Tensor,  # f32 [B] in [0, 1]; 0: off
    seeds: torch.Tensor,  # int64 [B]
    offsets: torch.Tensor,  # int64 [B]
    *,
    check_values: bool = True,
) -> torch.Tensor:  # int64 [B]
    """Draw one token per row from softmax(logits / T) filtered by top-k, then top-p, then min-p.

    Temperature 0 is the exact argmax (lowest index on ties). Top-k keeps the logits >= the k-th
    largest (ties kept); top-p keeps the smallest set of most likely top-k tokens holding >= top_p of
    the top-k mass (ties at the threshold kept); min-p keeps p >= min_p * max(p); the survivors are
    renormalized. The draw uses one Philox4x32-10 number keyed by (seeds[b], offsets[b]) alone, so a
    row gives the same token whatever the batch, and CPU and CUDA give the same token. The exact
    semantics are those of fast_inference.ops.reference.sample.
    """
    if _checking(logits, check_values):
        _check_logits_values(logits)
        bad_t = ~torch.isfinite(temperature) | (temperature < 0)
        bad_p = ~((top_p > 0) & (top_p <= 1))
        bad_m = ~((min_p >= 0) & (min_p <= 1))
        flags = torch.stack([bad_t.any(), bad_p.any(), bad_m.any()]).cpu()
        for flag, message in zip(
            flags.tolist(),
            ("temperature must be finite and >= 0", "top_p must be in (0, 1]", "min_p must be in [0, 1]"),
        ):
            if flag:
                raise ValueError(message)
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
    *,
    check_values: bool = True,
) -> None:
    """Penalize repeated tokens in place, for a whole batch from ragged token lists.

    First the repetition penalty (Hugging Face RepetitionPenaltyLogitsProcessor): each distinct token
    of the prompt or the output, once: x > 0 ? x / r : x * r. Then presence and frequency penalties
    (OpenAI), over output tokens only: x -= presence * (count > 0) + frequency * count.
    """
    if _checking(logits, check_values):
        vocab = logits.shape[1]
        _check_ragged_values(prompt_token_ids, "prompt_token_ids", prompt_cu_lens, "prompt_cu_lens", vocab)
        _check_ragged_values(output_token_ids, "output_token_ids", output_cu_lens, "output_cu_lens", vocab)
        if bool((~torch.isfinite(repetition_penalty) | (repetition_penalty <= 0)).any()):
            raise ValueError("repetition_penalty must be finite and > 0")
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
    *,
    check_values: bool = True,
) -> None:
    """Add per-row sparse biases in list order (duplicates add up); a bias of -inf masks the token,
    which is how min_tokens hides EOS and stop tokens until the minimum length is reached."""
    if _checking(logits, check_values):
        _check_ragged_values(token_ids, "token_ids", cu_lens, "cu_lens", logits.shape[1])
    torch.ops.fast_inference.apply_logit_bias(logits, token_ids, biases, cu_lens)


def compute_logprobs(
    logits: torch.Tensor,  # float [B, V], raw model logits (before temperature and filtering)
    token_ids: torch.Tensor,  # int64 [B], the chosen tokens
    num_top: int,  # 0..20
    *,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # f32 [B], int64 [B, num_top], f32 [B, num_top]
    """Log-probability of each chosen token and the num_top most likely tokens (descending, ties by
    lower id), from log_softmax(logits), in one fused pass per row."""
    if not 0 <= num_top <= MAX_LOGPROBS:
        raise ValueError(f"num_top must be in [0, {MAX_LOGPROBS}], got {num_top}")
    if _checking(logits, check_values):
        _check_logits_values(logits)
        if bool(((token_ids < 0) | (token_ids >= logits.shape[1])).any()):
            raise ValueError(f"token_ids must be in [0, {logits.shape[1]})")
    return torch.ops.fast_inference.compute_logprobs(logits, token_ids, num_top)
