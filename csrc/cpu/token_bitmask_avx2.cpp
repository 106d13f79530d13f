// AVX2 row kernel of apply_token_bitmask: each 8 (f32) or 16 (16-bit) entries turn their bits of the
// word into a lane mask (broadcast, and with one bit per lane, compare with zero) and store -inf there.
#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "cpu/token_bitmask_kernels.h"

namespace fast_inference::cpu {
namespace {

void mask_f32_avx2(float* row, const int32_t* words, int64_t vocab) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i lane_bits = _mm256_setr_epi32(1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7);
  const __m256i zero = _mm256_setzero_si256();
  const int64_t full_words = vocab / 32;
  for (int64_t k = 0; k < full_words; ++k) {
    const int32_t w = words[k];
    if (w == -1) continue;
    float* chunk = row + k * 32;
    for (int g = 0; g < 4; ++g) {
      // Lanes whose bit is 0 get all-ones: maskstore writes -inf there and leaves the rest alone.
      const __m256i v = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(w) >> (8 * g)));
      const __m256i disallowed = _mm256_cmpeq_epi32(_mm256_and_si256(v, lane_bits), zero);
      _mm256_maskstore_ps(chunk + 8 * g, disallowed, neg_inf);
    }
  }
  const uint32_t w = full_words * 32 < vocab ? static_cast<uint32_t>(words[full_words]) : 0xFFFFFFFFu;
  for (int64_t v = full_words * 32, j = 0; v < vocab; ++v, ++j) {
    if (!((w >> j) & 1u)) row[v] = -std::numeric_limits<float>::infinity();
  }
}

void mask_16bit_avx2(uint16_t* row, const int32_t* words, int64_t vocab, uint16_t neg_inf_bits) {
  const __m256i neg_inf = _mm256_set1_epi16(static_cast<int16_t>(neg_inf_bits));
  const __m256i lane_bits = _mm256_setr_epi16(1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7,
                                              1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14,
                                              static_cast<int16_t>(1 << 15));
  const __m256i zero = _mm256_setzero_si256();
  const int64_t full_words = vocab / 32;
  for (int64_t k = 0; k < full_words; ++k) {
    const int32_t w = words[k];
    if (w == -1) continue;
    uint16_t* chunk = row + k * 32;
    if (w == 0) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(chunk), neg_inf);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(chunk + 16), neg_inf);
      continue;
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_set1_epi16(static_cast<int16_t>(static_cast<uint32_t>(w) >> (16 * h)));
      const __m256i disallowed = _mm256_cmpeq_epi16(_mm256_and_si256(v, lane_bits), zero);
      __m256i* p = reinterpret_cast<__m256i*>(chunk + 16 * h);
      _mm256_storeu_si256(p, _mm256_blendv_epi8(_mm256_loadu_si256(p), neg_inf, disallowed));
    }
  }
  const uint32_t w = full_words * 32 < vocab ? static_cast<uint32_t>(words[full_words]) : 0xFFFFFFFFu;
  for (int64_t v = full_words * 32, j = 0; v < vocab; ++v, ++j) {
    if (!((w >> j) & 1u)) row[v] = neg_inf_bits;
  }
}

const TokenBitmaskKernels kAvx2{mask_f32_avx2, mask_16bit_avx2};

}  // namespace

const TokenBitmaskKernels& avx2_token_bitmask_kernels() { return kAvx2; }

}  // namespace fast_inference::cpu
