// bf16 GEMV-like y = x W^T (+ b) for a few input rows (decode), AVX-512 BF16 (vdpbf16ps).
//
// Each weight row [K] is one sequential stream read exactly once for all M input rows, with independent
// accumulators so loads never wait on the dot-product latency: a single core then streams the weight at
// close to its memory bandwidth (oneDNN's prepacked path, tuned for larger M, reaches about two thirds).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace fast_inference::cpu::avx512 {

namespace {

inline __m512bh load_bf16x32(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_bf16x32(const uint16_t* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// Rows [n0, n1) of out[M, N] for M input rows (x: [M, K], row stride x_stride).
template <int M>
void rows_kernel(const uint16_t* __restrict x, int64_t x_stride, const uint16_t* __restrict w,
                 const c10::BFloat16* __restrict bias, c10::BFloat16* __restrict out, int64_t N, int64_t K,
                 int64_t n0, int64_t n1) {
  const int64_t k_main = K / 64 * 64;
  const int64_t k_tail = K - k_main;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    __m512 acc0[M], acc1[M];
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_main; k += 64) {
      const __m512bh w0 = load_bf16x32(row + k);
      const __m512bh w1 = load_bf16x32(row + k + 32);
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, load_bf16x32(x + m * x_stride + k));
        acc1[m] = _mm512_dpbf16_ps(acc1[m], w1, load_bf16x32(x + m * x_stride + k + 32));
      }
    }
    if (k_tail > 0) {
      const __mmask32 lo = k_tail >= 32 ? ~__mmask32(0) : (__mmask32(1) << k_tail) - 1;
      const __mmask32 hi = k_tail > 32 ? (__mmask32(1) << (k_tail - 32)) - 1 : 0;
      const __m512bh w0 = load_bf16x32(row + k_main, lo);
      const __m512bh w1 = load_bf16x32(row + k_main + 32, hi);
      for (int m = 0; m < M; ++m) {
        acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, load_bf16x32(x + m * x_stride + k_main, lo));
        acc1[m] = _mm512_dpbf16_ps(acc1[m], w1, load_bf16x32(x + m * x_stride + k_main + 32, hi));
      }
    }
    const float b = bias != nullptr ? static_cast<float>(bias[n]) : 0.0f;
    for (int m = 0; m < M; ++m) {
      out[m * N + n] = c10::BFloat16(_mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) + b);
    }
  }
}

}  // namespace

// x: [M, K] bf16 (row stride x_stride, 1 <= M <= 8); w: [N, K] contiguous; bias: [N] or null; out: [M, N].
void linear_bf16_small_m(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* w,
                         const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K) {
  const auto* xp = reinterpret_cast<const uint16_t*>(x);
  const auto* wp = reinterpret_cast<const uint16_t*>(w);
  // Grain: at least ~256 KiB of weight per task (~10 us of streaming), so a parallel region is worth its
  // fork/join; smaller projections run inline on the calling thread.
  const int64_t grain = std::max<int64_t>(16, (256 * 1024) / std::max<int64_t>(K * 2, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: rows_kernel<1>(xp, x_stride, wp, bias, out, N, K, n0, n1); break;
      case 2: rows_kernel<2>(xp, x_stride, wp, bias, out, N, K, n0, n1); break;
      case 3: rows_kernel<3>(xp, x_stride, wp, bias, out, N, K, n0, n1); break;
      case 4: rows_kernel<4>(xp, x_stride, wp, bias, out, N, K, n0, n1); break;
      case 5: rows_kernel<5>(xp, x_stride, wp, bias, out, N, K, n0, n1); break;
      case 6: rows_kernel<6>(xp, x_stride, wp, bias, out, N, K, n0, n1); break;
      case 7: rows_kernel<7>(xp, x_stride, wp, bias, out, N, K, n0, n1); break;
      default: rows_kernel<8>(xp, x_stride, wp, bias, out, N, K, n0, n1); break;
    }
  });
}

}  // namespace fast_inference::cpu::avx512
