// Row-level primitives of the CPU sampling kernels: one table per ISA (portable, AVX-512), picked at run time.
#pragma once

#include <cstdint>

namespace fast_inference::cpu {

// Buffers that primitives write with full 16-lane stores need this many slack entries past their count.
constexpr int64_t kVectorSlack = 16;

struct SamplingRowKernels {
  // max of x[0:n]; *bad is set when a NaN or +inf is present.
  float (*row_max)(const float* x, int64_t n, bool* bad);
  // Index of the first maximum of x[0:n] (x holds no NaN).
  int64_t (*row_argmax)(const float* x, int64_t n);
  // Appends the values of x[0:n] that are > thr to out; returns how many (out needs n + slack room).
  int64_t (*filter_gt)(const float* x, int64_t n, float thr, float* out);
  // Writes the indices i with x[i] >= thr to idx in increasing order; returns the count, or -1 once it
  // would exceed cap (idx needs cap + slack room).
  int64_t (*gather_ge)(const float* x, int64_t n, float thr, int32_t* idx, int64_t cap);
  // ebits[i] = bits of fi_exp((x[i] - m) * inv_t) where x[i] >= lo, else 0; returns the summed mass.
  uint64_t (*exp_bits)(const float* x, int64_t n, float m, float inv_t, float lo, uint32_t* ebits);
  // Sum of fi_mass(bits[i]) over the bits[i] >= t.
  uint64_t (*mass_ge)(const uint32_t* bits, int64_t n, uint32_t t);
  // Copies the bits[i] >= t (keep_ge) or < t (!keep_ge) to out in order; out may alias bits.
  int64_t (*compact)(const uint32_t* bits, int64_t n, uint32_t t, bool keep_ge, uint32_t* out);
  // Smallest i such that the mass of {j <= i : bits[j] >= t} exceeds r (r < total mass over bits >= t).
  int64_t (*draw)(const uint32_t* bits, int64_t n, uint32_t t, uint64_t r);
  // Sum of fi_exp(x[i] - m) (the log-sum-exp denominator of compute_logprobs).
  double (*sum_exp)(const float* x, int64_t n, float m);
};

const SamplingRowKernels& portable_sampling_kernels();
const SamplingRowKernels* avx512_sampling_kernels();  // nullptr when not compiled in

}  // namespace fast_inference::cpu
