// CUDA decode path of paged_attention (q_len == 1): GQA-aware split-KV kernel and the log-sum-exp merge.
#include <c10/cuda/CUDAException.h>

#include "cuda/cuda_utils.cuh"
#include "cuda/paged_attention.cuh"

namespace fast_inference::cuda {

namespace {

// A K/V row of one head is read by L lanes with 16-byte loads; CPL chunks per lane cover the
// widest head of the bucket (smaller heads mask the tail chunks).
template <typename T, int DMAX>
struct DecodeShape {
  static constexpr int VEC = kVec<T>;
  static constexpr int NC = DMAX / VEC;                           // 16-byte chunks of a DMAX row
  static constexpr int L = NC >= 32 ? 32 : (NC >= 16 ? 16 : 8);   // lanes per row (divides 32)
  static constexpr int CPL = NC / L;                              // chunks per lane
  static constexpr int NROWS = kDecodeThreads / L;                // rows in flight per pass
  static constexpr int U = 4;                                     // passes unrolled: loads in flight
  static constexpr int NWARPS = kDecodeThreads / 32;
  static constexpr int F = CPL * VEC;                             // floats per lane per head
};

// grid (num_seqs, num_kv_heads * head_groups, max_splits), block kDecodeThreads.
// One CTA: sequence blockIdx.x, query heads [head0, head0 + nh) of one KV head, tokens of split blockIdx.z.
// Pass 1 writes the scores of the split to shared memory, pass 2 softmaxes them, pass 3 sums V.
template <typename T, int DMAX>
__global__ void __launch_bounds__(kDecodeThreads) paged_attention_decode_kernel(const PagedAttentionParams p) {
  using S = DecodeShape<T, DMAX>;
  constexpr int VEC = S::VEC, L = S::L, CPL = S::CPL, NROWS = S::NROWS, U = S::U, F = S::F;
  constexpr int NWARPS = S::NWARPS, H = kDecodeHeads;
  constexpr int kScoreFloats = H * DMAX + H * kPartitionSize;
  constexpr int kRedFloats = NWARPS * H * DMAX;
  __shared__ __align__(16) float smem[kScoreFloats > kRedFloats ? kScoreFloats : kRedFloats];
  __shared__ float s_max[H], s_sum[H];
  __shared__ int s_blocks[kPartitionSize];   // the split's block ids (a split spans <= kPartitionSize blocks)
  float* q_s = smem;                         // [H][DMAX], scaled queries (pass 1)
  float* logits = smem + H * DMAX;           // [H][kPartitionSize], scores then probabilities
  float* red = smem;                         // [NWARPS][H][DMAX], per-warp V sums (after pass 3)

  const int seq = blockIdx.x, split = blockIdx.z;
  const int group = p.num_heads / p.num_kv_heads;
  const int head_groups = (group + H - 1) / H;
  const int kv_head = blockIdx.y / head_groups;
  const int head0 = kv_head * group + (blockIdx.y % head_groups) * H;
  const int nh = min(H, kv_head * group + group - head0);

  const int q_begin = p.cu_query_lens[seq];
  if (p.cu_query_lens[seq + 1] - q_begin != 1 || q_begin < 0 || q_begin >= p.num_query_tokens) return;
  const int ctx = p.seq_lens[seq];
  const bool bad_len = bad_context(ctx, 1, p);
  const int num_splits = bad_len ? 1 : num_decode_splits(ctx);
  if (split >= num_splits) return;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int row = tid / L, lane_in_row = tid % L;
  const int head_size = p.head_size, nc = head_size / VEC;
  T* out = static_cast<T*>(p.out) + (int64_t)q_begin * p.o_stride_tok;
  if (bad_len) {
    for (int i = tid; i < nh * head_size; i += kDecodeThreads) {
      const int g = i / head_size, d = i - g * head_size;
      out[(int64_t)(head0 + g) * p.o_stride_head + d] = from_float<T>(fault_nan());
    }
    return;
  }

  const T* query = static_cast<const T*>(p.query) + (int64_t)q_begin * p.q_stride_tok;
  for (int i = tid; i < nh * head_size; i += kDecodeThreads) {
    const int g = i / head_size, d = i - g * head_size;
    q_s[g * DMAX + d] = to_float(query[(int64_t)(head0 + g) * p.q_stride_head + d]) * p.scale_log2;
  }
  const int t_begin = split * kPartitionSize;
  const int t_end = min(ctx, t_begin + kPartitionSize);
  const int n = t_end - t_begin;
  // Stage the split's block ids (marking out-of-range ones -1) so the K/V loads below depend on a
  // shared-memory read instead of a second global load.
  const int first_block = t_begin >> p.block_shift;
  const int num_split_blocks = ((t_end - 1) >> p.block_shift) - first_block + 1;
  const int* block_table = p.block_tables + (int64_t)seq * p.bt_stride + first_block;
  int bad_id = 0;
  for (int i = tid; i < num_split_blocks; i += kDecodeThreads) {
    const int blk = block_table[i];
    const bool ok = blk >= 0 && blk < p.num_blocks;
    s_blocks[i] = ok ? blk : -1;
    bad_id |= !ok;
  }
  const bool bad = __syncthreads_or(bad_id) != 0;  // also publishes q_s and s_blocks

  // This lane's slice of every query head: chunks lane_in_row + i * L.
  float q[H][F];
#pragma unroll
  for (int g = 0; g < H; ++g)
#pragma unroll
    for (int i = 0; i < CPL; ++i)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int c = lane_in_row + i * L;
        q[g][i * VEC + e] = (g < nh && c < nc) ? q_s[g * DMAX + c * VEC + e] : 0.f;
      }

