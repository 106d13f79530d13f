// Shared parameters and launchers of the CUDA paged-attention kernels (decode split-KV + reduce, tiled prefill).
//
// Work split without any host synchronisation: the grids are sized from tensor sizes only and
// every CTA reads cu_query_lens / seq_lens on the device, exiting early when it has nothing to do.
//   decode  (sequences with q_len == 1): grid (num_seqs, num_kv_heads * head_groups, max_splits);
//           one CTA = one sequence, one KV head, up to kDecodeHeads of its query heads, one split
//           of kPartitionSize tokens. Each K/V row is loaded once for all those query heads.
//   reduce  (q_len == 1 and more than one split): log-sum-exp merge of the split partials.
//   prefill (sequences with q_len >= 2): grid (num_seqs + num_query_tokens / BQ, num_heads); one
//           CTA = one tile of BQ query tokens of one head, K/V staged through shared memory in tiles,
//           online softmax (see find_prefill_tile for the tile mapping). f16/bf16 run the
//           tensor-core (WMMA) kernel, f32 a CUDA-core kernel that keeps full f32 precision.
// Faults that cannot be checked on the host without a sync (a block id outside [0, num_blocks), a
// seq_len < q_len or > max_blocks_per_seq * block_size) write NaN into the affected output rows;
// the kernels never read or write out of bounds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fast_inference::cuda {

constexpr int kPartitionSize = 512;  // tokens per decode split: fixed, so results do not depend on the batch
constexpr int kDecodeThreads = 128;
constexpr int kDecodeHeads = 8;      // query heads (of one KV head) per decode CTA
constexpr int kReduceThreads = 128;
constexpr int kPrefillThreads = 128;

struct PagedAttentionParams {
  const void* query;          // [num_query_tokens, num_heads, head_size], strides below (elements)
  void* out;                  // [num_query_tokens, num_heads, head_size], strides below (elements)
  const void* key_cache;      // [num_blocks, block_size, num_kv_heads, head_size], contiguous
  const void* value_cache;    // same as key_cache
  const int* block_tables;    // [num_seqs, max_blocks_per_seq], row stride bt_stride
  const int* seq_lens;        // [num_seqs]
  const int* cu_query_lens;   // [num_seqs + 1]
  float* tmp_out;             // [num_seqs, num_heads, max_splits, head_size] decode split partials
  float* tmp_lse;             // [num_seqs, num_heads, max_splits] log2-sum-exp of each split
  int64_t q_stride_tok, q_stride_head;
  int64_t o_stride_tok, o_stride_head;
  int64_t bt_stride;
  int num_query_tokens, num_heads, num_kv_heads, head_size;
  int num_blocks, block_size, block_shift, max_blocks_per_seq;
  int num_seqs, max_splits;
  float scale_log2;  // softmax scale * log2(e): the kernels use exp2
  bool causal;
};

// True when a sequence's seq_len cannot hold its q_len new tokens or overflows its block-table row.
__device__ __forceinline__ bool bad_context(int ctx, int q_len, const PagedAttentionParams& p) {
  return ctx < q_len || ctx < 1 || (int64_t)ctx > (int64_t)p.max_blocks_per_seq * p.block_size;
}

__device__ __forceinline__ int num_decode_splits(int ctx) { return (ctx + kPartitionSize - 1) / kPartitionSize; }

// The query tile of a prefill CTA: query rows [row0, row0 + BQ) of sequence seq.
struct PrefillTile {
  int seq, q_begin, q_len, row0, ctx;
};

// Finds the tile of CTA blockIdx.x. Sequence s (cu = cu_query_lens[s]) owns the grid indices
// [cu / BQ + s, cu / BQ + s + ceil(q_len / BQ)): these ranges grow with s, never overlap
// (floor((cu + q) / BQ) - floor(cu / BQ) + 1 >= ceil(q / BQ)) and all lie below
// num_query_tokens / BQ + num_seqs, which sizes the grid. False when the CTA has no rows (tile past
// q_len, q_len < 2 which is the decode kernel's, or a malformed cu_query_lens).
template <int BQ>
__device__ __forceinline__ bool find_prefill_tile(const PagedAttentionParams& p, PrefillTile& t) {
  const int* cu = p.cu_query_lens;
  const int x = blockIdx.x;
  int lo = 0, hi = p.num_seqs - 1;  // the last s with cu[s] / BQ + s <= x
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] / BQ + mid <= x) lo = mid;
    else hi = mid - 1;
  }
  t.seq = lo;
  t.q_begin = cu[lo];
  t.q_len = cu[lo + 1] - t.q_begin;
  if (t.q_len < 2) return false;
  const int tile = x - (t.q_begin / BQ + lo);
  if (tile < 0 || (int64_t)tile * BQ >= t.q_len) return false;
  if (t.q_begin < 0 || (int64_t)t.q_begin + t.q_len > p.num_query_tokens) return false;
  t.row0 = tile * BQ;
  t.ctx = p.seq_lens[lo];
  return true;
}

// Launchers, one per dtype; head_size picks the compiled head-size bucket (64, 128 or 256).
// Prefill runs on tensor cores (WMMA) for f16/bf16 and on CUDA cores for f32 (full f32 precision).
template <typename T> void launch_paged_attention_decode(const PagedAttentionParams& p, cudaStream_t stream);
template <typename T> void launch_paged_attention_prefill(const PagedAttentionParams& p, cudaStream_t stream);
template <typename T> void launch_paged_attention_prefill_mma(const PagedAttentionParams& p, cudaStream_t stream);

}  // namespace fast_inference::cuda
