"""Fake (meta) kernels: output shapes and dtypes of the fast_inference ops for torch.compile and opcheck."""

import torch


@torch.library.register_fake("fast_inference::reshape_and_cache")
def _reshape_and_cache_fake(key, value, key_cache, value_cache, slot_mapping):
    return None


@torch.library.register_fake("fast_inference::copy_blocks")
def _copy_blocks_fake(key_caches, value_caches, block_mapping):
    return None


@torch.library.register_fake("fast_inference::swap_blocks")
def _swap_blocks_fake(src, dst, block_mapping):
    return None


@torch.library.register_fake("fast_inference::paged_attention")
def _paged_attention_fake(
    query, key_cache, value_cache, block_tables, seq_lens, cu_query_lens, scale, causal, out
):
    return None


@torch.library.register_fake("fast_inference::sample")
def _sample_fake(logits, temperature, top_k, top_p, min_p, seeds, offsets):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


@torch.library.register_fake("fast_inference::apply_penalties")
def _apply_penalties_fake(
    logits,
    prompt_token_ids,
    prompt_cu_lens,
    output_token_ids,
    output_cu_lens,
    presence_penalty,
    frequency_penalty,
    repetition_penalty,
):
    return None


@torch.library.register_fake("fast_inference::apply_logit_bias")
def _apply_logit_bias_fake(logits, token_ids, biases, cu_lens):
    return None


@torch.library.register_fake("fast_inference::apply_token_bitmask")
def _apply_token_bitmask_fake(logits, bitmask, indices=None):
    return None


@torch.library.register_fake("fast_inference::compute_logprobs")
def _compute_logprobs_fake(logits, token_ids, num_top):
    batch = logits.shape[0]
    return (
        logits.new_empty((batch,), dtype=torch.float32),
        logits.new_empty((batch, num_top), dtype=torch.int64),
        logits.new_empty((batch, num_top), dtype=torch.float32),
    )


@torch.library.register_fake("fast_inference::linear")
def _linear_fake(x, weight, bias):  # weight [N, K] or VNNI tiles [N / 16, K / 32, 512]
    return x.new_empty((x.shape[0], weight.shape[0] * (16 if weight.dim() == 3 else 1)))


@torch.library.register_fake("fast_inference::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.register_fake("fast_inference::add_rms_norm")
def _add_rms_norm_fake(x, residual, weight, eps):
    return x.new_empty(x.shape)


@torch.library.register_fake("fast_inference::rotary_embedding")
def _rotary_embedding_fake(x, cos, sin):
    return None


@torch.library.register_fake("fast_inference::silu_and_mul")
def _silu_and_mul_fake(x):
    return x.new_empty((x.shape[0], x.shape[1] // 2))


@torch.library.register_fake("fast_inference::quantize")
def _quantize_fake(weight, qtype):
    from .quant import row_bytes

    return weight.new_empty((weight.shape[0], row_bytes(qtype, weight.shape[1])), dtype=torch.uint8)


def _qweight_rows(qweight) -> int:  # plain [N, row_bytes] or interleaved [N / 16, nb, 16 * block_bytes]
    from .quant import TILE_ROWS

    return qweight.shape[0] * TILE_ROWS if qweight.dim() == 3 else qweight.shape[0]


@torch.library.register_fake("fast_inference::dequantize")
def _dequantize_fake(qweight, qtype, in_features, dtype):
    return qweight.new_empty((_qweight_rows(qweight), in_features), dtype=dtype)


@torch.library.register_fake("fast_inference::quant_linear")
def _quant_linear_fake(x, qweight, qtype, bias):
    return x.new_empty((x.shape[0], _qweight_rows(qweight)))


@torch.library.register_fake("fast_inference::interleave_rows")
def _interleave_rows_fake(qweight, qtype):
    from .quant import BLOCK_LAYOUT, TILE_ROWS

    block_bytes = BLOCK_LAYOUT[qtype][1]
    return qweight.new_empty(
        (qweight.shape[0] // TILE_ROWS, qweight.shape[1] // block_bytes, TILE_ROWS * block_bytes)
    )
