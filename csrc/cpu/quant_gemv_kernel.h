// The decode-sized quantized GEMV (M <= 8): weight blocks streamed once and dotted in int8 with activations
// quantized to 32-value int8 blocks (ggml's Q8 idea), or, for K-quants, rows dequantized in cache and dotted
// in f32. Included by quant_gemv_avx2.cpp and quant_gemv_avx512.cpp, which compile it for their ISA
// (the AVX-512 build uses AVX512-VNNI's dpbusd for the int8 dot).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "quant_formats.h"

namespace fast_inference::cpu::FI_QUANT_ISA {

using namespace fast_inference::quant;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum over 32 lanes of u[i] * s[i] (u unsigned 8-bit, s signed 8-bit), as 8 int32 partial sums.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// x: [M, K] f32 (row stride x_stride) -> xq: int8 [M, nb * 32], xscale / xsum: f32 [M, nb] where
// x ~= xq * xscale per 32-block and xsum = xscale * sum(xq) (the Q4 zero-point terms need it). K is padded
// with zeros up to nb * 32.
void quantize_activations(const float* x, int64_t x_stride, int64_t M, int64_t K, int64_t nb, int8_t* xq,
                                 float* xscale, float* xsum) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      float v[32];
      const int64_t k0 = b * 32, len = std::min<int64_t>(32, K - k0);
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) {
        v[i] = i < len ? x[m * x_stride + k0 + i] : 0.f;
        amax = std::max(amax, std::fabs(v[i]));
      }
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      int8_t* q = xq + (m * nb + b) * 32;
      for (int i = 0; i < 32; ++i) {
        q[i] = static_cast<int8_t>(std::nearbyint(v[i] * id));
        sum += q[i];
      }
      xscale[m * nb + b] = d;
      xsum[m * nb + b] = d * sum;
    }
  }
}

inline float fp16(uint16_t h) { return _cvtsh_ss(h); }

// Rows [n0, n1) of the Q4_0 / Q4_1 / Q8_0 weight w ([N, row_bytes]) against M quantized activation rows:
// out[m * N + n] = sum_k x[m, k] * w[n, k]. M is a template argument so the accumulators stay in registers.
template <int64_t QT, int M>
void dot_rows_q8_m(const int8_t* xq, const float* xscale, const float* xsum, int64_t nb, const uint8_t* w,
                   int64_t row_bytes, int64_t n0, int64_t n1, float* out, int64_t N) {
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m256 acc[M];
    float zero_point[M];
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm256_setzero_ps();
      zero_point[m] = 0.f;
    }
    for (int64_t b = 0; b < nb; ++b) {
      __m256i wq;
      float d, zp = 0.f;  // per-block scale; zero point multiplying xscale * sum(xq)
      if constexpr (QT == kQ8_0) {
        const auto* blk = reinterpret_cast<const BlockQ8_0*>(row) + b;
        wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk->qs));
        d = fp16(blk->d);
      } else if constexpr (QT == kQ4_0) {
        const auto* blk = reinterpret_cast<const BlockQ4_0*>(row) + b;
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk->qs));
        wq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low_nibbles);
        d = fp16(blk->d);
        zp = -8.f * d;
      } else {
        const auto* blk = reinterpret_cast<const BlockQ4_1*>(row) + b;
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk->qs));
        wq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low_nibbles);
        d = fp16(blk->d);
        zp = fp16(blk->m);
      }
      // Q8_0 weights are signed: move the sign onto the activations so the dot is unsigned x signed.
      const __m256i wu = QT == kQ8_0 ? _mm256_sign_epi8(wq, wq) : wq;
      for (int m = 0; m < M; ++m) {
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (m * nb + b) * 32));
        if constexpr (QT == kQ8_0) xv = _mm256_sign_epi8(xv, wq);
        const __m256 dot = _mm256_cvtepi32_ps(dot_u8s8(wu, xv));
        acc[m] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * xscale[m * nb + b]), acc[m]);
        if constexpr (QT != kQ8_0) zero_point[m] += zp * xsum[m * nb + b];
      }
    }
    for (int m = 0; m < M; ++m) out[m * N + n] = hsum(acc[m]) + zero_point[m];
  }
}

template <int64_t QT>
void dot_rows_q8_qt(const int8_t* xq, const float* xscale, const float* xsum, int64_t M, int64_t nb,
                    const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* out, int64_t N) {
  switch (M) {
    case 1: return dot_rows_q8_m<QT, 1>(xq, xscale, xsum, nb, w, row_bytes, n0, n1, out, N);
    case 2: return dot_rows_q8_m<QT, 2>(xq, xscale, xsum, nb, w, row_bytes, n0, n1, out, N);
    case 3: return dot_rows_q8_m<QT, 3>(xq, xscale, xsum, nb, w, row_bytes, n0, n1, out, N);
    case 4: return dot_rows_q8_m<QT, 4>(xq, xscale, xsum, nb, w, row_bytes, n0, n1, out, N);
    case 5: return dot_rows_q8_m<QT, 5>(xq, xscale, xsum, nb, w, row_bytes, n0, n1, out, N);
    case 6: return dot_rows_q8_m<QT, 6>(xq, xscale, xsum, nb, w, row_bytes, n0, n1, out, N);
    case 7: return dot_rows_q8_m<QT, 7>(xq, xscale, xsum, nb, w, row_bytes, n0, n1, out, N);
    default: return dot_rows_q8_m<QT, 8>(xq, xscale, xsum, nb, w, row_bytes, n0, n1, out, N);
  }
}

// M <= 8 activation rows (quantized by quantize_activations) against rows [n0, n1) of w.
void dot_rows_q8(int64_t qtype, const int8_t* xq, const float* xscale, const float* xsum, int64_t M,
                 int64_t nb, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* out, int64_t N) {
  if (qtype == kQ8_0) return dot_rows_q8_qt<kQ8_0>(xq, xscale, xsum, M, nb, w, row_bytes, n0, n1, out, N);
  if (qtype == kQ4_0) return dot_rows_q8_qt<kQ4_0>(xq, xscale, xsum, M, nb, w, row_bytes, n0, n1, out, N);
  return dot_rows_q8_qt<kQ4_1>(xq, xscale, xsum, M, nb, w, row_bytes, n0, n1, out, N);
}

// Rows [n0, n1) of a K-quant weight: each row dequantized into `row_buf` (f32 [nb * 256], in cache), then
// dotted with the M f32 activation rows (x: [M, K], row stride x_stride).
void dot_rows_dequant(int64_t qtype, const float* x, int64_t x_stride, int64_t M, int64_t K,
                             const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* out, int64_t N,
                             float* row_buf) {
  const int64_t nb = blocks_per_row(qtype, K), bbytes = block_bytes(qtype), belems = block_elems(qtype);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t b = 0; b < nb; ++b) dequantize_block(qtype, row + b * bbytes, row_buf + b * belems);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * x_stride;
      __m256 acc = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), _mm256_loadu_ps(row_buf + k), acc);
      float s = hsum(acc);
      for (; k < K; ++k) s += xm[k] * row_buf[k];
      out[m * N + n] = s;
    }
  }
}

}  // namespace fast_inference::cpu::FI_QUANT_ISA
