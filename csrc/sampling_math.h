// Bit-reproducible float math shared by the CPU and CUDA sampling kernels: exp, fixed-point mass, draws.
//
// Why: a seeded request must pick the same token on CPU and CUDA. Token choice depends on the
// probability mass of each token, so both devices must compute the same numbers. exp() below uses only
// IEEE-exact operations (explicit fma, exact power-of-two scaling), and masses are summed as 64-bit
// fixed-point integers, whose sums do not depend on the reduction order.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "philox.h"

namespace fast_inference {

// e^z for z <= 0 (z = (logit - max) / temperature). Returns exactly 1 at z = 0 and exactly 0 below
// kExpMinArg, so every non-zero result is a normal float (flush-to-zero modes cannot change it).
constexpr float kExpMinArg = -86.0f;
// Fixed-point scale of one unit of unnormalized probability e in [0, 1]: mass q = trunc(e * 2^40).
// A row of V tokens sums to at most V * 2^40, so V < 2^23 keeps sums inside uint64.
constexpr float kMassScale = 1099511627776.0f;  // 2^40
constexpr int64_t kMaxSamplingVocab = int64_t{1} << 23;
// What a sample kernel writes instead of a token for a row that cannot be sampled.
constexpr int64_t kRowHasNaN = -1;     // a NaN or +inf logit
constexpr int64_t kRowAllNegInf = -2;  // no finite logit

#if defined(__CUDACC__)
FI_HOST_DEVICE float fi_fma(float a, float b, float c) { return fmaf(a, b, c); }
FI_HOST_DEVICE float fi_bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, 4);
  return f;
#endif
}
FI_HOST_DEVICE uint32_t fi_float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
#endif
}
#else
FI_HOST_DEVICE float fi_fma(float a, float b, float c) { return std::fma(a, b, c); }
FI_HOST_DEVICE float fi_bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
FI_HOST_DEVICE uint32_t fi_float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
#endif

// Constants of fi_exp (the AVX-512 path uses the same ones, in the same order of operations).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;        // ln 2, high part: exact times small integers
constexpr float kLn2Lo = 1.42860682030941723212e-6f;
constexpr float kRoundMagic = 12582912.0f;          // 1.5 * 2^23: adding it rounds to an integer
constexpr float kExpC6 = 1.0f / 720.0f, kExpC5 = 1.0f / 120.0f, kExpC4 = 1.0f / 24.0f;
constexpr float kExpC3 = 1.0f / 6.0f, kExpC2 = 0.5f;

// z in [kExpMinArg, 0] -> e^z, else (z < kExpMinArg or -inf) -> 0. Caller never passes z > 0 or NaN.
FI_HOST_DEVICE float fi_exp(float z) {
  if (!(z >= kExpMinArg)) return 0.0f;
  const float t = fi_fma(z, kLog2e, kRoundMagic);
  const float n = t - kRoundMagic;  // round(z * log2 e), exact
  float r = fi_fma(-n, kLn2Hi, z);
  r = fi_fma(-n, kLn2Lo, r);
  float p = fi_fma(kExpC6, r, kExpC5);
  p = fi_fma(p, r, kExpC4);
  p = fi_fma(p, r, kExpC3);
  p = fi_fma(p, r, kExpC2);
  p = fi_fma(p, r, 1.0f);
  p = fi_fma(p, r, 1.0f);
  const int32_t ni = static_cast<int32_t>(fi_float_to_bits(t)) - static_cast<int32_t>(fi_float_to_bits(kRoundMagic));
  const float scale = fi_bits_to_float(static_cast<uint32_t>(ni + 127) << 23);  // 2^n, n in [-125, 0]
  return p * scale;  // exact power-of-two scaling of a normal number: the same on every device
}

// Fixed-point mass of one token from the bit pattern of its e (0 for filtered tokens).
FI_HOST_DEVICE uint64_t fi_mass(uint32_t ebits) {
  return static_cast<uint64_t>(fi_bits_to_float(ebits) * kMassScale);
}

// Uniform integer in [0, total) from 64 random bits (multiply-high: exact, no modulo bias worth naming).
FI_HOST_DEVICE uint64_t fi_scale_random(uint64_t random64, uint64_t total) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(random64, total);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(random64) * total) >> 64);
#endif
}

// Top-p target mass: the kept set is the smallest set of most likely tokens holding >= top_p of `total`.
// At least one unit, so the most likely token always survives (top_p <= 0 means "the top token").
FI_HOST_DEVICE uint64_t fi_top_p_target(float top_p, uint64_t total) {
  const double target = static_cast<double>(top_p) * static_cast<double>(total);
  if (!(target >= 1.0)) return 1;
  if (target >= static_cast<double>(total)) return total;
  return static_cast<uint64_t>(target);
}

}  // namespace fast_inference
