// Row kernels of apply_token_bitmask: one table per ISA (portable, AVX2, AVX-512), picked at run time.
#pragma once

#include <cstdint>

namespace fast_inference::cpu {

// Each sets row[v] to -inf (neg_inf: its bit pattern in the row's 16-bit type) wherever bit v % 32 of
// words[v / 32] is 0, for v in [0, vocab); set bits and words that are all ones leave the row untouched.
struct TokenBitmaskKernels {
  void (*mask_f32)(float* row, const int32_t* words, int64_t vocab);
  void (*mask_16bit)(uint16_t* row, const int32_t* words, int64_t vocab, uint16_t neg_inf);
};

const TokenBitmaskKernels& portable_token_bitmask_kernels();
const TokenBitmaskKernels& avx2_token_bitmask_kernels();
const TokenBitmaskKernels& avx512_token_bitmask_kernels();

}  // namespace fast_inference::cpu
