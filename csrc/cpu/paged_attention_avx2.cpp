// AVX2 paged attention: cache rows widened to f32 in registers 16 elements at a time, 8-wide FMAs.
//
// Without AVX-512 every K/V element costs a widening op and a full FMA, so the kernel is bound by
// instruction throughput, not by DRAM: the loops below spend as few non-FMA ops per FMA as they can.
//  - bf16 is widened by unpacking with zeros (one shuffle per 8 elements, no shift on the FMA ports).
//    That yields elements {0..3, 8..11} and {4..7, 12..15} of each 16-element chunk, so queries are
//    widened by the same loads and accumulators are put back in order by read_acc.
//  - the ops implement the driver's attend(): one kv head's block for four rows at a time (a GQA
//    group's heads, a query tile's tokens), scores -> softmax step -> accumulate, with the block's
//    scores kept as a [token][4 rows] tile, so two tokens x four rows fill one 8-lane vector.
//  - scores: two tokens x four rows per pass, one accumulator each (each query vector loaded once
//    for both tokens), reduced by one horizontal-add tree into one vector store per token pair.
//  - softmax: the tile's masked max, exp and row sums 8 lanes per instruction; each row's running max
//    (and with it the accumulator) moves at most once per block.
//  - accumulate: four rows x 16 columns in registers across the block's tokens, each value vector
//    widened once for the four rows.
// Loads are kept out of the FMAs (in_register): on Zen 1 two 128-bit loads a cycle is the limit the
// duplicated loads hit first.
#include <type_traits>

#include "cpu/vec_avx2.h"

#define FI_CPU_ISA avx2
#include "cpu/paged_attention_kernel.h"
#include "cpu/paged_attention_fma_ops.h"

namespace fast_inference::cpu::avx2 {

// The value itself, opaque to the compiler: GCC otherwise folds a vector load into every instruction that
// uses it (a query chunk into both tokens' FMAs, a cache chunk into both unpacks), doubling the loads,
// which on Zen 1 (two 128-bit loads a cycle) cost more than the FMAs they feed.
template <typename V>
inline V in_register(V v) {
  asm("" : "+x"(v));
  return v;
}

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
  static void unpermute(const float* src, float* dst) { std::copy_n(src, 16, dst); }
};

template <>
struct Chunk16<c10::Half> {
  static void load(const c10::Half* p, __m256& lo, __m256& hi) {
    lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
  static void unpermute(const float* src, float* dst) { std::copy_n(src, 16, dst); }
};

template <>
struct Chunk16<c10::BFloat16> {
  // bf16 is the top half of an f32: interleaving zeros below each element widens it. unpack works per
  // 128-bit lane, so lo = elements 0..3 and 8..11, hi = 4..7 and 12..15.
  static void load(const c10::BFloat16* p, __m256& lo, __m256& hi) {
    const __m256i x = in_register(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m256i z = _mm256_setzero_si256();
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, x));
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, x));
  }
  // 16 floats (lo, hi) in that order back to elements 0..15: lo's low lane then hi's, lo's high then hi's.
  static void unpermute(const float* src, float* dst) {
    const __m256 lo = _mm256_loadu_ps(src), hi = _mm256_loadu_ps(src + 8);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
};

template <typename T>
class Avx2Ops {
 public:
  using Fma = FmaOpsFor<Vec256>::Ops<T>;

  // Rows are padded to Dp (a multiple of 16) with zeros, in Chunk16's element order. p_ is one 4-row
  // block's softmax tile, [token][4 rows], with room for an odd block's padding token.
  Avx2Ops(int64_t max_rows, int64_t D, int64_t block_size)
      : D_(D),
        full_chunks_(D / 16),
        Dp_((D + 15) / 16 * 16),
        q_(max_rows * Dp_),
        acc_(max_rows * Dp_),
        p_((block_size + 1) / 2 * 8) {}

