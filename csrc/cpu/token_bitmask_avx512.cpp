// AVX-512 row kernel of apply_token_bitmask: the complement of each word is the store mask itself, so a
// word costs two masked stores (f32) or one (16-bit), the last word's mask cut at the vocabulary's end.
#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "cpu/token_bitmask_kernels.h"

namespace fast_inference::cpu {
namespace {

// Bits of the word's entries that lie inside the vocabulary.
inline uint32_t live_bits(int64_t k, int64_t vocab) {
  const int64_t left = vocab - k * 32;
  return left >= 32 ? 0xFFFFFFFFu : (1u << left) - 1u;
}

void mask_f32_avx512(float* row, const int32_t* words, int64_t vocab) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t num_words = (vocab + 31) / 32;
  for (int64_t k = 0; k < num_words; ++k) {
    const uint32_t disallowed = ~static_cast<uint32_t>(words[k]) & live_bits(k, vocab);
    if (disallowed == 0) continue;
    float* chunk = row + k * 32;
    _mm512_mask_storeu_ps(chunk, static_cast<__mmask16>(disallowed), neg_inf);
    _mm512_mask_storeu_ps(chunk + 16, static_cast<__mmask16>(disallowed >> 16), neg_inf);
  }
}

void mask_16bit_avx512(uint16_t* row, const int32_t* words, int64_t vocab, uint16_t neg_inf_bits) {
  const __m512i neg_inf = _mm512_set1_epi16(static_cast<int16_t>(neg_inf_bits));
  const int64_t num_words = (vocab + 31) / 32;
  for (int64_t k = 0; k < num_words; ++k) {
    const uint32_t disallowed = ~static_cast<uint32_t>(words[k]) & live_bits(k, vocab);
    if (disallowed == 0) continue;
    _mm512_mask_storeu_epi16(row + k * 32, static_cast<__mmask32>(disallowed), neg_inf);
  }
}

const TokenBitmaskKernels kAvx512{mask_f32_avx512, mask_16bit_avx512};

}  // namespace

const TokenBitmaskKernels& avx512_token_bitmask_kernels() { return kAvx512; }

}  // namespace fast_inference::cpu
