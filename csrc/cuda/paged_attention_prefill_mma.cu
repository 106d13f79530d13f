// CUDA prefill path of paged_attention (q_len >= 2) for f16/bf16 on tensor cores (WMMA), f32 accumulation.
//
// One CTA = 64 query rows of one head (4 warps x 16 rows). Per tile of 32 keys: K/V rows are copied
// from the paged cache into shared memory; each warp computes S = Q K^T with WMMA into shared memory,
// runs the online softmax on its 16 rows (2 lanes per row), writes P (f16/bf16) and rescales its O
// rows, then accumulates O += P V with WMMA. O lives in shared memory (float) so that the per-row
// rescale does not depend on the opaque WMMA fragment layout.
#include <c10/cuda/CUDAException.h>
#include <mma.h>

#include "cuda/cuda_utils.cuh"
#include "cuda/paged_attention.cuh"

namespace fast_inference::cuda {

namespace {

namespace wmma = nvcuda::wmma;

template <int DMAX>
struct MmaShape {
  static constexpr int NWARPS = kPrefillThreads / 32;
  static constexpr int BQ = NWARPS * 16;  // query rows per CTA
  static constexpr int BK = 32;           // keys per tile
  // Row strides, padded against bank conflicts; WMMA needs multiples of 16 bytes and 32-byte
  // aligned fragment starts, which these keep (every sub-buffer size is a multiple of 32 bytes).
  static constexpr int LDT = DMAX + 8;    // Q, K, V tiles (elements of T)
  static constexpr int LDS = BK + 4;      // S scratch (float)
  static constexpr int LDP = BK + 8;      // P scratch (elements of T)
  static constexpr int LDO = DMAX + 4;    // O accumulators (float)
  static constexpr size_t kQBytes = size_t(BQ) * LDT * 2;
  static constexpr size_t kKVBytes = size_t(BK) * LDT * 2;
  static constexpr size_t kSBytes = size_t(NWARPS) * 16 * LDS * 4;
  static constexpr size_t kPBytes = size_t(NWARPS) * 16 * LDP * 2;
  static constexpr size_t kOBytes = size_t(NWARPS) * 16 * LDO * 4;
  static constexpr size_t kOffsetFlag = kQBytes + 2 * kKVBytes + kSBytes + kPBytes + kOBytes;
  static constexpr size_t kSmemBytes = kOffsetFlag + 16;  // + the fault flag
  static_assert(kQBytes % 32 == 0 && kKVBytes % 32 == 0 && kSBytes % 32 == 0 && kPBytes % 32 == 0,
                "WMMA fragments need 32-byte aligned shared-memory buffers");
};

// grid (num_seqs + num_query_tokens / BQ, num_heads), block kPrefillThreads, dynamic smem kSmemBytes.
template <typename T, int DMAX>
__global__ void __launch_bounds__(kPrefillThreads) paged_attention_prefill_mma_kernel(const PagedAttentionParams p) {
  using S = MmaShape<DMAX>;
  constexpr int BQ = S::BQ, BK = S::BK, LDT = S::LDT, LDS = S::LDS, LDP = S::LDP, LDO = S::LDO;
  constexpr int VEC = kVec<T>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);                                      // [BQ][LDT]
  T* k_s = reinterpret_cast<T*>(smem_raw + S::kQBytes);                         // [BK][LDT]
  T* v_s = reinterpret_cast<T*>(smem_raw + S::kQBytes + S::kKVBytes);           // [BK][LDT]
  float* s_all = reinterpret_cast<float*>(smem_raw + S::kQBytes + 2 * S::kKVBytes);            // [NWARPS][16][LDS]
  T* p_all = reinterpret_cast<T*>(smem_raw + S::kQBytes + 2 * S::kKVBytes + S::kSBytes);       // [NWARPS][16][LDP]
  float* o_all =
      reinterpret_cast<float*>(smem_raw + S::kQBytes + 2 * S::kKVBytes + S::kSBytes + S::kPBytes);  // [NWARPS][16][LDO]
  // Everything lives in the dynamic buffer, so its base (128-byte aligned) is the only alignment to trust.
  int& s_bad = *reinterpret_cast<int*>(smem_raw + S::kOffsetFlag);