  // Queries are widened by the same loads as the cache rows, so they land in the same element order.
  void load_query(int64_t r, const T* src) {
    float* q = q_.data() + r * Dp_;
    __m256 lo, hi;
    for (int64_t c = 0; c < full_chunks_; ++c) {
      Chunk16<T>::load(src + 16 * c, lo, hi);
      _mm256_storeu_ps(q + 16 * c, lo);
      _mm256_storeu_ps(q + 16 * c + 8, hi);
    }
    if (full_chunks_ * 16 < D_) {
      T tail[16];
      tail_chunk(src, tail);
      Chunk16<T>::load(tail, lo, hi);
      _mm256_storeu_ps(q + 16 * full_chunks_, lo);
      _mm256_storeu_ps(q + 16 * full_chunks_ + 8, hi);
    }
  }
  void zero_acc(int64_t R) { std::fill(acc_.begin(), acc_.begin() + R * Dp_, 0.f); }
  void read_acc(int64_t r, float* dst) const {  // dst: D floats
    const float* acc = acc_.data() + r * Dp_;
    for (int64_t c = 0; c < full_chunks_; ++c) Chunk16<T>::unpermute(acc + 16 * c, dst + 16 * c);
    if (full_chunks_ * 16 < D_) {
      float tail[16];
      Chunk16<T>::unpermute(acc + 16 * full_chunks_, tail);
      std::copy_n(tail, D_ - 16 * full_chunks_, dst + 16 * full_chunks_);
    }
  }

  // One cache block of one kv head for its rows [r0, r0 + R): scores, the online-softmax step and the
  // value accumulation, four rows at a time, so each 4-row block's scores stay in one small tile that
  // is reduced, exponentiated and summed 8 lanes (2 tokens x 4 rows) per instruction.
  // k, v: n cache rows of D elements, stride apart; row_pos[r]: the last key position row r may see;
  // pos0: the block's first key position; m[r], l[r]: the running (scaled) max and sum of row r.
  void attend(int64_t r0, int64_t R, const T* k, const T* v, int64_t stride, int64_t n, int64_t pos0,
              const int32_t* row_pos, float scale, float* m, float* l) {
    in_row_blocks(r0, R, [&](auto rb, int64_t r) {
      scores_rows<rb()>(r, k, stride, n);
      softmax_rows<rb()>(r, n, pos0, row_pos, scale, m, l);
      accumulate_rows<rb()>(r, v, stride, n);
    });
  }

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

