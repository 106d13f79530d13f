// CUDA entry point of paged_attention: argument checks, split workspace, launches on the current stream.
//
// c10::cuda::getCurrentCUDAStream is at::cuda's current stream without ATen/cuda/CUDAContext.h (which needs
// cusparse.h, absent from a bare CUDA toolkit).
// No host synchronisation: grids and the workspace are sized from tensor sizes only (the context
// bound is block_tables.size(1) * block_size), so the op is safe inside a CUDA graph. The values of
// block_tables / seq_lens / cu_query_lens are not checked on the host: an out-of-range block id, or a
// seq_len below q_len or past the block table, gives NaN in that sequence's output rows; query rows
// that cu_query_lens does not cover are left unwritten.
// Workspace: 4 * num_seqs * num_heads * max_splits * (head_size + 1) bytes of float32 split partials,
// max_splits = ceil(block_tables.size(1) * block_size / 512), so keep block_tables as wide as needed.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "checks/attention_checks.h"
#include "cuda/paged_attention.cuh"

namespace fast_inference {

namespace {

void paged_attention_cuda(const at::Tensor& query,         // [num_query_tokens, num_heads, head_size]
                          const at::Tensor& key_cache,     // [num_blocks, block_size, num_kv_heads, head_size]
                          const at::Tensor& value_cache,   // [num_blocks, block_size, num_kv_heads, head_size]
                          const at::Tensor& block_tables,  // int32 [num_seqs, max_blocks_per_seq]
                          const at::Tensor& seq_lens,      // int32 [num_seqs]
                          const at::Tensor& cu_query_lens, // int32 [num_seqs + 1]
                          double scale, bool causal,
                          at::Tensor& out) {               // [num_query_tokens, num_heads, head_size]
  const PagedAttentionDims d =
      check_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_query_lens, scale, out);
  TORCH_CHECK(query.is_cuda(), "query must be a CUDA tensor, got ", query.device());
  TORCH_CHECK(key_cache.data_ptr() == nullptr || reinterpret_cast<uintptr_t>(key_cache.data_ptr()) % 16 == 0,
              "key_cache must be 16-byte aligned");
  TORCH_CHECK(value_cache.data_ptr() == nullptr || reinterpret_cast<uintptr_t>(value_cache.data_ptr()) % 16 == 0,
              "value_cache must be 16-byte aligned");
  TORCH_CHECK(d.num_query_tokens + d.num_seqs <= INT32_MAX && d.num_blocks <= INT32_MAX,
              "paged_attention: sizes exceed the CUDA kernels' 32-bit indices");
  const int64_t max_context = d.max_blocks_per_seq * d.block_size;
  TORCH_CHECK(max_context <= INT32_MAX, "block_tables.size(1) * block_size = ", max_context,
              " exceeds the CUDA kernels' 32-bit positions");
  const int64_t max_splits = std::max<int64_t>(1, (max_context + cuda::kPartitionSize - 1) / cuda::kPartitionSize);
  const int64_t group = d.num_heads / d.num_kv_heads;
  TORCH_CHECK(max_splits <= 65535 && d.num_kv_heads * ((group + cuda::kDecodeHeads - 1) / cuda::kDecodeHeads) <= 65535 &&
                  d.num_heads <= 65535,
              "paged_attention: too many heads or splits for a CUDA grid");
  if (d.num_query_tokens == 0 || d.num_seqs == 0) return;

  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  cuda::PagedAttentionParams p{};
  p.query = query.data_ptr();
  p.out = out.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int>();
  p.seq_lens = seq_lens.data_ptr<int>();
  p.cu_query_lens = cu_query_lens.data_ptr<int>();
  p.q_stride_tok = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.o_stride_tok = out.stride(0);
  p.o_stride_head = out.stride(1);
  p.bt_stride = block_tables.stride(0);
  p.num_query_tokens = static_cast<int>(d.num_query_tokens);
  p.num_heads = static_cast<int>(d.num_heads);
  p.num_kv_heads = static_cast<int>(d.num_kv_heads);
  p.head_size = static_cast<int>(d.head_size);
  p.num_blocks = static_cast<int>(d.num_blocks);
  p.block_size = static_cast<int>(d.block_size);
  p.block_shift = 0;
  while ((int64_t{1} << p.block_shift) < d.block_size) ++p.block_shift;
  p.max_blocks_per_seq = static_cast<int>(d.max_blocks_per_seq);
  p.num_seqs = static_cast<int>(d.num_seqs);
  p.max_splits = static_cast<int>(max_splits);
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  p.causal = causal;

  // Split partials of the decode rows; from the caching allocator, so no sync and graph-safe.
  at::Tensor tmp_out, tmp_lse;
  if (max_splits > 1) {
    const auto opts = query.options().dtype(at::kFloat);
    tmp_out = at::empty({d.num_seqs, d.num_heads, max_splits, d.head_size}, opts);
    tmp_lse = at::empty({d.num_seqs, d.num_heads, max_splits}, opts);
    p.tmp_out = tmp_out.data_ptr<float>();
    p.tmp_lse = tmp_lse.data_ptr<float>();
  }

  switch (query.scalar_type()) {
    case at::kFloat:
      cuda::launch_paged_attention_decode<float>(p, stream);
      cuda::launch_paged_attention_prefill<float>(p, stream);
      break;
    case at::kHalf:
      cuda::launch_paged_attention_decode<c10::Half>(p, stream);
      cuda::launch_paged_attention_prefill<c10::Half>(p, stream);
      break;
    case at::kBFloat16:
      cuda::launch_paged_attention_decode<c10::BFloat16>(p, stream);
      cuda::launch_paged_attention_prefill<c10::BFloat16>(p, stream);
      break;
    default:
      TORCH_CHECK(false, "query dtype ", query.scalar_type(), " is not supported");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_inference, CUDA, m) { m.impl("paged_attention", &paged_attention_cuda); }

}  // namespace fast_inference
