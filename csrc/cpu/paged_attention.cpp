// CPU paged_attention: argument and value checks, run-time ISA dispatch, and the portable kernel.
#include <torch/library.h>

#include "checks/attention_checks.h"
#include "cpu/cpu_features.h"
#include "cpu/paged_attention.h"

#define FI_CPU_ISA portable
#include "cpu/paged_attention_kernel.h"
#undef FI_CPU_ISA

namespace fast_inference::cpu {

void paged_attention_portable(const PagedAttentionArgs& args, c10::ScalarType dtype) {
  portable::paged_attention_dispatch<portable::PortableOps>(args, dtype);
}

namespace {

// The values the kernel indexes with: checked on the host before any read, so a bad table raises.
void check_paged_attention_values(const PagedAttentionDims& d, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, const at::Tensor& cu_query_lens) {
  const int32_t* cu = cu_query_lens.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(cu[0] == 0, "cu_query_lens[0] must be 0, got ", cu[0]);
  TORCH_CHECK_VALUE(cu[d.num_seqs] == d.num_query_tokens, "cu_query_lens[-1] = ", cu[d.num_seqs],
              " must equal the number of query tokens ", d.num_query_tokens);
  const int64_t capacity = d.max_blocks_per_seq * d.block_size;
  const int64_t table_stride = block_tables.stride(0);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  for (int64_t s = 0; s < d.num_seqs; ++s) {
    const int64_t q_len = int64_t(cu[s + 1]) - cu[s];
    TORCH_CHECK_VALUE(q_len >= 0, "cu_query_lens must be non-decreasing, but cu_query_lens[", s + 1, "] = ", cu[s + 1],
                " < cu_query_lens[", s, "] = ", cu[s]);
    TORCH_CHECK_VALUE(lens[s] >= q_len, "seq_lens[", s, "] = ", lens[s], " is shorter than its query length ", q_len,
                " (from cu_query_lens)");
    TORCH_CHECK_VALUE(lens[s] <= capacity, "seq_lens[", s, "] = ", lens[s], " exceeds the block_tables capacity of ",
                d.max_blocks_per_seq, " blocks x ", d.block_size, " tokens");
    if (q_len == 0) continue;  // nothing of this sequence is read
    const int64_t used_blocks = (int64_t(lens[s]) + d.block_size - 1) / d.block_size;
    for (int64_t b = 0; b < used_blocks; ++b) {
      const int32_t id = tables[s * table_stride + b];
      TORCH_CHECK_VALUE(id >= 0 && id < d.num_blocks, "block_tables[", s, ", ", b, "] = ", id,
                  " is out of range for a cache of ", d.num_blocks, " blocks");
    }
  }
}

}  // namespace

// query, out: [num_query_tokens, num_heads, head_size]; caches: [num_blocks, block_size, num_kv_heads, head_size]
// block_tables: int32 [num_seqs, max_blocks]; seq_lens: int32 [num_seqs]; cu_query_lens: int32 [num_seqs + 1]
void paged_attention_cpu(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cu_query_lens,
                         double scale, bool causal, at::Tensor& out) {
  const PagedAttentionDims d =
      check_paged_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_query_lens, scale, out);
  check_paged_attention_values(d, block_tables, seq_lens, cu_query_lens);
  const Isa isa = selected_isa();
  if (d.num_query_tokens == 0) return;
  PagedAttentionArgs args{};
  args.query = query.data_ptr();
  args.q_stride_token = query.stride(0);
  args.q_stride_head = query.stride(1);
  args.key_cache = key_cache.data_ptr();
  args.value_cache = value_cache.data_ptr();
  args.block_tables = block_tables.data_ptr<int32_t>();
  args.block_tables_stride = block_tables.stride(0);
  args.seq_lens = seq_lens.data_ptr<int32_t>();
  args.cu_query_lens = cu_query_lens.data_ptr<int32_t>();
  args.out = out.data_ptr();
  args.out_stride_token = out.stride(0);
  args.out_stride_head = out.stride(1);
  args.num_seqs = d.num_seqs;
  args.num_heads = d.num_heads;
  args.num_kv_heads = d.num_kv_heads;
  args.head_size = d.head_size;
  args.block_size = d.block_size;
  args.scale = float(scale);
  args.causal = causal;
  switch (isa) {
    case Isa::kAvx512: paged_attention_avx512(args, query.scalar_type()); break;
    case Isa::kAvx2: paged_attention_avx2(args, query.scalar_type()); break;
    case Isa::kPortable: paged_attention_portable(args, query.scalar_type()); break;
  }
}

TORCH_LIBRARY_IMPL(fast_inference, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

}  // namespace fast_inference::cpu
