// AVX-512 paged attention: bf16 through AVX512_BF16 dot products, f32/f16 through widened f32 FMAs.
//
// bf16 path (the common serving dtype): q.k uses vdpbf16ps straight on the cached bf16 rows (exact
// bf16 products, f32 accumulation; the scale is applied to the f32 scores). p.v pairs two cache
// tokens per 32-bit lane (unpack lo/hi of rows t and t+1) and multiplies them by (p_t, p_t+1) rounded
// to bf16, as GPU flash attention does with P; the softmax denominator sums those same rounded p,
// so the weights stay normalised. Accumulation is f32 throughout.
// GCC 12 flags its own AVX-512 intrinsic headers with false -Wmaybe-uninitialized warnings.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <cstring>

#include "cpu/vec_avx512.h"

#define FI_CPU_ISA avx512
#include "cpu/paged_attention_kernel.h"
#include "cpu/paged_attention_fma_ops.h"

namespace fast_inference::cpu::avx512 {

template <typename T>
class Avx512Ops : public FmaOpsFor<Vec512>::Ops<T> {
  using FmaOpsFor<Vec512>::Ops<T>::Ops;
};

template <>
class Avx512Ops<c10::BFloat16> {
 public:
  using T = c10::BFloat16;

  // Rows are padded to Dp (a multiple of 32 bf16 = one zmm); cache rows are read with a mask instead.
  Avx512Ops(int64_t max_rows, int64_t D, int64_t block_size)
      : D_(D),
        chunks_((D + 31) / 32),
        Dp_(chunks_ * 32),
        p_stride_(block_size + 2),
        last_mask_(D % 32 == 0 ? ~__mmask32(0) : __mmask32((1u << (D % 32)) - 1)),
        q_(max_rows * Dp_),
        q_quads_((max_rows + 3) / 4 * D * 4),
        quad_scratch_(D * 4),
        zero_row_(Dp_, 0),
        acc_(max_rows * Dp_),
        p_(max_rows * p_stride_) {}

  void load_query(int64_t r, const T* src) {
    uint16_t* q = q_.data() + r * Dp_;
    std::memcpy(q, src, D_ * sizeof(uint16_t));
    std::fill(q + D_, q + Dp_, uint16_t(0));
    // Quad layout: rows 4i..4i+3 interleaved by 8 elements, [quad][D / 8][row in quad][8], so one zmm
    // holds 8 elements of four rows and a 16-byte piece of a cache row broadcast to it serves all four.
    uint16_t* quad = q_quads_.data() + (r / 4) * D_ * 4 + (r % 4) * 8;
    for (int64_t j = 0; j < D_ / 8; ++j) std::memcpy(quad + j * 32, q + 8 * j, 8 * sizeof(uint16_t));
  }
  void zero_acc(int64_t R) { std::fill(acc_.begin(), acc_.begin() + R * Dp_, 0.f); }
  void rescale_acc(int64_t r, float alpha) { scale(acc_.data() + r * Dp_, Dp_, alpha); }

  // The accumulator of chunk c holds d = 32c + 8L + j in lane 4L + j of its "lo" half and
  // d = 32c + 8L + 4 + j in lane 4L + j of its "hi" half (the unpack lo/hi order of accumulate).
  void read_acc(int64_t r, float* dst) const {
    const float* acc = acc_.data() + r * Dp_;
    for (int64_t c = 0; c < chunks_; ++c) {
      for (int i = 0; i < 16; ++i) {
        const int64_t d = 32 * c + 8 * (i / 4) + i % 4;
        if (d < D_) dst[d] = acc[32 * c + i];
        if (d + 4 < D_) dst[d + 4] = acc[32 * c + 16 + i];
      }
    }
  }

