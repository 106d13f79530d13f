// AVX-512 row primitives of the CPU sampling kernels (bit-identical results to the portable ones).
//
// exp matches fi_exp operation for operation (fused multiply-adds in the same order), so the token a
// seed draws does not depend on which ISA ran. Compaction uses register compress + full store, which
// is much faster than compress-to-memory on AMD Zen 4; buffers carry kVectorSlack entries of room.
#include <immintrin.h>

// GCC 12 reports its own maskz_* intrinsic headers as reading uninitialized values (a known false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <cstdint>
#include <limits>

#include "cpu/sampling_kernels.h"
#include "sampling_math.h"

namespace fast_inference::cpu {
namespace {

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1u);
}

// fi_exp on 16 lanes.
inline __m512 exp16(__m512 z) {
  const __mmask16 valid = _mm512_cmp_ps_mask(z, _mm512_set1_ps(kExpMinArg), _CMP_GE_OQ);
  const __m512 t = _mm512_fmadd_ps(z, _mm512_set1_ps(kLog2e), _mm512_set1_ps(kRoundMagic));
  const __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(kRoundMagic));
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), z);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExpC6), r, _mm512_set1_ps(kExpC5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i ni = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(static_cast<int>(fi_float_to_bits(kRoundMagic))));
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23));
  return _mm512_maskz_mov_ps(valid, _mm512_mul_ps(p, scale));
}

// Fixed-point masses of 16 e values (bit patterns), zero where the mask is off, summed into acc.
inline __m512i add_mass16(__m512i acc, __mmask16 mask, __m512i bits) {
  const __m512 q = _mm512_mul_ps(_mm512_maskz_mov_ps(mask, _mm512_castsi512_ps(bits)), _mm512_set1_ps(kMassScale));
  acc = _mm512_add_epi64(acc, _mm512_cvttps_epu64(_mm512_castps512_ps256(q)));
  return _mm512_add_epi64(acc, _mm512_cvttps_epu64(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(q), 1))));
}

float row_max_avx512(const float* x, int64_t n, bool* bad) {
  __m512 m0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  const __m512 pos_inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __mmask16 flagged = 0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    flagged |= _mm512_cmp_ps_mask(a, pos_inf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(b, pos_inf, _CMP_NLT_UQ);
    m0 = _mm512_max_ps(m0, a);
    m1 = _mm512_max_ps(m1, b);
  }
  for (; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 a = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), k, x + i);
    flagged |= _mm512_cmp_ps_mask(a, pos_inf, _CMP_NLT_UQ);
    m0 = _mm512_max_ps(m0, a);
  }
  *bad = flagged != 0;  // NLT_UQ: true for NaN and for +inf
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

int64_t row_argmax_avx512(const float* x, int64_t n) {
  bool bad = false;
  const __m512 m = _mm512_set1_ps(row_max_avx512(x, n, &bad));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = _mm512_mask_cmp_ps_mask(tail_mask(n - i), _mm512_maskz_loadu_ps(tail_mask(n - i), x + i), m, _CMP_EQ_OQ);
    if (k != 0) return i + __builtin_ctz(k);
  }
  return 0;
}

int64_t filter_gt_avx512(const float* x, int64_t n, float thr, float* out) {
  const __m512 t = _mm512_set1_ps(thr);
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + i);
    const __mmask16 k = _mm512_mask_cmp_ps_mask(live, v, t, _CMP_GT_OQ);
    if (k == 0) continue;
    _mm512_storeu_ps(out + cnt, _mm512_maskz_compress_ps(k, v));
    cnt += __builtin_popcount(k);
  }
  return cnt;
}

int64_t gather_ge_avx512(const float* x, int64_t n, float thr, int32_t* idx, int64_t cap) {
  const __m512 t = _mm512_set1_ps(thr);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = tail_mask(n - i);
    const __mmask16 k = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, x + i), t, _CMP_GE_OQ);
    if (k == 0) continue;
    const int c = __builtin_popcount(k);
    if (cnt + c > cap) return -1;
    const __m512i ids = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(i)));
    _mm512_storeu_si512(idx + cnt, _mm512_maskz_compress_epi32(k, ids));
    cnt += c;
  }
  return cnt;
}

