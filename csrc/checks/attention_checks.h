// Argument validation of paged_attention, shared by the CPU and CUDA implementations.
//
// Only metadata (dtype, shape, device, strides) is checked here. The values of block_tables,
// seq_lens and cu_query_lens are checked by the CPU implementation on the host (cheap there); a
// device implementation cannot read them without a host synchronisation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "checks/cache_checks.h"

namespace fast_inference {

// The problem sizes that every implementation reads after the checks pass.
struct PagedAttentionDims {
  int64_t num_query_tokens, num_heads, head_size;
  int64_t num_blocks, block_size, num_kv_heads;
  int64_t num_seqs, max_blocks_per_seq;
};

// Head sizes: a multiple of 8 (16-byte vector loads of f16/bf16) up to 256. Block sizes: a power of
// two up to 256 (so a slot splits into block and offset with a shift).
inline bool supported_head_size(int64_t head_size) { return head_size >= 8 && head_size <= 256 && head_size % 8 == 0; }
inline bool supported_block_size(int64_t block_size) {
  return block_size >= 1 && block_size <= 256 && (block_size & (block_size - 1)) == 0;
}

// query, out: [num_query_tokens, num_heads, head_size] (any token/head strides, unit stride along head_size)
// key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size], same dtype as query
// block_tables: int32 [num_seqs, max_blocks_per_seq]; seq_lens: int32 [num_seqs]; cu_query_lens: int32 [num_seqs + 1]
inline PagedAttentionDims check_paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                                                const at::Tensor& value_cache, const at::Tensor& block_tables,
                                                const at::Tensor& seq_lens, const at::Tensor& cu_query_lens,
                                                double scale, const at::Tensor& out) {
  TORCH_CHECK(query.dim() == 3, "query must be 3-D [num_query_tokens, num_heads, head_size], got ", query.dim(),
              "-D");
  TORCH_CHECK(is_kv_dtype(query.scalar_type()), "query must be float32, float16 or bfloat16, got ",
              query.scalar_type());
  TORCH_CHECK(query.stride(2) == 1, "query must have unit stride along head_size, got strides ", query.strides());
  check_kv_cache(key_cache, "key_cache");
  check_kv_cache(value_cache, "value_cache");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache shape ", value_cache.sizes(),
              " must equal key_cache shape ", key_cache.sizes());
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type(), "key_cache dtype ", key_cache.scalar_type(),
              " must equal query dtype ", query.scalar_type());
  TORCH_CHECK(value_cache.scalar_type() == query.scalar_type(), "value_cache dtype ", value_cache.scalar_type(),
              " must equal query dtype ", query.scalar_type());

  PagedAttentionDims d{};
  d.num_query_tokens = query.size(0);
  d.num_heads = query.size(1);
  d.head_size = query.size(2);
  d.num_blocks = key_cache.size(0);
  d.block_size = key_cache.size(1);
  d.num_kv_heads = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == d.head_size, "key_cache head_size ", key_cache.size(3),
              " must equal query head_size ", d.head_size);
  TORCH_CHECK(supported_head_size(d.head_size), "query head_size ", d.head_size,
              " is not supported (a multiple of 8 up to 256)");
  TORCH_CHECK(supported_block_size(d.block_size), "key_cache block_size ", d.block_size,
              " is not supported (a power of two up to 256)");
  TORCH_CHECK(d.num_heads > 0 && d.num_heads % d.num_kv_heads == 0, "query num_heads ", d.num_heads,
              " must be a positive multiple of key_cache num_kv_heads ", d.num_kv_heads);

  TORCH_CHECK(block_tables.scalar_type() == at::kInt, "block_tables must be int32, got ", block_tables.scalar_type());
  TORCH_CHECK(block_tables.dim() == 2, "block_tables must be 2-D [num_seqs, max_blocks_per_seq], got ",
              block_tables.dim(), "-D");
  TORCH_CHECK(block_tables.stride(1) == 1, "block_tables must have unit stride along max_blocks_per_seq, got strides ",
              block_tables.strides());
  d.num_seqs = block_tables.size(0);
  d.max_blocks_per_seq = block_tables.size(1);
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt, "seq_lens must be int32, got ", seq_lens.scalar_type());
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == d.num_seqs, "seq_lens must be [num_seqs=", d.num_seqs,
              "], got shape ", seq_lens.sizes());
  TORCH_CHECK(seq_lens.is_contiguous(), "seq_lens must be contiguous");
  TORCH_CHECK(cu_query_lens.scalar_type() == at::kInt, "cu_query_lens must be int32, got ",
              cu_query_lens.scalar_type());
  TORCH_CHECK(cu_query_lens.dim() == 1 && cu_query_lens.size(0) == d.num_seqs + 1,
              "cu_query_lens must be [num_seqs + 1=", d.num_seqs + 1, "], got shape ", cu_query_lens.sizes());
  TORCH_CHECK(cu_query_lens.is_contiguous(), "cu_query_lens must be contiguous");

  TORCH_CHECK(out.sizes() == query.sizes(), "out shape ", out.sizes(), " must equal query shape ", query.sizes());
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), "out dtype ", out.scalar_type(), " must equal query dtype ",
              query.scalar_type());
  TORCH_CHECK(out.stride(2) == 1, "out must have unit stride along head_size, got strides ", out.strides());
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale must be a positive finite number, got ", scale);

  const auto device = query.device();
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{key_cache, "key_cache"},
                                {value_cache, "value_cache"},
                                {block_tables, "block_tables"},
                                {seq_lens, "seq_lens"},
                                {cu_query_lens, "cu_query_lens"},
                                {out, "out"}}) {
    TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but query is on ", device);
  }
  return d;
}

}  // namespace fast_inference