  // k: n cache rows, k_stride apart. Rows go four at a time through scores_quad. A quad that does not
  // start on a multiple of four (GQA groups of 3, 5, 6, 7: SmolLM2, Qwen2) or is short is laid out for
  // this call from the row-major queries, zero-padded: 4 x D / 8 16-byte moves per block and kv head,
  // against a per-row path that reread every cache row once per query row.
  void scores(int64_t r0, int64_t R, const T* k, int64_t k_stride, int64_t n, float* S, int64_t S_stride) const {
    const uint16_t* kb = reinterpret_cast<const uint16_t*>(k);
    for (int64_t r = r0; r < r0 + R; r += 4) {
      const int rows = int(std::min<int64_t>(4, r0 + R - r));
      const uint16_t* quad = q_quads_.data() + (r / 4) * D_ * 4;
      if (r % 4 != 0 || rows < 4) {
        uint16_t* scratch = quad_scratch_.data();
        for (int i = 0; i < 4; ++i) {
          const uint16_t* q = i < rows ? q_.data() + (r + i) * Dp_ : zero_row_.data();
          for (int64_t j = 0; j < D_ / 8; ++j) std::memcpy(scratch + j * 32 + i * 8, q + 8 * j, 8 * sizeof(uint16_t));
        }
        quad = scratch;
      }
      switch (D_) {  // the quad's queries stay in registers for the common head sizes
        case 64: scores_quad<8>(quad, r, rows, kb, k_stride, n, S, S_stride); break;
        case 128: scores_quad<16>(quad, r, rows, kb, k_stride, n, S, S_stride); break;
        default: scores_quad<0>(quad, r, rows, kb, k_stride, n, S, S_stride); break;
      }
    }
  }

  // The driver hands over the next cache block (bytes of K and of V, each contiguous) and the compute
  // loops below prefetch it into L2, one line of K and one of V per inner iteration, so the fetch
  // overlaps the compute. Zen 4 drops software prefetches once its miss queue is full (measured on
  // this VM: a 64-line burst loses about half, 32-line bursts none), so they must trickle out evenly
  // through the compute rather than come in one burst per block. scores_quad (every two 8-element
  // chunks) and accumulate_rows (every token pair and 32-element chunk) each step D / 64 times per
  // token and kv head: D / 16 lines, as many as the block holds. Decode 16 x 2048 on the 2-core VM,
  // interleaved A/B in one process: 10-20% less time than reading the next block up front, and a few
  // % less than four lines per step in the outer loops.
  void stream_next_block(const char* k, const char* v, int64_t bytes) { next_block_.start(k, v, bytes); }

  // acc[r] += sum_t P[r][t] v[t], with P as exp_row left it in p_ (bf16); the float P is not read.
  void accumulate(const float* /*P*/, int64_t /*P_stride*/, int64_t r0, int64_t R, const T* v, int64_t v_stride,
                  int64_t n) {
    const uint16_t* vb = reinterpret_cast<const uint16_t*>(v);
    int64_t r = r0;
    for (; r + 8 <= r0 + R; r += 8) accumulate_rows<8>(r, vb, v_stride, n);
    switch (r0 + R - r) {
      case 1: accumulate_rows<1>(r, vb, v_stride, n); break;
      case 2: accumulate_rows<2>(r, vb, v_stride, n); break;
      case 3: accumulate_rows<3>(r, vb, v_stride, n); break;
      case 4: accumulate_rows<4>(r, vb, v_stride, n); break;
      case 5: accumulate_rows<5>(r, vb, v_stride, n); break;
      case 6: accumulate_rows<6>(r, vb, v_stride, n); break;
      case 7: accumulate_rows<7>(r, vb, v_stride, n); break;
      default: break;
    }
  }

