// AVX2 paged attention: cache rows widened to f32 in registers 16 elements at a time, 8-wide FMAs.
//
// Without AVX-512 every K/V element costs a widening op and a full FMA, so the kernel is bound by
// instruction throughput, not by DRAM: the loops below spend as few non-FMA ops per FMA as they can.
//  - bf16 is widened by unpacking with zeros (one shuffle per 8 elements, no shift on the FMA ports).
//    That yields elements {0..3, 8..11} and {4..7, 12..15} of each 16-element chunk, so queries and
//    accumulators are kept in that order (load_query permutes them, read_acc puts them back).
//  - scores: two tokens x up to four rows per pass, one accumulator each (each query vector is loaded
//    once for both tokens), reduced together by one horizontal-add tree instead of a reduction per dot.
//  - accumulate: four rows x 16 columns in registers across the block's tokens, each value vector
//    widened once for the four rows.
#include <type_traits>

#include "cpu/vec_avx2.h"

#define FI_CPU_ISA avx2
#include "cpu/paged_attention_kernel.h"
#include "cpu/paged_attention_fma_ops.h"

namespace fast_inference::cpu::avx2 {

// Sixteen elements of a cache or query row as two f32 vectors, and where element d of a chunk lands in
// the 16 floats (lo then hi) the kernel keeps.
template <typename T>
struct Chunk16;

template <>
struct Chunk16<float> {
  static void load(const float* p, __m256& lo, __m256& hi) {
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
  }
  static int position(int d) { return d; }
};

template <>
struct Chunk16<c10::Half> {
  static void load(const c10::Half* p, __m256& lo, __m256& hi) {
    lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
  static int position(int d) { return d; }
};

template <>
struct Chunk16<c10::BFloat16> {
  // bf16 is the top half of an f32: interleaving zeros below each element widens it. unpack works per
  // 128-bit lane, so lo = elements 0..3 and 8..11, hi = 4..7 and 12..15.
  static void load(const c10::BFloat16* p, __m256& lo, __m256& hi) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i z = _mm256_setzero_si256();
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, x));
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, x));
  }
  static int position(int d) { return (d & 3) | ((d & 4) << 1) | ((d & 8) >> 1); }
};

template <typename T>
class Avx2Ops {
 public:
  using Fma = FmaOpsFor<Vec256>::Ops<T>;  // the row-wise softmax helpers

  // Rows are padded to Dp (a multiple of 16) with zeros, in Chunk16's element order.
  Avx2Ops(int64_t max_rows, int64_t D, int64_t /*block_size*/)
      : D_(D), full_chunks_(D / 16), Dp_((D + 15) / 16 * 16), q_(max_rows * Dp_), acc_(max_rows * Dp_) {}

  void load_query(int64_t r, const T* src) {
    float* q = q_.data() + r * Dp_;
    std::fill(q, q + Dp_, 0.f);
    for (int64_t d = 0; d < D_; ++d) q[d / 16 * 16 + Chunk16<T>::position(int(d % 16))] = static_cast<float>(src[d]);
  }
  void zero_acc(int64_t R) { std::fill(acc_.begin(), acc_.begin() + R * Dp_, 0.f); }
  void rescale_acc(int64_t r, float alpha) { Fma::scale(acc_.data() + r * Dp_, Dp_, alpha); }
  void read_acc(int64_t r, float* dst) const {
    const float* acc = acc_.data() + r * Dp_;
    for (int64_t d = 0; d < D_; ++d) dst[d] = acc[d / 16 * 16 + Chunk16<T>::position(int(d % 16))];
  }

  void scores(int64_t r0, int64_t R, const T* k, int64_t k_stride, int64_t n, float* S, int64_t S_stride) {
    in_row_blocks(r0, R, [&](auto rb, int64_t r) { scores_rows<rb()>(r, k, k_stride, n, S, S_stride); });
  }

  // acc[r] += sum_t P[r, t] v[t]. Causally masked tokens have P == 0 (exp_row zeroes them).
  void accumulate(const float* P, int64_t P_stride, int64_t r0, int64_t R, const T* v, int64_t v_stride,
                  int64_t n) {
    in_row_blocks(r0, R, [&](auto rb, int64_t r) { accumulate_rows<rb()>(P, P_stride, r, v, v_stride, n); });
  }

  static float exp_row(int64_t r, float* s, int64_t n, int64_t visible, float scale, float m) {
    return Fma::exp_row(r, s, n, visible, scale, m);
  }
  static float max(const float* x, int64_t n) { return Fma::max(x, n); }

  void stream_next_block(const char* k, const char* v, int64_t bytes) { next_block_.start(k, v, bytes); }

 private:
  // f(std::integral_constant<int, RB>, r) over rows [r0, r0 + R) in blocks of four, then the 1-3 left over.
  template <typename F>
  static void in_row_blocks(int64_t r0, int64_t R, F&& f) {
    int64_t r = r0;
    for (; r + 4 <= r0 + R; r += 4) f(std::integral_constant<int, 4>{}, r);
    switch (r0 + R - r) {
      case 1: return f(std::integral_constant<int, 1>{}, r);
      case 2: return f(std::integral_constant<int, 2>{}, r);
      case 3: return f(std::integral_constant<int, 3>{}, r);
      default: return;
    }
  }

