// CUDA prefill path of paged_attention (q_len >= 2) on CUDA cores (float32): query tiles, K/V tiles in shared memory.
#include <c10/cuda/CUDAException.h>

#include <type_traits>

#include "cuda/cuda_utils.cuh"
#include "cuda/paged_attention.cuh"

namespace fast_inference::cuda {

namespace {

// TPR threads share a query row, each owning the float4 chunks tr, tr + TPR, ... of the head
// (interleaved so a warp reads a K/V row from shared memory without bank conflicts).
template <int DMAX>
struct PrefillShape {
  static constexpr int TPR = DMAX >= 256 ? 8 : 4;   // threads per query row
  static constexpr int BQ = kPrefillThreads / TPR;  // query rows per CTA
  static constexpr int BK = 4096 / DMAX;            // keys per tile: 16 KiB of K and 16 KiB of V (float)
  static constexpr int CPT = DMAX / 4 / TPR;        // float4 chunks per thread
  static constexpr int F = CPT * 4;                 // floats per thread
};

// grid (num_seqs + num_query_tokens / BQ, num_heads), block kPrefillThreads.
template <typename T, int DMAX>
__global__ void __launch_bounds__(kPrefillThreads) paged_attention_prefill_kernel(const PagedAttentionParams p) {
  using S = PrefillShape<DMAX>;
  constexpr int TPR = S::TPR, BQ = S::BQ, BK = S::BK, CPT = S::CPT, F = S::F, VEC = kVec<T>;
  __shared__ __align__(16) float k_s[BK * DMAX];  // [BK][DMAX]
  __shared__ __align__(16) float v_s[BK * DMAX];  // [BK][DMAX]
  __shared__ int s_bad;

  PrefillTile tl;
  if (!find_prefill_tile<BQ>(p, tl)) return;
  const int seq = tl.seq, q_begin = tl.q_begin, q_len = tl.q_len, row0 = tl.row0, ctx = tl.ctx;

  const int head = blockIdx.y;
  const int kv_head = head / (p.num_heads / p.num_kv_heads);
  const int head_size = p.head_size;
  const int tid = threadIdx.x, r = tid / TPR, tr = tid % TPR;
  const int qi = row0 + r;
  const bool active = qi < q_len;
  T* out = static_cast<T*>(p.out) + (int64_t)(q_begin + qi) * p.o_stride_tok + (int64_t)head * p.o_stride_head;

  if (bad_context(ctx, q_len, p)) {
    if (active)
      for (int d = tr; d < head_size; d += TPR) out[d] = from_float<T>(fault_nan());
    return;
  }
  const int pos = ctx - q_len + qi;                                // this row's position
  const int last_pos = ctx - q_len + min(row0 + BQ, q_len) - 1;    // the tile's last row's position
  const int kv_end = p.causal ? last_pos + 1 : ctx;                // keys this tile can see

  const T* query = static_cast<const T*>(p.query) + (int64_t)(q_begin + qi) * p.q_stride_tok +
                   (int64_t)head * p.q_stride_head;
  float q[F], o[F];
#pragma unroll
  for (int i = 0; i < CPT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int d = (i * TPR + tr) * 4 + e;
      q[i * 4 + e] = (active && d < head_size) ? to_float(query[d]) * p.scale_log2 : 0.f;
      o[i * 4 + e] = 0.f;
    }
  float m = -INFINITY, l = 0.f;

  const int64_t tok_stride = (int64_t)p.num_kv_heads * head_size;
  const int64_t blk_stride = tok_stride * p.block_size;
  const T* k_cache = static_cast<const T*>(p.key_cache) + (int64_t)kv_head * head_size;
  const T* v_cache = static_cast<const T*>(p.value_cache) + (int64_t)kv_head * head_size;
  const int* block_table = p.block_tables + (int64_t)seq * p.bt_stride;
  const int nc = head_size / VEC;
  if (tid == 0) s_bad = 0;

  for (int kt = 0; kt < kv_end; kt += BK) {
    __syncthreads();  // the previous tile is consumed (and s_bad is initialised)
    for (int idx = tid; idx < BK * nc; idx += kPrefillThreads) {
      const int j = idx / nc, c = idx - j * nc;
      const int key = kt + j;
      float kf[VEC], vf[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) kf[e] = vf[e] = 0.f;
      if (key < kv_end) {
        const int blk = block_table[key >> p.block_shift];
        if (blk >= 0 && blk < p.num_blocks) {
          const int64_t off = blk * blk_stride + (key & (p.block_size - 1)) * tok_stride + c * VEC;
          unpack16(load16(k_cache + off), kf, T{});
          unpack16(load16(v_cache + off), vf, T{});
        } else {
          s_bad = 1;
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; e += 4) {
        *reinterpret_cast<float4*>(&k_s[j * DMAX + c * VEC + e]) = make_float4(kf[e], kf[e + 1], kf[e + 2], kf[e + 3]);
        *reinterpret_cast<float4*>(&v_s[j * DMAX + c * VEC + e]) = make_float4(vf[e], vf[e + 1], vf[e + 2], vf[e + 3]);
      }
    }
    __syncthreads();

    // Scores of this row against the tile's keys; the TPR threads of a row sum their partial dots.
    float s[BK];
    float m_tile = -INFINITY;
#pragma unroll
    for (int j = 0; j < BK; ++j) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < CPT; ++i) {
        const int c = i * TPR + tr;
        if (c * 4 < head_size) {
          const float4 kv = *reinterpret_cast<const float4*>(&k_s[j * DMAX + c * 4]);
          dot += q[i * 4] * kv.x + q[i * 4 + 1] * kv.y + q[i * 4 + 2] * kv.z + q[i * 4 + 3] * kv.w;
        }
      }
#pragma unroll
      for (int off = TPR / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      const int key = kt + j;
      const bool visible = key < kv_end && (!p.causal || key <= pos);
      s[j] = visible ? dot : -INFINITY;
      m_tile = fmaxf(m_tile, s[j]);
    }

    // Online softmax update. A row that has seen no visible key yet (only rows past q_len) keeps m = -inf.
    const float m_new = fmaxf(m, m_tile);
    if (m_new != -INFINITY) {
      const float alpha = exp2f(m - m_new);
      float psum = 0.f;
#pragma unroll
      for (int j = 0; j < BK; ++j) {
        s[j] = exp2f(s[j] - m_new);
        psum += s[j];
      }
      l = l * alpha + psum;
#pragma unroll
      for (int k = 0; k < F; ++k) o[k] *= alpha;
#pragma unroll
      for (int j = 0; j < BK; ++j) {
#pragma unroll
        for (int i = 0; i < CPT; ++i) {
          const int c = i * TPR + tr;
          if (c * 4 < head_size) {
            const float4 vv = *reinterpret_cast<const float4*>(&v_s[j * DMAX + c * 4]);
            o[i * 4] += s[j] * vv.x;
            o[i * 4 + 1] += s[j] * vv.y;
            o[i * 4 + 2] += s[j] * vv.z;
            o[i * 4 + 3] += s[j] * vv.w;
          }
        }
      }
      m = m_new;
    }
  }

  // kv_end >= 1, so the loop ran and its barriers ordered every write of s_bad before this read.
  const bool bad = s_bad != 0;
  if (active) {
    const float inv = 1.f / l;
#pragma unroll
    for (int i = 0; i < CPT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = (i * TPR + tr) * 4 + e;
        if (d < head_size) out[d] = from_float<T>(bad ? fault_nan() : o[i * 4 + e] * inv);
      }
  }
}

template <typename Tc, int DMAX>
void launch_prefill_bucket(const PagedAttentionParams& p, cudaStream_t stream) {
  constexpr int BQ = PrefillShape<DMAX>::BQ;
  const dim3 grid(p.num_seqs + p.num_query_tokens / BQ, p.num_heads);
  paged_attention_prefill_kernel<Tc, DMAX><<<grid, kPrefillThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void launch_paged_attention_prefill(const PagedAttentionParams& p, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    launch_paged_attention_prefill_mma<T>(p, stream);
  } else if (p.head_size <= 64) {
    launch_prefill_bucket<float, 64>(p, stream);
  } else if (p.head_size <= 128) {
    launch_prefill_bucket<float, 128>(p, stream);
  } else {
    launch_prefill_bucket<float, 256>(p, stream);
  }
}

template void launch_paged_attention_prefill<float>(const PagedAttentionParams&, cudaStream_t);
template void launch_paged_attention_prefill<c10::Half>(const PagedAttentionParams&, cudaStream_t);
template void launch_paged_attention_prefill<c10::BFloat16>(const PagedAttentionParams&, cudaStream_t);

}  // namespace fast_inference::cuda