  // P[r][t] = exp(s[t] * scale - m) rounded to bf16 (the precision accumulate multiplies with), 0 past
  // visible; returns the sum of the rounded values so the weights stay normalised.
  float exp_row(int64_t r, const float* s, int64_t n, int64_t visible, float scale, float m) {
    uint16_t* pr = p_.data() + r * p_stride_;
    const __m512 scale_v = _mm512_set1_ps(scale), neg_m = _mm512_set1_ps(-m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mk = Vec512::mask(int(n - i));
      const __mmask16 vis = Vec512::mask(int(std::max<int64_t>(0, visible - i)));
      const __m512 e = _mm512_maskz_mov_ps(vis, Vec512::exp(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, s + i), scale_v, neg_m)));
      const __m256i bf = (__m256i)_mm512_cvtneps_pbh(e);
      if (mk == 0xFFFF) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + i), bf);
      } else {
        _mm256_mask_storeu_epi16(pr + i, mk, bf);
      }
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf), 16)));
    }
    pr[n] = 0;  // the partner of an odd last token
    return _mm512_reduce_add_ps(sum);
  }
  static float max(const float* x, int64_t n) {
    __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mk = Vec512::mask(int(n - i));
      best = _mm512_mask_max_ps(best, mk, best, _mm512_maskz_loadu_ps(mk, x + i));
    }
    return _mm512_reduce_max_ps(best);
  }
  // x[0..n) *= s for n a multiple of 16 (accumulator rows), with plain full-width loads and stores.
  static void scale(float* x, int64_t n, float s) {
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), sv));
  }

 private:
  // S rows r .. r + valid_rows - 1 (valid_rows <= 4) for n tokens from a quad of queries (see load_query),
  // four tokens at a time: accumulator t has quad row i's partial sums in its 128-bit lane i, and a
  // two-level transpose-and-add turns four accumulators into four rows x four tokens. NJ = D / 8 when known
  // at compile time (queries held in registers), 0 = read from L1.
  template <int NJ>
  void scores_quad(const uint16_t* quad, int64_t r, int valid_rows, const uint16_t* k, int64_t k_stride, int64_t n,
                   float* S, int64_t S_stride) const {
    const int64_t nj = NJ > 0 ? NJ : D_ / 8;
    __m512i qreg[NJ > 0 ? NJ : 1];
    if constexpr (NJ > 0) {
      for (int j = 0; j < NJ; ++j) qreg[j] = _mm512_loadu_si512(quad + 32 * j);
    }
    __m512 sums[4];  // four token groups of a 16-token run, lane i = row r + i
    for (int64_t t = 0; t < n; t += 4) {
      // Four tokens x two halves of D = eight independent dot-product chains (vdpbf16ps has a latency of
      // several cycles); tokens past n read a zero row instead of the cache.
      const uint16_t* rows[4];
      for (int i = 0; i < 4; ++i) rows[i] = t + i < n ? k + (t + i) * k_stride : zero_row_.data();
      __m512 acc[4], acc2[4];
      for (int i = 0; i < 4; ++i) acc[i] = acc2[i] = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 2 <= nj; j += 2) {
        next_block_.step();
        const __m512i q0 = NJ > 0 ? qreg[NJ > 0 ? j : 0] : _mm512_loadu_si512(quad + 32 * j);
        const __m512i q1 = NJ > 0 ? qreg[NJ > 0 ? j + 1 : 0] : _mm512_loadu_si512(quad + 32 * (j + 1));
        for (int i = 0; i < 4; ++i) {
          const __m512i k0 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[i] + 8 * j)));
          const __m512i k1 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[i] + 8 * j + 8)));
          acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)k0, (__m512bh)q0);
          acc2[i] = _mm512_dpbf16_ps(acc2[i], (__m512bh)k1, (__m512bh)q1);
        }
      }
      if (j < nj) {  // odd number of 8-element chunks (head sizes 8, 24, 40, ...)
        const __m512i q0 = _mm512_loadu_si512(quad + 32 * j);
        for (int i = 0; i < 4; ++i) {
          const __m512i k0 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[i] + 8 * j)));
          acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)k0, (__m512bh)q0);
        }
      }
      for (int i = 0; i < 4; ++i) acc[i] = _mm512_add_ps(acc[i], acc2[i]);
      const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(acc[0], acc[1]), _mm512_unpackhi_ps(acc[0], acc[1]));
      const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(acc[2], acc[3]), _mm512_unpackhi_ps(acc[2], acc[3]));
      const __m512d a = _mm512_castps_pd(s01), b = _mm512_castps_pd(s23);
      // lane i = row r + i: [token t, t+1, t+2, t+3]
      const int g = int((t / 4) % 4);
      sums[g] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
      if (g == 3) {
        // 16 tokens done: transpose the 4x4 grid of 128-bit lanes so each row is one full 512-bit store
        // (narrow stores followed by the softmax's wide load would defeat store-to-load forwarding).
        const int64_t t0 = t - 12;
        __m512 row_scores[4];
        const __m512 x0 = _mm512_shuffle_f32x4(sums[0], sums[1], _MM_SHUFFLE(1, 0, 1, 0));  // r0 g0, r1 g0, r0 g1, r1 g1
        const __m512 x1 = _mm512_shuffle_f32x4(sums[2], sums[3], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512 x2 = _mm512_shuffle_f32x4(sums[0], sums[1], _MM_SHUFFLE(3, 2, 3, 2));  // rows 2, 3
        const __m512 x3 = _mm512_shuffle_f32x4(sums[2], sums[3], _MM_SHUFFLE(3, 2, 3, 2));
        row_scores[0] = _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0));
        row_scores[1] = _mm512_shuffle_f32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1));
        row_scores[2] = _mm512_shuffle_f32x4(x2, x3, _MM_SHUFFLE(2, 0, 2, 0));
        row_scores[3] = _mm512_shuffle_f32x4(x2, x3, _MM_SHUFFLE(3, 1, 3, 1));
        for (int i = 0; i < valid_rows; ++i) _mm512_storeu_ps(S + (r + i) * S_stride + t0, row_scores[i]);
      } else if (t + 4 >= n) {  // a short final run: store what there is, group by group
        for (int gg = 0; gg <= g; ++gg) {
          const int64_t tg = t - 4 * (g - gg);
          const __mmask8 mk = n - tg >= 4 ? __mmask8(0xF) : __mmask8((1u << (n - tg)) - 1);
          alignas(64) float lanes[16];
          _mm512_store_ps(lanes, sums[gg]);
          for (int i = 0; i < valid_rows; ++i) {
            _mm_mask_storeu_ps(S + (r + i) * S_stride + tg, mk, _mm_load_ps(lanes + 4 * i));
          }
        }
      }
    }
  }

  __mmask32 chunk_mask(int64_t c) const { return c == chunks_ - 1 ? last_mask_ : ~__mmask32(0); }

  // RB rows at once: 2 * RB accumulators per 32-wide chunk stay in registers over the block's tokens.
  template <int RB>
  void accumulate_rows(int64_t r0, const uint16_t* v, int64_t v_stride, int64_t n) {
    for (int64_t c = 0; c < chunks_; ++c) {
      const __mmask32 mk = chunk_mask(c);
      __m512 lo[RB], hi[RB];
      for (int i = 0; i < RB; ++i) {
        lo[i] = _mm512_loadu_ps(acc_.data() + (r0 + i) * Dp_ + 32 * c);
        hi[i] = _mm512_loadu_ps(acc_.data() + (r0 + i) * Dp_ + 32 * c + 16);
      }
      const uint16_t* vc = v + 32 * c;
      for (int64_t t = 0; t < n; t += 2) {
        next_block_.step();
        const __m512i v0 = _mm512_maskz_loadu_epi16(mk, vc + t * v_stride);
        // Never read the row after the last token: it may be another sequence's or uninitialised.
        const __m512i v1 = t + 1 < n ? _mm512_maskz_loadu_epi16(mk, vc + (t + 1) * v_stride) : _mm512_setzero_si512();
        const __m512bh pair_lo = (__m512bh)_mm512_unpacklo_epi16(v0, v1);
        const __m512bh pair_hi = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
        for (int i = 0; i < RB; ++i) {
          // (p_t, p_t+1) as one 32-bit broadcast straight from memory
          const __m512bh pv = (__m512bh)_mm512_castps_si512(
              _mm512_broadcastss_ps(_mm_load_ss(reinterpret_cast<const float*>(p_.data() + (r0 + i) * p_stride_ + t))));
          lo[i] = _mm512_dpbf16_ps(lo[i], pair_lo, pv);
          hi[i] = _mm512_dpbf16_ps(hi[i], pair_hi, pv);
        }
      }
      for (int i = 0; i < RB; ++i) {
        _mm512_storeu_ps(acc_.data() + (r0 + i) * Dp_ + 32 * c, lo[i]);
        _mm512_storeu_ps(acc_.data() + (r0 + i) * Dp_ + 32 * c + 16, hi[i]);
      }
    }
  }

  int64_t D_, chunks_, Dp_, p_stride_;
  __mmask32 last_mask_;
  std::vector<uint16_t> q_;
  std::vector<uint16_t> q_quads_;  // the same queries in quad layout (see load_query)
  mutable std::vector<uint16_t> quad_scratch_;  // a quad laid out per call (rows not on a quad boundary)
  std::vector<uint16_t> zero_row_;  // stands in for the cache rows past a block's last token
  std::vector<float> acc_;
  std::vector<uint16_t> p_;  // P rows as bf16, one spare slot for an odd token count
  mutable BlockPrefetch next_block_;  // stepped from the const scores loops
};

}  // namespace fast_inference::cpu::avx512

namespace fast_inference::cpu {

void paged_attention_avx512(const PagedAttentionArgs& args, c10::ScalarType dtype) {
  avx512::paged_attention_dispatch<avx512::Avx512Ops>(args, dtype);
}

}  // namespace fast_inference::cpu