  // The last, half chunk of a row (D % 16 == 8) zero-padded, so nothing past the row is read.
  void tail_chunk(const T* row, T* dst) const {
    std::fill(dst, dst + 16, T(0.f));
    std::memcpy(dst, row + 16 * full_chunks_, (D_ - 16 * full_chunks_) * sizeof(T));
  }

  // S[r + i][t] for RB rows, two tokens per pass. hadd(hadd(a, b), hadd(c, d)) leaves each 128-bit lane
  // holding partial sums of a, b, c, d in that order; adding the two lanes completes the four dots.
  template <int RB>
  void scores_rows(int64_t r, const T* k, int64_t k_stride, int64_t n, float* S, int64_t S_stride) {
    const float* q = q_.data() + r * Dp_;
    for (int64_t t = 0; t < n; t += 2) {
      const T* k0 = k + t * k_stride;
      const T* k1 = t + 1 < n ? k0 + k_stride : k0;  // an odd last token pairs with itself
      __m256 a0[4], a1[4];
      for (int i = 0; i < 4; ++i) a0[i] = a1[i] = _mm256_setzero_ps();
      auto step = [&](int64_t c, const T* c0, const T* c1) {
        __m256 x0l, x0h, x1l, x1h;
        Chunk16<T>::load(c0, x0l, x0h);
        Chunk16<T>::load(c1, x1l, x1h);
        for (int i = 0; i < RB; ++i) {
          const __m256 ql = _mm256_loadu_ps(q + i * Dp_ + 16 * c), qh = _mm256_loadu_ps(q + i * Dp_ + 16 * c + 8);
          a0[i] = _mm256_fmadd_ps(qh, x0h, _mm256_fmadd_ps(ql, x0l, a0[i]));
          a1[i] = _mm256_fmadd_ps(qh, x1h, _mm256_fmadd_ps(ql, x1l, a1[i]));
        }
      };
      for (int64_t c = 0; c < full_chunks_; ++c) {
        next_block_.step();
        step(c, k0 + 16 * c, k1 + 16 * c);
      }
      if (full_chunks_ * 16 < D_) {
        T tail0[16], tail1[16];
        tail_chunk(k0, tail0);
        tail_chunk(k1, tail1);
        step(full_chunks_, tail0, tail1);
      }
      const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a0[0], a0[1]), _mm256_hadd_ps(a0[2], a0[3]));
      const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a1[0], a1[1]), _mm256_hadd_ps(a1[2], a1[3]));
      // lanes 0..3: rows at token t, lanes 4..7: rows at token t + 1
      alignas(32) float dots[8];
      _mm256_store_ps(dots, _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31)));
      for (int i = 0; i < RB; ++i) {
        S[(r + i) * S_stride + t] = dots[i];
        if (t + 1 < n) S[(r + i) * S_stride + t + 1] = dots[4 + i];
      }
    }
  }

  // acc[r + i] += sum_t P[r + i][t] v[t] for RB rows: per 16-column chunk 2 * RB accumulators stay in
  // registers across all n tokens (stored once per block), each value chunk widened once for the rows.
  template <int RB>
  void accumulate_rows(const float* P, int64_t P_stride, int64_t r, const T* v, int64_t v_stride, int64_t n) {
    for (int64_t c = 0; c < full_chunks_; ++c) {
      accumulate_chunk<RB>(P, P_stride, r, c, n, [&](int64_t t) { return v + t * v_stride + 16 * c; });
    }
    if (full_chunks_ * 16 < D_) {
      T tail[16];
      accumulate_chunk<RB>(P, P_stride, r, full_chunks_, n, [&](int64_t t) {
        tail_chunk(v + t * v_stride, tail);
        return static_cast<const T*>(tail);
      });
    }
  }
  template <int RB, typename ChunkOf>
  void accumulate_chunk(const float* P, int64_t P_stride, int64_t r, int64_t c, int64_t n, ChunkOf chunk_of) {
    const float* p = P + r * P_stride;
    float* acc = acc_.data() + r * Dp_ + 16 * c;
    __m256 lo[RB], hi[RB];
    for (int i = 0; i < RB; ++i) {
      lo[i] = _mm256_loadu_ps(acc + i * Dp_);
      hi[i] = _mm256_loadu_ps(acc + i * Dp_ + 8);
    }
    for (int64_t t = 0; t < n; ++t) {
      next_block_.step();
      __m256 xl, xh;
      Chunk16<T>::load(chunk_of(t), xl, xh);
      for (int i = 0; i < RB; ++i) {
        const __m256 pv = _mm256_broadcast_ss(p + i * P_stride + t);
        lo[i] = _mm256_fmadd_ps(pv, xl, lo[i]);
        hi[i] = _mm256_fmadd_ps(pv, xh, hi[i]);
      }
    }
    for (int i = 0; i < RB; ++i) {
      _mm256_storeu_ps(acc + i * Dp_, lo[i]);
      _mm256_storeu_ps(acc + i * Dp_ + 8, hi[i]);
    }
  }

  int64_t D_, full_chunks_, Dp_;
  std::vector<float> q_, acc_;
  BlockPrefetch next_block_;
};

}  // namespace fast_inference::cpu::avx2

namespace fast_inference::cpu {

void paged_attention_avx2(const PagedAttentionArgs& args, c10::ScalarType dtype) {
  avx2::paged_attention_dispatch<avx2::Avx2Ops>(args, dtype);
}

}  // namespace fast_inference::cpu