  const int64_t tok_stride = (int64_t)p.num_kv_heads * head_size;
  const int64_t blk_stride = tok_stride * p.block_size;
  const T* k_cache = static_cast<const T*>(p.key_cache) + (int64_t)kv_head * head_size;
  const T* v_cache = static_cast<const T*>(p.value_cache) + (int64_t)kv_head * head_size;

  // Loads U rows of `cache` (tokens base + u * NROWS + row) into registers; zeros past the split
  // or for a block id out of range (the CTA's output is NaN then).
  auto load_rows = [&](const T* cache, int base, uint4 (&raw)[U][CPL], bool (&ok)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = base + u * NROWS + row;
      ok[u] = false;
#pragma unroll
      for (int i = 0; i < CPL; ++i) raw[u][i] = make_uint4(0u, 0u, 0u, 0u);
      if (t < t_end) {
        const int blk = s_blocks[(t >> p.block_shift) - first_block];
        if (blk >= 0) {
          ok[u] = true;
          const T* src = cache + blk * blk_stride + (t & (p.block_size - 1)) * tok_stride;
#pragma unroll
          for (int i = 0; i < CPL; ++i) {
            const int c = lane_in_row + i * L;
            if (c < nc) raw[u][i] = load16(src + c * VEC);
          }
        }
      }
    }
  };

  // Pass 1: scores (already in log2 units) of every token of the split for the nh heads.
  // The loop bounds are CTA-uniform so every lane reaches the shuffles.
  for (int base = t_begin; base < t_end; base += NROWS * U) {
    uint4 raw[U][CPL];
    bool ok[U];
    load_rows(k_cache, base, raw, ok);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[F];
#pragma unroll
      for (int i = 0; i < CPL; ++i) unpack16(raw[u][i], kf + i * VEC, T{});
      float dot[H];
#pragma unroll
      for (int g = 0; g < H; ++g) {
        dot[g] = 0.f;
        if (g < nh) {
#pragma unroll
          for (int j = 0; j < F; ++j) dot[g] += q[g][j] * kf[j];
#pragma unroll
          for (int off = L / 2; off > 0; off >>= 1) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], off);
        }
      }
      const int t = base + u * NROWS + row;
      if (lane_in_row == 0 && t < t_end) {
#pragma unroll
        for (int g = 0; g < H; ++g)
          if (g < nh) logits[g * kPartitionSize + (t - t_begin)] = ok[u] ? dot[g] : 0.f;
      }
    }
  }
  __syncthreads();

  // Pass 2: softmax of each head's scores over the split (one warp per head).
  for (int g = warp; g < nh; g += NWARPS) {
    float* lg = logits + g * kPartitionSize;
    float m = -INFINITY;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, lg[j]);
    m = warp_max(m);
    float s = 0.f;
    for (int j = lane; j < n; j += 32) {
      const float e = exp2f(lg[j] - m);
      lg[j] = e;
      s += e;
    }
    s = warp_sum(s);
    if (lane == 0) {
      s_max[g] = m;
      s_sum[g] = s;
    }
  }
  __syncthreads();

  // Pass 3: probability-weighted sum of V rows, per lane over its rows, then across the warp's rows.
  float acc[H][F];
#pragma unroll
  for (int g = 0; g < H; ++g)
