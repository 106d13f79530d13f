// The CPU paged-attention problem as plain pointers and strides, shared by the per-ISA kernel files.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fast_inference::cpu {

// Strides are in elements. The caches are contiguous [num_blocks, block_size, num_kv_heads, head_size].
struct PagedAttentionArgs {
  const void* query;  // [num_query_tokens, num_heads, head_size]
  int64_t q_stride_token, q_stride_head;
  const void* key_cache;    // [num_blocks, block_size, num_kv_heads, head_size]
  const void* value_cache;  // same
  const int32_t* block_tables;  // [num_seqs, block_tables_stride]
  int64_t block_tables_stride;
  const int32_t* seq_lens;       // [num_seqs]
  const int32_t* cu_query_lens;  // [num_seqs + 1]
  void* out;  // [num_query_tokens, num_heads, head_size]
  int64_t out_stride_token, out_stride_head;
  int64_t num_seqs, num_heads, num_kv_heads, head_size, block_size;
  float scale;
  bool causal;
};

// One entry point per instruction set; each lives in its own translation unit compiled with that
// ISA's flags (paged_attention_avx512.cpp, paged_attention_avx2.cpp) or none (paged_attention.cpp).
void paged_attention_portable(const PagedAttentionArgs& args, c10::ScalarType dtype);
void paged_attention_avx2(const PagedAttentionArgs& args, c10::ScalarType dtype);
void paged_attention_avx512(const PagedAttentionArgs& args, c10::ScalarType dtype);

}  // namespace fast_inference::cpu