  // p_[4 t + i] = dot(q[r + i], k[t]) for RB rows, two tokens per pass (each query vector loaded once
  // for both). hadd(hadd(a, b), hadd(c, d)) leaves each 128-bit lane holding partial sums of a, b, c, d
  // in that order; adding the two lanes completes the four dots, and one store writes both tokens'.
  // Rows past RB get zeros.
  template <int RB>
  void scores_rows(int64_t r, const T* k, int64_t stride, int64_t n) {
    const float* q = q_.data() + r * Dp_;
    for (int64_t t = 0; t < n; t += 2) {
      const T* k0 = k + t * stride;
      const T* k1 = t + 1 < n ? k0 + stride : k0;  // an odd last token pairs with itself (masked later)
      __m256 a0[4], a1[4];
      for (int i = 0; i < 4; ++i) a0[i] = a1[i] = _mm256_setzero_ps();
      auto step = [&](int64_t c, const T* c0, const T* c1) {
        __m256 x0l, x0h, x1l, x1h;
        Chunk16<T>::load(c0, x0l, x0h);
        Chunk16<T>::load(c1, x1l, x1h);
        for (int i = 0; i < RB; ++i) {
          const __m256 ql = in_register(_mm256_loadu_ps(q + i * Dp_ + 16 * c));
          const __m256 qh = in_register(_mm256_loadu_ps(q + i * Dp_ + 16 * c + 8));
          a0[i] = _mm256_fmadd_ps(qh, x0h, _mm256_fmadd_ps(ql, x0l, a0[i]));
          a1[i] = _mm256_fmadd_ps(qh, x1h, _mm256_fmadd_ps(ql, x1l, a1[i]));
        }
      };
      for (int64_t c = 0; c < full_chunks_; ++c) {
        // One line of the next block's K and V per 32 bytes of this block's K: the whole next block
        // is on its way by the end of this block's scores (see BlockPrefetch).
        for (size_t s = 0; s < sizeof(T) / 2; ++s) next_block_.step();
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
      _mm256_storeu_ps(p_.data() + 4 * t,
                       _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31)));
    }
  }

  // The online-softmax step of RB rows over the block's scores in p_: each row's running max moves up
  // to the block's max (rescaling its accumulator and sum once per block, not per token), then
  // p_ = exp(s * scale - m), zero for keys the row may not see (causal) and for an odd block's padding
  // token, and the row sums are added to l. Lanes of rows past RB see no key and are never read.
  template <int RB>
  void softmax_rows(int64_t r, int64_t n, int64_t pos0, const int32_t* row_pos, float scale, float* m, float* l) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    alignas(32) int32_t visible[8] = {};
    for (int i = 0; i < RB; ++i) visible[i] = visible[i + 4] = int32_t(std::clamp<int64_t>(row_pos[r + i] - pos0 + 1, 0, n));
    const __m256i vis = _mm256_load_si256(reinterpret_cast<const __m256i*>(visible));
    const __m256i first_pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), two = _mm256_set1_epi32(2);
    float* p = p_.data();
    const int64_t n2 = (n + 1) / 2 * 8;  // floats in the tile, the padding token included

    __m256i tok = first_pair;
    __m256 mx = _mm256_set1_ps(kNegInf);
    for (int64_t j = 0; j < n2; j += 8, tok = _mm256_add_epi32(tok, two)) {
      const __m256 seen = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vis, tok));
      mx = _mm256_max_ps(mx, _mm256_blendv_ps(_mm256_set1_ps(kNegInf), _mm256_loadu_ps(p + j), seen));
    }
    alignas(32) float block_max[8], row_m[8] = {};
    _mm256_store_ps(block_max, _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1)));
    for (int i = 0; i < RB; ++i) {
      const float bm = block_max[i] * scale;  // scale > 0: the scaled maximum is the maximum scaled
      if (bm > m[r + i]) {
        const float alpha = std::exp(m[r + i] - bm);  // 0 on the first visible block
        Fma::scale(acc_.data() + (r + i) * Dp_, Dp_, alpha);
        l[r + i] *= alpha;
        m[r + i] = bm;
      }
      // A row that has seen no key yet has every lane masked; 0 keeps its exp argument finite.
      row_m[i] = row_m[i + 4] = m[r + i] == kNegInf ? 0.f : m[r + i];
    }

    const __m256 scale_v = _mm256_set1_ps(scale);
    const __m256 neg_m = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_load_ps(row_m));
    __m256 sum = _mm256_setzero_ps();
    tok = first_pair;
    for (int64_t j = 0; j < n2; j += 8, tok = _mm256_add_epi32(tok, two)) {
      const __m256 seen = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vis, tok));
      const __m256 e = _mm256_and_ps(seen, Vec256::exp(_mm256_fmadd_ps(_mm256_loadu_ps(p + j), scale_v, neg_m)));
      _mm256_storeu_ps(p + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    alignas(32) float row_sum[8];
    _mm256_store_ps(row_sum, _mm256_add_ps(sum, _mm256_permute2f128_ps(sum, sum, 1)));
    for (int i = 0; i < RB; ++i) l[r + i] += row_sum[i];
  }

  // acc[r + i] += sum_t p_[4 t + i] v[t] for RB rows: per 16-column chunk 2 * RB accumulators stay in
  // registers across all n tokens (stored once per block), each value chunk widened once for the rows.
  template <int RB>
  void accumulate_rows(int64_t r, const T* v, int64_t stride, int64_t n) {
    for (int64_t c = 0; c < full_chunks_; ++c) {
      accumulate_chunk<RB>(r, c, n, [&](int64_t t) { return v + t * stride + 16 * c; });
    }
    if (full_chunks_ * 16 < D_) {
      T tail[16];
      accumulate_chunk<RB>(r, full_chunks_, n, [&](int64_t t) {
        tail_chunk(v + t * stride, tail);
        return static_cast<const T*>(tail);
      });
    }
  }
  template <int RB, typename ChunkOf>
  void accumulate_chunk(int64_t r, int64_t c, int64_t n, ChunkOf chunk_of) {
    const float* p = p_.data();
    float* acc = acc_.data() + r * Dp_ + 16 * c;
    __m256 lo[RB], hi[RB];
    for (int i = 0; i < RB; ++i) {
      lo[i] = _mm256_loadu_ps(acc + i * Dp_);
      hi[i] = _mm256_loadu_ps(acc + i * Dp_ + 8);
    }
    for (int64_t t = 0; t < n; ++t) {
      __m256 xl, xh;
      Chunk16<T>::load(chunk_of(t), xl, xh);
      for (int i = 0; i < RB; ++i) {
        const __m256 pv = _mm256_broadcast_ss(p + 4 * t + i);
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
  std::vector<float> q_, acc_, p_;
  BlockPrefetch next_block_;
};

}  // namespace fast_inference::cpu::avx2

namespace fast_inference::cpu {

void paged_attention_avx2(const PagedAttentionArgs& args, c10::ScalarType dtype) {
  avx2::paged_attention_dispatch<avx2::Avx2Ops>(args, dtype);
}

}  // namespace fast_inference::cpu
