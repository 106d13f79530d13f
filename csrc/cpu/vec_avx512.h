// AVX-512 vector helpers (16 x f32): loads that widen f16/bf16 to f32 in registers, exp, reductions.
// Only for translation units compiled with the AVX-512 flags (*_avx512.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>

namespace fast_inference::cpu::avx512 {

struct Vec512 {
  using V = __m512;
  static constexpr int W = 16;

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
  static float reduce_max(V v) { return _mm512_reduce_max_ps(v); }

  // count (1..16) elements of a row widened to f32; lanes past count are zero and nothing past is read.
  static __mmask16 mask(int count) { return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1); }
  static V load_f32(const float* p, int count) { return _mm512_maskz_loadu_ps(mask(count), p); }
  static V load_f32(const c10::Half* p, int count) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(count), p));
  }
  static V load_f32(const c10::BFloat16* p, int count) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask(count), p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));  // bf16 is the top half of an f32
  }

  // exp(x) for x <= 0 (softmax arguments): 2^(x log2 e) split into 2^n * 2^f, |f| <= 1/2, with a
  // degree-6 polynomial for 2^f (relative error ~1e-7) and vscalefps for 2^n.
  static V exp(V x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const V t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    const V n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(t, n);
    V p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
  }
};

}  // namespace fast_inference::cpu::avx512