#pragma unroll
    for (int j = 0; j < F; ++j) acc[g][j] = 0.f;
  for (int base = t_begin; base < t_end; base += NROWS * U) {
    uint4 raw[U][CPL];
    bool ok[U];
    load_rows(v_cache, base, raw, ok);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = base + u * NROWS + row;
      if (t < t_end && ok[u]) {
        float vf[F];
#pragma unroll
        for (int i = 0; i < CPL; ++i) unpack16(raw[u][i], vf + i * VEC, T{});
#pragma unroll
        for (int g = 0; g < H; ++g) {
          if (g < nh) {
            const float pg = logits[g * kPartitionSize + (t - t_begin)];
#pragma unroll
            for (int j = 0; j < F; ++j) acc[g][j] += pg * vf[j];
          }
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < H; ++g) {
    if (g < nh) {
#pragma unroll
      for (int j = 0; j < F; ++j)
#pragma unroll
        for (int off = L; off < 32; off <<= 1) acc[g][j] += __shfl_xor_sync(0xffffffffu, acc[g][j], off);
    }
  }
  __syncthreads();  // every read of logits is done: red aliases it
  if (lane < L) {
#pragma unroll
    for (int g = 0; g < H; ++g) {
      if (g < nh) {
#pragma unroll
        for (int i = 0; i < CPL; ++i) {
          const int c = lane + i * L;
          if (c < nc) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) red[(warp * H + g) * DMAX + c * VEC + e] = acc[g][i * VEC + e];
          }
        }
      }
    }
  }
  __syncthreads();

  for (int i = tid; i < nh * head_size; i += kDecodeThreads) {
    const int g = i / head_size, d = i - g * head_size;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) o += red[(w * H + g) * DMAX + d];
    o = bad ? fault_nan() : o / s_sum[g];
    if (num_splits == 1) {
      out[(int64_t)(head0 + g) * p.o_stride_head + d] = from_float<T>(o);
    } else {
      const int64_t part = ((int64_t)seq * p.num_heads + head0 + g) * p.max_splits + split;
      p.tmp_out[part * head_size + d] = o;
      if (d == 0) p.tmp_lse[part] = bad ? fault_nan() : s_max[g] + log2f(s_sum[g]);
    }
  }
}

// grid (num_seqs, num_heads), block kReduceThreads: merges the split partials of one decode row.
// Each split's output is normalised by its own sum, so the merge weights are 2^(lse_i - max lse).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) paged_attention_reduce_kernel(const PagedAttentionParams p) {
  constexpr int NWARPS = kReduceThreads / 32;
  __shared__ float scratch[NWARPS];
  const int seq = blockIdx.x, head = blockIdx.y;
  const int q_begin = p.cu_query_lens[seq];
  if (p.cu_query_lens[seq + 1] - q_begin != 1 || q_begin < 0 || q_begin >= p.num_query_tokens) return;
  const int ctx = p.seq_lens[seq];
  if (bad_context(ctx, 1, p)) return;  // the decode kernel wrote NaN directly
  const int num_splits = num_decode_splits(ctx);
  if (num_splits <= 1) return;          // the decode kernel wrote the output directly

  const int64_t part0 = ((int64_t)seq * p.num_heads + head) * p.max_splits;
  const float* lse = p.tmp_lse + part0;
  float m = -INFINITY;
  int nan = 0;
  for (int i = threadIdx.x; i < num_splits; i += kReduceThreads) {
    const float l = lse[i];
    if (l != l) nan = 1;
    else m = fmaxf(m, l);
  }
  m = block_max<NWARPS>(m, scratch);
  const bool faulted = __syncthreads_or(nan) != 0;
  float s = 0.f;
  for (int i = threadIdx.x; i < num_splits; i += kReduceThreads) s += exp2f(lse[i] - m);
  s = block_sum<NWARPS>(s, scratch);
  const float inv = 1.f / s;

  T* out = static_cast<T*>(p.out) + (int64_t)q_begin * p.o_stride_tok + (int64_t)head * p.o_stride_head;
  const float* parts = p.tmp_out + part0 * p.head_size;
  for (int d = threadIdx.x; d < p.head_size; d += kReduceThreads) {
    float o = 0.f;
    for (int i = 0; i < num_splits; ++i) o += exp2f(lse[i] - m) * parts[(int64_t)i * p.head_size + d];
    out[d] = from_float<T>(faulted ? fault_nan() : o * inv);
  }
}

template <typename Tc, int DMAX>
void launch_decode_bucket(const PagedAttentionParams& p, dim3 grid, cudaStream_t stream) {
  paged_attention_decode_kernel<Tc, DMAX><<<grid, kDecodeThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void launch_paged_attention_decode(const PagedAttentionParams& p, cudaStream_t stream) {
  using Tc = typename CudaType<T>::type;
  const int group = p.num_heads / p.num_kv_heads;
  const int head_groups = (group + kDecodeHeads - 1) / kDecodeHeads;
  const dim3 grid(p.num_seqs, p.num_kv_heads * head_groups, p.max_splits);
  if (p.head_size <= 64) {
    launch_decode_bucket<Tc, 64>(p, grid, stream);
  } else if (p.head_size <= 128) {
    launch_decode_bucket<Tc, 128>(p, grid, stream);
  } else {
    launch_decode_bucket<Tc, 256>(p, grid, stream);
  }
  if (p.max_splits > 1) {
    paged_attention_reduce_kernel<Tc><<<dim3(p.num_seqs, p.num_heads), kReduceThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template void launch_paged_attention_decode<float>(const PagedAttentionParams&, cudaStream_t);
template void launch_paged_attention_decode<c10::Half>(const PagedAttentionParams&, cudaStream_t);
template void launch_paged_attention_decode<c10::BFloat16>(const PagedAttentionParams&, cudaStream_t);

}  // namespace fast_inference::cuda
