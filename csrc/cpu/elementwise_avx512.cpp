// AVX-512 build of the decoder's elementwise kernels (elementwise_kernels.h): 16 f32 lanes; bf16 rounded
// with integer ops (vcvtneps2bf16 flushes denormal inputs to zero, c10's conversion does not).
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include "cpu/elementwise.h"
#include "cpu/elementwise_kernels.h"
#include "cpu/vec_avx512.h"

namespace fast_inference::cpu::avx512 {
namespace {

struct Ops : Vec512 {
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const c10::BFloat16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V abs(V a) { return _mm512_abs_ps(a); }
  static V select_nonneg(V x, V a, V b) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero(), _CMP_GE_OQ), b, a); }

  // f32 bits rounded to nearest even at bit 16 (low half left as garbage); NaN -> the quiet bf16 NaN 0x7FC0.
  static __m512i bf16_bits(V v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC00000));
  }
  // f32: the value itself, kept in a register so that a * b + c is never contracted into one FMA (each
  // torch op of the chain rounds its own result, in f32 as well).
  static V round(V v, const float*) {
    __asm__("" : "+v"(v));
    return v;
  }
  static V round(V v, const c10::BFloat16*) {
    return _mm512_castsi512_ps(_mm512_and_si512(bf16_bits(v), _mm512_set1_epi32(int(0xFFFF0000u))));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(c10::BFloat16* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(v), 16)));
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

}  // namespace fast_inference::cpu::avx512
