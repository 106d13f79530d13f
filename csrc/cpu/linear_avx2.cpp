// AVX2 + FMA kernels of fast_inference::linear: the few-row GEMV that streams bf16 or f32 weights, and the
// bf16 -> f32 widening of weight tiles for the blocked GEMM of larger batches (linear.cpp).
//
// bf16 weights are widened in registers without shuffles: a 32-bit lane of 16 loaded bf16 holds element
// 2i in its low half and 2i+1 in its high half, so (lane << 16) is element 2i as f32 and
// (lane & 0xFFFF0000) is element 2i+1. The input rows are laid out once per call in that same order
// ([even 8][odd 8] per 16 elements), so a weight chunk costs one load, a shift, an and and two FMAs.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fast_inference::cpu::avx2 {

namespace {

constexpr int kChunk = 16;  // weight elements per step: one 32-byte bf16 load, two f32 vectors

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 weight elements -> two f32 vectors in the order the input rows were laid out in (see lay_out_x).
inline void decode(const uint16_t* w, __m256& lo, __m256& hi) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));                          // elements 0, 2, .., 14
  hi = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(int(0xFFFF0000u))));  // 1, 3, .., 15
}
inline void decode(const float* w, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(w);
  hi = _mm256_loadu_ps(w + 8);
}

// Position of element e of a 16-element chunk in the decoded order.
template <typename W>
inline int slot(int e) {
  if constexpr (sizeof(W) == 2) return (e % 2) * 8 + e / 2;
  return e;
}

template <typename X>
inline float x_value(X v) {
  return static_cast<float>(v);
}

// xs[m][Kp]: row m of x as f32 in decoded order, zero past K (the weight tail buffer is zero there too).
template <typename W, typename X>
void lay_out_x(const X* x, int64_t x_stride, int64_t M, int64_t K, int64_t Kp, float* xs) {
  for (int64_t m = 0; m < M; ++m) {
    float* dst = xs + m * Kp;
    std::fill(dst, dst + Kp, 0.f);
    for (int64_t k = 0; k < K; ++k) dst[k / kChunk * kChunk + slot<W>(int(k % kChunk))] = x_value(x[m * x_stride + k]);
  }
}

// Rows [n0, n1) of out[M, N]: NB weight rows at a time, so each decoded input chunk (folded into the FMAs
// as a memory operand) serves NB rows and the NB row streams keep several memory reads in flight.
template <int M, int NB, typename W, typename O>
void gemv_rows(const float* __restrict xs, int64_t Kp, const W* __restrict w, int64_t K, const O* __restrict bias,
               O* __restrict out, int64_t N, int64_t n0, int64_t n1) {
  const int64_t k_main = K / kChunk * kChunk;
  const int64_t tail = K - k_main;
  W tail_buf[NB][kChunk];
  for (int64_t n = n0; n < n1; n += NB) {
    const int nb = int(std::min<int64_t>(NB, n1 - n));
    const W* rows[NB];
    for (int j = 0; j < NB; ++j) rows[j] = w + (n + std::min(j, nb - 1)) * K;  // a short block repeats its last row
    __m256 acc[M][NB];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm256_setzero_ps();
    auto step = [&](const W* const* src, int64_t k, int64_t xk) {
      for (int j = 0; j < NB; ++j) {
        __m256 lo, hi;
        decode(src[j] + k, lo, hi);
        for (int m = 0; m < M; ++m) {
          acc[m][j] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xs + m * Kp + xk), acc[m][j]);
          acc[m][j] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xs + m * Kp + xk + 8), acc[m][j]);
        }
      }
    };
    // The next NB rows (contiguous, right after these) stream into L2 while these compute, one step's share
    // per step, in address order: NB interleaved row streams are short (K = 576 is 1152 bf16 bytes), and the
    // hardware prefetcher hardly ramps up before a row ends.
    const char* next = reinterpret_cast<const char*>(w + (n + NB) * K);
    constexpr int64_t kStepBytes = NB * kChunk * int64_t(sizeof(W));
    for (int64_t k = 0; k < k_main; k += kChunk) {
      for (int64_t line = 0; line < kStepBytes; line += 64) _mm_prefetch(next + k * NB * sizeof(W) + line, _MM_HINT_T1);
      step(rows, k, k);
    }
    if (tail > 0) {  // never read past a row: the last row's tail is the end of the weight
      const W* tails[NB];
      for (int j = 0; j < NB; ++j) {
        std::memset(tail_buf[j], 0, sizeof(tail_buf[j]));
        std::memcpy(tail_buf[j], rows[j] + k_main, tail * sizeof(W));
        tails[j] = tail_buf[j];
      }
      step(tails, 0, k_main);
    }
    for (int j = 0; j < nb; ++j) {
      const float b = bias != nullptr ? static_cast<float>(bias[n + j]) : 0.f;
      for (int m = 0; m < M; ++m) out[m * N + n + j] = O(hsum(acc[m][j]) + b);
    }
  }
}

template <typename W, typename O>
void gemv(const O* x, int64_t x_stride, const W* w, const O* bias, O* out, int64_t M, int64_t N, int64_t K) {
  const int64_t Kp = (K + kChunk - 1) / kChunk * kChunk;
  std::vector<float> xs(M * Kp);
  lay_out_x<W>(x, x_stride, M, K, Kp, xs.data());
  // At least ~256 KiB of weight per task (~10 us of streaming), so a parallel region pays for its fork/join.
  const int64_t grain = std::max<int64_t>(16, (256 * 1024) / std::max<int64_t>(K * int64_t(sizeof(W)), 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    const float* xp = xs.data();
    switch (M) {  // accumulators M x NB + 3 temporaries within the 16 ymm registers
      case 1: gemv_rows<1, 4>(xp, Kp, w, K, bias, out, N, n0, n1); break;
      case 2: gemv_rows<2, 4>(xp, Kp, w, K, bias, out, N, n0, n1); break;
      case 3: gemv_rows<3, 3>(xp, Kp, w, K, bias, out, N, n0, n1); break;
      case 4: gemv_rows<4, 3>(xp, Kp, w, K, bias, out, N, n0, n1); break;
      case 5: gemv_rows<5, 2>(xp, Kp, w, K, bias, out, N, n0, n1); break;
      case 6: gemv_rows<6, 2>(xp, Kp, w, K, bias, out, N, n0, n1); break;
      case 7: gemv_rows<7, 1>(xp, Kp, w, K, bias, out, N, n0, n1); break;
      default: gemv_rows<8, 1>(xp, Kp, w, K, bias, out, N, n0, n1); break;
    }
  });
}

}  // namespace

// x: [M, K] (row stride x_stride, 1 <= M <= 8); w: [N, K] contiguous; bias: [N] or null; out: [M, N].
void linear_bf16_small_m(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* w,
                         const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K) {
  gemv(x, x_stride, reinterpret_cast<const uint16_t*>(w), bias, out, M, N, K);
}
void linear_f32_small_m(const float* x, int64_t x_stride, const float* w, const float* bias, float* out, int64_t M,
                        int64_t N, int64_t K) {
  gemv(x, x_stride, w, bias, out, M, N, K);
}

// rows x K bf16 (row stride src_stride) -> f32 dst [rows, K], 16 at a time in registers.
void widen_bf16_rows(const c10::BFloat16* src, int64_t src_stride, float* dst, int64_t rows, int64_t K) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src + r * src_stride);
    float* d = dst + r * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)));
      _mm256_storeu_ps(d + k, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
    for (; k < K; ++k) d[k] = static_cast<float>(src[r * src_stride + k]);
  }
}

}  // namespace fast_inference::cpu::avx2