uint64_t exp_bits_avx512(const float* x, int64_t n, float m, float inv_t, float lo, uint32_t* ebits) {
  const __m512 vm = _mm512_set1_ps(m), vt = _mm512_set1_ps(inv_t), vlo = _mm512_set1_ps(lo);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + i);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(live, v, vlo, _CMP_GE_OQ);
    const __m512 e = _mm512_maskz_mov_ps(keep, exp16(_mm512_mul_ps(_mm512_sub_ps(v, vm), vt)));
    const __m512i bits = _mm512_castps_si512(e);
    _mm512_mask_storeu_epi32(ebits + i, live, bits);
    acc = add_mass16(acc, keep, bits);
  }
  return static_cast<uint64_t>(_mm512_reduce_add_epi64(acc));
}

uint64_t mass_ge_avx512(const uint32_t* bits, int64_t n, uint32_t t) {
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(t));
  __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i a = _mm512_loadu_si512(bits + i), b = _mm512_loadu_si512(bits + i + 16);
    acc0 = add_mass16(acc0, _mm512_cmpge_epu32_mask(a, vt), a);
    acc1 = add_mass16(acc1, _mm512_cmpge_epu32_mask(b, vt), b);
  }
  for (; i < n; i += 16) {
    const __mmask16 live = tail_mask(n - i);
    const __m512i a = _mm512_maskz_loadu_epi32(live, bits + i);
    acc0 = add_mass16(acc0, _mm512_mask_cmpge_epu32_mask(live, a, vt), a);
  }
  return static_cast<uint64_t>(_mm512_reduce_add_epi64(_mm512_add_epi64(acc0, acc1)));
}

int64_t compact_avx512(const uint32_t* bits, int64_t n, uint32_t t, bool keep_ge, uint32_t* out) {
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(t));
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = tail_mask(n - i);
    const __m512i a = _mm512_maskz_loadu_epi32(live, bits + i);
    const __mmask16 ge = _mm512_mask_cmpge_epu32_mask(live, a, vt);
    const __mmask16 k = keep_ge ? ge : static_cast<__mmask16>(live & ~ge);
    // Writes 16 lanes at out + cnt <= bits + i: only entries already loaded are overwritten in place.
    _mm512_storeu_si512(out + cnt, _mm512_maskz_compress_epi32(k, a));
    cnt += __builtin_popcount(k);
  }
  return cnt;
}

int64_t draw_avx512(const uint32_t* bits, int64_t n, uint32_t t, uint64_t r) {
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(t));
  uint64_t acc = 0;
  int64_t last = -1;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = tail_mask(n - i);
    const __m512i a = _mm512_maskz_loadu_epi32(live, bits + i);
    const __mmask16 k = _mm512_mask_cmpge_epu32_mask(live, a, vt);
    if (k == 0) continue;
    const uint64_t block = static_cast<uint64_t>(_mm512_reduce_add_epi64(add_mass16(_mm512_setzero_si512(), k, a)));
    if (acc + block > r) {
      for (int64_t j = i; j < i + 16; ++j) {
        if ((k >> (j - i)) & 1) {
          acc += fi_mass(bits[j]);
          if (acc > r) return j;
        }
      }
    }
    acc += block;
    last = i + 31 - __builtin_clz(static_cast<uint32_t>(k));
  }
  return last;
}

double sum_exp_avx512(const float* x, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_add_ps(s0, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm)));
    s1 = _mm512_add_ps(s1, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vm)));
  }
  for (; i < n; i += 16) {
    const __mmask16 live = tail_mask(n - i);
    s0 = _mm512_add_ps(s0, _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, x + i), vm))));
  }
  return static_cast<double>(_mm512_reduce_add_ps(_mm512_add_ps(s0, s1)));
}

const SamplingRowKernels kAvx512{row_max_avx512, row_argmax_avx512, filter_gt_avx512,
                                 gather_ge_avx512, exp_bits_avx512,   mass_ge_avx512,
                                 compact_avx512,   draw_avx512,       sum_exp_avx512};

}  // namespace

const SamplingRowKernels* avx512_sampling_kernels() { return &kAvx512; }

}  // namespace fast_inference::cpu
