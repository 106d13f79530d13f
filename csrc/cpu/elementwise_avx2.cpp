// AVX2 + FMA build of the decoder's elementwise kernels (elementwise_kernels.h): 8 f32 lanes, bf16 widened
// by a shift and rounded back to nearest even with integer ops (AVX2 has no bf16 conversion).
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include "cpu/elementwise.h"
#include "cpu/elementwise_kernels.h"
#include "cpu/vec_avx2.h"

namespace fast_inference::cpu::avx2 {
namespace {

struct Ops : Vec256 {
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const c10::BFloat16* p) { return load_full(p); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static V select_nonneg(V x, V a, V b) { return _mm256_blendv_ps(a, b, _mm256_cmp_ps(x, zero(), _CMP_LT_OQ)); }

  // f32 bits rounded to nearest even at bit 16 (low half left as garbage); NaN -> the quiet bf16 NaN 0x7FC0.
  static __m256i bf16_bits(V v) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan));
  }
  // f32: the value itself, kept in a register so that a * b + c is never contracted into one FMA (each
  // torch op of the chain rounds its own result, in f32 as well).
  static V round(V v, const float*) {
    __asm__("" : "+x"(v));
    return v;
  }
  static V round(V v, const c10::BFloat16*) {
    return _mm256_castsi256_ps(_mm256_and_si256(bf16_bits(v), _mm256_set1_epi32(int(0xFFFF0000u))));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(c10::BFloat16* p, V v) {
    const __m256i hi = _mm256_srli_epi32(bf16_bits(v), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
};

}  // namespace

void rms_norm_rows(c10::ScalarType dtype, const void* x, int64_t x_stride, void* residual, const void* weight,
                   void* out, int64_t H, float eps, int64_t r0, int64_t r1) {
  elementwise::rms_norm_entry<Ops>(dtype, x, x_stride, residual, weight, out, H, eps, r0, r1);
}
void silu_and_mul_rows(c10::ScalarType dtype, const void* x, int64_t x_stride, void* out, int64_t I, int64_t r0,
                       int64_t r1) {
  elementwise::silu_and_mul_entry<Ops>(dtype, x, x_stride, out, I, r0, r1);
}
void rope_rows(c10::ScalarType dtype, void* x, int64_t st, int64_t sh, const void* cos, const void* sin, int64_t H,
               int64_t D, int64_t i0, int64_t i1) {
  elementwise::rope_entry<Ops>(dtype, x, st, sh, cos, sin, H, D, i0, i1);
}

}  // namespace fast_inference::cpu::avx2