  PrefillTile tl;
  if (!find_prefill_tile<BQ>(p, tl)) return;
  const int seq = tl.seq, q_begin = tl.q_begin, q_len = tl.q_len, row0 = tl.row0, ctx = tl.ctx;
  const int head = blockIdx.y;
  const int kv_head = head / (p.num_heads / p.num_kv_heads);
  const int head_size = p.head_size;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  T* out_tile = static_cast<T*>(p.out) + (int64_t)q_begin * p.o_stride_tok + (int64_t)head * p.o_stride_head;

  if (bad_context(ctx, q_len, p)) {
    for (int i = tid; i < BQ * head_size; i += kPrefillThreads) {
      const int r = i / head_size, d = i - r * head_size;
      if (row0 + r < q_len) out_tile[(int64_t)(row0 + r) * p.o_stride_tok + d] = from_float<T>(fault_nan());
    }
    return;
  }
  const int last_pos = ctx - q_len + min(row0 + BQ, q_len) - 1;  // the tile's last row's position
  const int kv_end = p.causal ? last_pos + 1 : ctx;               // keys this tile can see

  // Zero Q/K/V tiles (their pad columns past head_size must be 0 for the MMAs) and O.
  {
    uint4* z = reinterpret_cast<uint4*>(smem_raw);
    const int n16 = static_cast<int>((S::kQBytes + 2 * S::kKVBytes) / 16);
    for (int i = tid; i < n16; i += kPrefillThreads) z[i] = make_uint4(0u, 0u, 0u, 0u);
    for (int i = tid; i < S::NWARPS * 16 * LDO; i += kPrefillThreads) o_all[i] = 0.f;
  }
  __syncthreads();
  // Q rows of this tile, unscaled (the scale is applied to S in float, keeping Q exact).
  const T* query = static_cast<const T*>(p.query) + (int64_t)q_begin * p.q_stride_tok + (int64_t)head * p.q_stride_head;
  for (int i = tid; i < BQ * head_size; i += kPrefillThreads) {
    const int r = i / head_size, d = i - r * head_size;
    if (row0 + r < q_len) q_s[r * LDT + d] = query[(int64_t)(row0 + r) * p.q_stride_tok + d];
  }
  if (tid == 0) s_bad = 0;

  const int64_t tok_stride = (int64_t)p.num_kv_heads * head_size;
  const int64_t blk_stride = tok_stride * p.block_size;
  const T* k_cache = static_cast<const T*>(p.key_cache) + (int64_t)kv_head * head_size;
  const T* v_cache = static_cast<const T*>(p.value_cache) + (int64_t)kv_head * head_size;
  const int* block_table = p.block_tables + (int64_t)seq * p.bt_stride;
  const int nc = head_size / VEC;

  // This warp's 16 rows; lanes 2r and 2r + 1 own row r of the softmax (keys 16 * half ... + 15).
  float* s_w = s_all + warp * 16 * LDS;
  T* p_w = p_all + warp * 16 * LDP;
  float* o_w = o_all + warp * 16 * LDO;
  const int srow = lane / 2, half = lane % 2;
  const int pos = ctx - q_len + row0 + warp * 16 + srow;  // position of this lane's softmax row
  float m_row = -INFINITY, l_row = 0.f;

  for (int kt = 0; kt < kv_end; kt += BK) {
    __syncthreads();  // the previous tile is consumed; q_s and s_bad are initialised
    for (int idx = tid; idx < BK * nc; idx += kPrefillThreads) {
      const int j = idx / nc, c = idx - j * nc;
      const int key = kt + j;
      uint4 kraw = make_uint4(0u, 0u, 0u, 0u), vraw = kraw;
      if (key < kv_end) {
        const int blk = block_table[key >> p.block_shift];
        if (blk >= 0 && blk < p.num_blocks) {
          const int64_t off = blk * blk_stride + (key & (p.block_size - 1)) * tok_stride + c * VEC;
          kraw = load16(k_cache + off);
          vraw = load16(v_cache + off);
        } else {
          s_bad = 1;
        }
      }
      *reinterpret_cast<uint4*>(k_s + j * LDT + c * VEC) = kraw;
      *reinterpret_cast<uint4*>(v_s + j * LDT + c * VEC) = vraw;
    }
    __syncthreads();

    // S (16 x BK) = Q_w (16 x D) K^T (D x BK); pad columns of Q and K are zero.
    {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag[BK / 16];
#pragma unroll
      for (int n = 0; n < BK / 16; ++n) wmma::fill_fragment(s_frag[n], 0.f);
      for (int k0 = 0; k0 < head_size; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, q_s + warp * 16 * LDT + k0, LDT);
#pragma unroll
        for (int n = 0; n < BK / 16; ++n) {
          // B(k, n) = K[key n][dim k]: column-major with leading dimension LDT.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, k_s + n * 16 * LDT + k0, LDT);
          wmma::mma_sync(s_frag[n], a, b, s_frag[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < BK / 16; ++n) wmma::store_matrix_sync(s_w + n * 16, s_frag[n], LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of row srow over this lane's 16 keys, combined with the partner lane.
    {
      float sv[16];
      float m_tile = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < 16; ++jj) {
        const int j = half * 16 + jj, key = kt + j;
        const bool visible = key < kv_end && (!p.causal || key <= pos);
        sv[jj] = visible ? s_w[srow * LDS + j] * p.scale_log2 : -INFINITY;
        m_tile = fmaxf(m_tile, sv[jj]);
      }
      m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, 1));
      const float m_new = fmaxf(m_row, m_tile);
      // A row with no visible key so far (only rows past q_len) keeps m = -inf and p = 0.
      const float alpha = m_new == -INFINITY ? 1.f : exp2f(m_row - m_new);
      float psum = 0.f;
#pragma unroll
      for (int jj = 0; jj < 16; ++jj) {
        const float pj = m_new == -INFINITY ? 0.f : exp2f(sv[jj] - m_new);
        const T pt = from_float<T>(pj);
        p_w[srow * LDP + half * 16 + jj] = pt;
        psum += to_float(pt);  // the normaliser sums exactly the weights the MMA uses
      }
      psum += __shfl_xor_sync(0xffffffffu, psum, 1);
      l_row = l_row * alpha + psum;
      m_row = m_new;
      for (int d = half; d < head_size; d += 2) o_w[srow * LDO + d] *= alpha;
    }
    __syncwarp();

    // O_w (16 x D) += P_w (16 x BK) V (BK x D), column blocks of 16 up to head_size.
    for (int n0 = 0; n0 < head_size; n0 += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      wmma::load_matrix_sync(o_frag, o_w + n0, LDO, wmma::mem_row_major);
#pragma unroll
      for (int k0 = 0; k0 < BK; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, p_w + k0, LDP);
        wmma::load_matrix_sync(b, v_s + k0 * LDT + n0, LDT);
        wmma::mma_sync(o_frag, a, b, o_frag);
      }
      wmma::store_matrix_sync(o_w + n0, o_frag, LDO, wmma::mem_row_major);
    }
    __syncwarp();
  }
  __syncthreads();  // kv_end >= 1 so the loop ran: every write of s_bad is ordered before this read

  const bool bad = s_bad != 0;
  const int qi = row0 + warp * 16 + srow;
  if (qi < q_len) {
    const float inv = 1.f / l_row;
    T* out = out_tile + (int64_t)qi * p.o_stride_tok;
    for (int d = half; d < head_size; d += 2) out[d] = from_float<T>(bad ? fault_nan() : o_w[srow * LDO + d] * inv);
  }
}

template <typename Tc, int DMAX>
void launch_mma_bucket(const PagedAttentionParams& p, cudaStream_t stream) {
  using S = MmaShape<DMAX>;
  auto kernel = paged_attention_prefill_mma_kernel<Tc, DMAX>;
  // Above 48 KiB of dynamic shared memory a kernel must opt in (per device; cheap, graph-capture safe).
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(S::kSmemBytes)));
  const dim3 grid(p.num_seqs + p.num_query_tokens / S::BQ, p.num_heads);
  kernel<<<grid, kPrefillThreads, S::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void launch_paged_attention_prefill_mma(const PagedAttentionParams& p, cudaStream_t stream) {
  using Tc = typename CudaType<T>::type;
  if (p.head_size <= 64) {
    launch_mma_bucket<Tc, 64>(p, stream);
  } else if (p.head_size <= 128) {
    launch_mma_bucket<Tc, 128>(p, stream);
  } else {
    launch_mma_bucket<Tc, 256>(p, stream);
  }
}

template void launch_paged_attention_prefill_mma<c10::Half>(const PagedAttentionParams&, cudaStream_t);
template void launch_paged_attention_prefill_mma<c10::BFloat16>(const PagedAttentionParams&, cudaStream_t);

}  // namespace fast_inference::cuda
