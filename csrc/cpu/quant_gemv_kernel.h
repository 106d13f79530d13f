// The CPU quantized-linear kernels for one ISA: the decode-sized GEMV (M <= 8) as int8 dot products of the
// weight blocks with activations quantized to 32-value int8 blocks, and the vectorized slab dequantization the
// larger-M path feeds to a GEMM. Included by quant_gemv_avx2.cpp (256-bit, maddubs/madd) and
// quant_gemv_avx512.cpp (FI_QUANT_WIDE: 512-bit, AVX512-VNNI dpbusd), which compile it for their ISA.
//
// Every format is decoded, a vector of kChunk weights at a time, into the same three things, so one GEMV loop
// and one dequantizer serve all six formats:
//   u: the kChunk weights as unsigned bytes (the int8 dot's unsigned operand),
//   d: per dot lane (4 consecutive weights) the float scale of those weights,
//   z: per dot lane the float offset of those weights, so that weight = u * d + z.
// Then x . w = sum over lanes of d * xscale * dot(u, xq) + z * (xscale * sum of the lane's xq): the second
// term is read from zsum, precomputed per activation lane when the activations are quantized (once per call,
// shared by every row and thread).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "quant_formats.h"

namespace fast_inference::cpu::FI_QUANT_ISA {

using namespace fast_inference::quant;

// ---- vector width ---------------------------------------------------------------------------------------
#if defined(FI_QUANT_WIDE)
constexpr int kChunk = 64;  // weights per vector
using VI = __m512i;
using VF = __m512;
inline VF fzero() { return _mm512_setzero_ps(); }
inline VF fmadd(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF fmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF fset1(float v) { return _mm512_set1_ps(v); }
inline VF floadu(const float* p) { return _mm512_loadu_ps(p); }
inline void fstoreu(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline void fstoreu_bf16(uint16_t* p, VF v) {  // f32 -> bf16, round to nearest even
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
inline VI iloadu(const void* p) { return _mm512_loadu_si512(p); }
inline VF cvt(VI v) { return _mm512_cvtepi32_ps(v); }
inline float hsum(VF v) { return _mm512_reduce_add_ps(v); }
// sum over each lane's 4 bytes of u (unsigned) * s (signed), as 16 int32
inline VI dot_u8s8(VI u, VI s) { return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s); }
inline VI bytes(int v) { return _mm512_set1_epi8(static_cast<char>(v)); }
inline VI band(VI a, VI b) { return _mm512_and_si512(a, b); }
inline VI bor(VI a, VI b) { return _mm512_or_si512(a, b); }
inline VI srl16(VI a, int n) { return _mm512_srli_epi16(a, n); }
inline VI sll16(VI a, int n) { return _mm512_slli_epi16(a, n); }
// [lo, hi] of two 256-bit halves
inline VI join(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
inline VF joinf(__m256 lo, __m256 hi) { return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1); }
#else
constexpr int kChunk = 32;
using VI = __m256i;
using VF = __m256;
inline VF fzero() { return _mm256_setzero_ps(); }
inline VF fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF fmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF fset1(float v) { return _mm256_set1_ps(v); }
inline VF floadu(const float* p) { return _mm256_loadu_ps(p); }
inline void fstoreu(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline void fstoreu_bf16(uint16_t* p, VF v) {  // f32 -> bf16, round to nearest even (integer arithmetic)
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(top, top), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline VI iloadu(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VF cvt(VI v) { return _mm256_cvtepi32_ps(v); }
inline float hsum(VF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// maddubs pairs cannot saturate here: |u| <= 63 for the 4/5/6-bit formats, and Q8_0 uses |w| <= 128 with
// |x| <= 127 (2 * 128 * 127 < 32767).
inline VI dot_u8s8(VI u, VI s) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); }
inline VI bytes(int v) { return _mm256_set1_epi8(static_cast<char>(v)); }
inline VI band(VI a, VI b) { return _mm256_and_si256(a, b); }
inline VI bor(VI a, VI b) { return _mm256_or_si256(a, b); }
inline VI srl16(VI a, int n) { return _mm256_srli_epi16(a, n); }
inline VI sll16(VI a, int n) { return _mm256_slli_epi16(a, n); }
#endif
// x with the sign of s (zeroed where s is 0): the AVX2 Q8_0 path's signed-times-signed dot.
inline VI apply_sign(VI x, VI s) {
#if defined(FI_QUANT_WIDE)
  (void)s;
  return x;  // the 512-bit Q8_0 path offsets the weights instead
#else
  return _mm256_sign_epi8(x, s);
#endif
}

inline float fp16(uint16_t h) { return _cvtsh_ss(h); }
inline __m256i load256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m128i load128(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// ---- activations ------------------------------------------------------------------------------------------
// x [M, K] quantized to int8 in 32-value blocks (scale amax / 127, ggml's Q8 idea), padded with zeros to Kp (a
// multiple of 256, so every format's whole blocks and chunks are covered). Per dot lane (4 values):
//   scale[m, k / 4] = the block's scale; zsum[m, k / 4] = scale * (sum of the 16-value group's xq) / 4, so
//   summing a lane vector of zero points against it gives each 16-value group's offset * sum of its x.
struct QuantizedActivations {
  const int8_t* q;     // [M, Kp]
  const float* scale;  // [M, Kp / 4]
  const float* zsum;   // [M, Kp / 4]
  int64_t Kp;
};

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// 32 values v[0..3] -> 32 int8 at q, scale amax / 127, round to nearest even (ggml's Q8 idea); returns the
// scale, with the sums of the first and the last 16 quantized values.
inline float quantize_block32(const __m256 v[4], int8_t* q, int32_t& sum_lo, int32_t& sum_hi) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i unshuffle = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the two packs' lane order
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], abs_mask));
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_movehdup_ps(a));
  const float d = _mm_cvtss_f32(a) / 127.f, id = d > 0.f ? 1.f / d : 0.f;
  __m256i qi[4];
  for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
  sum_lo = hsum_i32(_mm256_add_epi32(qi[0], qi[1]));
  sum_hi = hsum_i32(_mm256_add_epi32(qi[2], qi[3]));
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(packed, unshuffle));
  return d;
}

// x: [M, K] f32, row stride x_stride -> q [M, Kp], scale / zsum [M, Kp / 4] (see QuantizedActivations).
void quantize_activations(const float* x, int64_t x_stride, int64_t M, int64_t K, int64_t Kp, int8_t* q,
                          float* scale, float* zsum) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k0 = 0; k0 < Kp; k0 += 32) {
      alignas(32) float tail[32];
      const float* src = x + m * x_stride + k0;
      if (k0 + 32 > K) {  // the partial or all-padding blocks at the end
        for (int i = 0; i < 32; ++i) tail[i] = k0 + i < K ? src[i] : 0.f;
        src = tail;
      }
      __m256 v[4];
      for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(src + 8 * i);
      int32_t sum_lo, sum_hi;
      const float d = quantize_block32(v, q + m * Kp + k0, sum_lo, sum_hi);
      float* s = scale + m * (Kp / 4) + k0 / 4;
      float* z = zsum + m * (Kp / 4) + k0 / 4;
      for (int i = 0; i < 8; ++i) {
        s[i] = d;
        z[i] = d * static_cast<float>(i < 4 ? sum_lo : sum_hi) * 0.25f;
      }
    }
  }
}

// ---- formats: weights -> (u, d, z) a chunk at a time --------------------------------------------------------
// Each format: kGroup values share one begin() (a block pair, a block, or a K-quant super-block's scales);
// chunk(c) decodes the c-th kChunk values of the group. kHasZero: z is not all zero. kSigned: u holds |w| and
// s the signed weights (the AVX2 Q8_0 path: maddubs needs an unsigned operand).

#if defined(FI_QUANT_WIDE)
// [a x 8, b x 8]
inline VF pair_scale(float a, float b) { return joinf(_mm256_set1_ps(a), _mm256_set1_ps(b)); }
#endif

template <int64_t QT>  // Q4_0 / Q4_1
struct Q4Block {
  static constexpr int kGroup = kChunk;
  static constexpr bool kHasZero = true, kSigned = false;
  using Blk = std::conditional_t<QT == kQ4_0, BlockQ4_0, BlockQ4_1>;
  struct Group {
    const Blk* b;
    bool has_second;  // the AVX-512 pair's second block exists (a row may hold an odd number)
  };
  static Group begin(const uint8_t* row, int64_t g, int64_t nb) {
    const Blk* b = reinterpret_cast<const Blk*>(row) + g * (kChunk / 32);
    return {b, kChunk == 64 && g * 2 + 1 < nb};
  }
  static float zero_of(const Blk& b) {
    if constexpr (QT == kQ4_0) {
      return -8.f * fp16(b.d);
    } else {
      return fp16(b.m);
    }
  }
  static void chunk(const Group& g, int, VI& u, VI&, VF& d, VF& z) {
#if defined(FI_QUANT_WIDE)
    // Low nibbles are a block's values 0..15, high nibbles 16..31: lay out [q0 lo, q0 hi, q1 lo, q1 hi].
    const __m128i q0 = load128(g.b[0].qs);
    const __m128i q1 = g.has_second ? load128(g.b[1].qs) : _mm_setzero_si128();
    const __m256i both = _mm256_set_m128i(q1, q0);
    const VI halves = join(both, _mm256_srli_epi16(both, 4));  // [q0, q1, q0 >> 4, q1 >> 4]
    u = band(_mm512_shuffle_i64x2(halves, halves, _MM_SHUFFLE(3, 1, 2, 0)), bytes(0x0F));
    const float d1 = g.has_second ? fp16(g.b[1].d) : 0.f, z1 = g.has_second ? zero_of(g.b[1]) : 0.f;
    d = pair_scale(fp16(g.b[0].d), d1);
    z = pair_scale(zero_of(g.b[0]), z1);
#else
    const __m128i raw = load128(g.b->qs);
    u = band(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), bytes(0x0F));
    d = fset1(fp16(g.b->d));
    z = fset1(zero_of(*g.b));
#endif
  }
};

// The fifth bits of a Q5 block's 32 values as bytes: 0x10 where bit j of qh is set, byte j for value j.
inline __m256i fifth_bits(const uint8_t* qh) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  // Byte j takes byte j / 8 of the bits (shuffle within each 128-bit lane of the broadcast), then its own bit.
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                                             _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                                                0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

template <int64_t QT>  // Q5_0 / Q5_1: Q4Block's nibbles, each with its fifth bit from qh
struct Q5Block {
  static constexpr int kGroup = kChunk;
  static constexpr bool kHasZero = true, kSigned = false;
  using Blk = std::conditional_t<QT == kQ5_0, BlockQ5_0, BlockQ5_1>;
  struct Group {
    const Blk* b;
    bool has_second;
  };
  static Group begin(const uint8_t* row, int64_t g, int64_t nb) {
    const Blk* b = reinterpret_cast<const Blk*>(row) + g * (kChunk / 32);
    return {b, kChunk == 64 && g * 2 + 1 < nb};
  }
  static float zero_of(const Blk& b) {
    if constexpr (QT == kQ5_0) {
      return -16.f * fp16(b.d);
    } else {
      return fp16(b.m);
    }
  }
  static void chunk(const Group& g, int, VI& u, VI&, VF& d, VF& z) {
#if defined(FI_QUANT_WIDE)
    const __m128i q0 = load128(g.b[0].qs);
    const __m128i q1 = g.has_second ? load128(g.b[1].qs) : _mm_setzero_si128();
    const __m256i both = _mm256_set_m128i(q1, q0);
    const VI halves = join(both, _mm256_srli_epi16(both, 4));  // [q0, q1, q0 >> 4, q1 >> 4]
    const VI nibbles = band(_mm512_shuffle_i64x2(halves, halves, _MM_SHUFFLE(3, 1, 2, 0)), bytes(0x0F));
    u = bor(nibbles, join(fifth_bits(g.b[0].qh), g.has_second ? fifth_bits(g.b[1].qh) : _mm256_setzero_si256()));
    const float d1 = g.has_second ? fp16(g.b[1].d) : 0.f, z1 = g.has_second ? zero_of(g.b[1]) : 0.f;
    d = pair_scale(fp16(g.b[0].d), d1);
    z = pair_scale(zero_of(g.b[0]), z1);
#else
    const __m128i raw = load128(g.b->qs);
    u = bor(band(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), bytes(0x0F)), fifth_bits(g.b->qh));
    d = fset1(fp16(g.b->d));
    z = fset1(zero_of(*g.b));
#endif
  }
};

struct Q8Block {
  static constexpr int kGroup = kChunk;
#if defined(FI_QUANT_WIDE)
  static constexpr bool kHasZero = true, kSigned = false;  // u = w + 128, z = -128 d
#else
  static constexpr bool kHasZero = false, kSigned = true;  // u = |w|, the sign moves onto x
#endif
  struct Group {
    const BlockQ8_0* b;
    bool has_second;
  };
  static Group begin(const uint8_t* row, int64_t g, int64_t nb) {
    return {reinterpret_cast<const BlockQ8_0*>(row) + g * (kChunk / 32), kChunk == 64 && g * 2 + 1 < nb};
  }
  static void chunk(const Group& g, int, VI& u, VI& s, VF& d, VF& z) {
#if defined(FI_QUANT_WIDE)
    const __m256i w1 = g.has_second ? load256(g.b[1].qs) : _mm256_setzero_si256();
    u = _mm512_xor_si512(join(load256(g.b[0].qs), w1), bytes(0x80));
    const float d0 = fp16(g.b[0].d), d1 = g.has_second ? fp16(g.b[1].d) : 0.f;
    d = pair_scale(d0, d1);
    z = pair_scale(-128.f * d0, -128.f * d1);
#else
    s = load256(g.b->qs);
    u = _mm256_abs_epi8(s);  // -128 becomes 0x80 = 128 unsigned, as wanted
    d = fset1(fp16(g.b->d));
    z = fzero();
#endif
  }
};

// The 8 six-bit scales and mins of a Q4_K / Q5_K super-block as floats (d * scale, -dmin * min), from the three
// 32-bit words of `scales` (k_scale_min in quant_formats.h, eight at once).
inline void k_scales(const BlockQ4_K& b, __m256& sc, __m256& mn) {
  uint32_t w[3];
  std::memcpy(w, b.scales, 12);
  const uint32_t sc_lo = w[0] & 0x3F3F3F3Fu, mn_lo = w[1] & 0x3F3F3F3Fu;
  const uint32_t sc_hi = (w[2] & 0x0F0F0F0Fu) | (((w[0] >> 6) & 0x03030303u) << 4);
  const uint32_t mn_hi = ((w[2] >> 4) & 0x0F0F0F0Fu) | (((w[1] >> 6) & 0x03030303u) << 4);
  const __m128i s8 = _mm_set_epi32(0, 0, static_cast<int>(sc_hi), static_cast<int>(sc_lo));
  const __m128i m8 = _mm_set_epi32(0, 0, static_cast<int>(mn_hi), static_cast<int>(mn_lo));
  sc = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(s8)), _mm256_set1_ps(fp16(b.d)));
  mn = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m8)), _mm256_set1_ps(-fp16(b.dmin)));
}

// Q4_K and Q5_K: sub-block j (32 values) is the low (j even) or high (j odd) nibbles of qs[32 (j / 2) ..];
// Q5_K's fifth bit of value l in sub-block j is bit j of qh[l].
template <bool kFive>
struct QK45 {
  static constexpr int kGroup = 256;
  static constexpr bool kHasZero = true, kSigned = false;
  struct Group {
    const uint8_t* qs;
    const uint8_t* qh;
    __m256 sc, mn;  // per sub-block
  };
  static Group begin(const uint8_t* row, int64_t g, int64_t) {
    Group out;
    if constexpr (kFive) {
      const auto* b = reinterpret_cast<const BlockQ5_K*>(row) + g;
      out.qs = b->qs;
      out.qh = b->qh;
    } else {
      out.qs = (reinterpret_cast<const BlockQ4_K*>(row) + g)->qs;
      out.qh = nullptr;
    }
    // Q5_K's header (d, dmin, scales) is laid out as Q4_K's.
    k_scales(*reinterpret_cast<const BlockQ4_K*>(row + g * (kFive ? sizeof(BlockQ5_K) : sizeof(BlockQ4_K))),
             out.sc, out.mn);
    return out;
  }
  static void chunk(const Group& g, int c, VI& u, VI&, VF& d, VF& z) {
#if defined(FI_QUANT_WIDE)
    // Chunk c: sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles) of qs[32c .. 32c + 32].
    const __m256i q = load256(g.qs + 32 * c);
    u = band(join(q, _mm256_srli_epi16(q, 4)), bytes(0x0F));
    if constexpr (kFive) {
      const __m256i h = _mm256_srli_epi16(load256(g.qh), 2 * c);
      const __m256i lo5 = _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(1)), 4);
      const __m256i hi5 = _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(2)), 3);
      u = bor(u, join(lo5, hi5));
    }
    const VI pick = _mm512_add_epi32(_mm512_set1_epi32(2 * c),
                                     _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
    d = _mm512_permutexvar_ps(pick, _mm512_castps256_ps512(g.sc));
    z = _mm512_permutexvar_ps(pick, _mm512_castps256_ps512(g.mn));
#else
    const __m256i q = load256(g.qs + 32 * (c / 2));
    u = band((c & 1) ? _mm256_srli_epi16(q, 4) : q, bytes(0x0F));
    if constexpr (kFive) {
      const __m256i h = _mm256_and_si256(_mm256_srli_epi16(load256(g.qh), c), _mm256_set1_epi8(1));
      u = bor(u, _mm256_slli_epi16(h, 4));
    }
    const __m256i pick = _mm256_set1_epi32(c);
    d = _mm256_permutevar8x32_ps(g.sc, pick);
    z = _mm256_permutevar8x32_ps(g.mn, pick);
#endif
  }
};

// Q6_K: value t*32 + l (t = 0..7, l < 32) of a half (128 values, h = t / 4, tt = t % 4) has its low 4 bits in
// ql[64h + 32 (tt & 1) + l] (low nibble for tt < 2, high for tt >= 2) and its top 2 bits at bit 2 tt of
// qh[32h + l]; value - 32 times d * scales[v / 16].
struct Q6K {
  static constexpr int kGroup = 256;
  static constexpr bool kHasZero = true, kSigned = false;
  struct Group {
    const BlockQ6_K* b;
#if defined(FI_QUANT_WIDE)
    __m512 sc;  // d * scales[0..15]
#else
    __m256 sc_lo, sc_hi;
#endif
  };
  static Group begin(const uint8_t* row, int64_t g, int64_t) {
    Group out;
    out.b = reinterpret_cast<const BlockQ6_K*>(row) + g;
    const __m128i s8 = load128(out.b->scales);
    const float d = fp16(out.b->d);
#if defined(FI_QUANT_WIDE)
    out.sc = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(s8)), _mm512_set1_ps(d));
#else
    out.sc_lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8)), _mm256_set1_ps(d));
    out.sc_hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s8, 8))), _mm256_set1_ps(d));
#endif
    return out;
  }
  static void chunk(const Group& g, int c, VI& u, VI&, VF& d, VF& z) {
#if defined(FI_QUANT_WIDE)
    // Chunk c: t = 2c, 2c + 1 (same half h = c / 2 and nibble, ql's two 32-byte runs).
    const int h = c / 2, tt = 2 * (c % 2);
    const VI l = iloadu(g.b->ql + 64 * h);
    const VI nib = band((c % 2) ? srl16(l, 4) : l, bytes(0x0F));
    const __m256i qh = load256(g.b->qh + 32 * h);
    const VI top = join(_mm256_srli_epi16(qh, 2 * tt), _mm256_srli_epi16(qh, 2 * tt + 2));
    u = bor(nib, sll16(band(top, bytes(0x03)), 4));
    const VI pick = _mm512_add_epi32(_mm512_set1_epi32(4 * c),
                                     _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    d = _mm512_permutexvar_ps(pick, g.sc);
#else
    const int h = c / 4, tt = c % 4;
    const __m256i l = load256(g.b->ql + 64 * h + 32 * (tt & 1));
    const __m256i nib = band(tt >= 2 ? _mm256_srli_epi16(l, 4) : l, bytes(0x0F));
    const __m256i top = band(_mm256_srli_epi16(load256(g.b->qh + 32 * h), 2 * tt), bytes(0x03));
    u = bor(nib, _mm256_slli_epi16(top, 4));
    const int s = 2 * (c % 4);  // scales 2c, 2c + 1 of the half's eight
    const __m256i pick = _mm256_setr_epi32(s, s, s, s, s + 1, s + 1, s + 1, s + 1);
    d = _mm256_permutevar8x32_ps(c < 4 ? g.sc_lo : g.sc_hi, pick);
#endif
    z = fmul(d, fset1(-32.f));
  }
};

// ---- the GEMV ---------------------------------------------------------------------------------------------
// NR weight rows at a time against M activation rows: NR * M independent accumulators hide the FMA latency and
// each activation chunk is loaded once per NR rows. out[m * N + n] = sum_k x[m, k] * w[n, k].
template <class F, int M, int NR>
inline void gemv_rows(const QuantizedActivations& a, const uint8_t* w, int64_t row_bytes, int64_t nb,
                      int64_t n, float* out, int64_t N) {
  constexpr int kChunks = F::kGroup / kChunk;
  const int64_t groups = F::kGroup == 256 ? nb : (nb * 32 + F::kGroup - 1) / F::kGroup;
  const int64_t group_bytes = row_bytes / groups;
  VF acc[NR][M];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = fzero();
  for (int64_t g = 0; g < groups; ++g) {
    typename F::Group grp[NR];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* row = w + (n + r) * row_bytes;
      _mm_prefetch(reinterpret_cast<const char*>(row + g * group_bytes + 512), _MM_HINT_T0);
      grp[r] = F::begin(row, g, nb);
    }
    for (int c = 0; c < kChunks; ++c) {
      const int64_t k0 = g * F::kGroup + c * kChunk;
      for (int r = 0; r < NR; ++r) {
        VI u, s;
        VF d, z;
        F::chunk(grp[r], c, u, s, d, z);
        for (int m = 0; m < M; ++m) {
          VI xv = iloadu(a.q + m * a.Kp + k0);
          if constexpr (F::kSigned) xv = apply_sign(xv, s);
          const VF dxs = fmul(d, floadu(a.scale + m * (a.Kp / 4) + k0 / 4));
          acc[r][m] = fmadd(cvt(dot_u8s8(u, xv)), dxs, acc[r][m]);
          if constexpr (F::kHasZero) acc[r][m] = fmadd(z, floadu(a.zsum + m * (a.Kp / 4) + k0 / 4), acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) out[m * N + n + r] = hsum(acc[r][m]);
}

template <class F, int M>
void gemv_m(const QuantizedActivations& a, const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t n0,
            int64_t n1, float* out, int64_t N) {
  constexpr int NR = M == 1 ? 4 : M == 2 ? 4 : M <= 4 ? 2 : 1;  // NR * M <= 8 accumulators
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) gemv_rows<F, M, NR>(a, w, row_bytes, nb, n, out, N);
  for (; n < n1; ++n) gemv_rows<F, M, 1>(a, w, row_bytes, nb, n, out, N);
}

template <class F>
void gemv_format(const QuantizedActivations& a, int64_t M, const uint8_t* w, int64_t row_bytes, int64_t nb,
                 int64_t n0, int64_t n1, float* out, int64_t N) {
  switch (M) {
    case 1: return gemv_m<F, 1>(a, w, row_bytes, nb, n0, n1, out, N);
    case 2: return gemv_m<F, 2>(a, w, row_bytes, nb, n0, n1, out, N);
    case 3: return gemv_m<F, 3>(a, w, row_bytes, nb, n0, n1, out, N);
    case 4: return gemv_m<F, 4>(a, w, row_bytes, nb, n0, n1, out, N);
    case 5: return gemv_m<F, 5>(a, w, row_bytes, nb, n0, n1, out, N);
    case 6: return gemv_m<F, 6>(a, w, row_bytes, nb, n0, n1, out, N);
    case 7: return gemv_m<F, 7>(a, w, row_bytes, nb, n0, n1, out, N);
    default: return gemv_m<F, 8>(a, w, row_bytes, nb, n0, n1, out, N);
  }
}

// M <= 8 activation rows (quantize_activations) against rows [n0, n1) of w ([N, row_bytes], nb blocks a row).
void gemv_rows_q8(int64_t qtype, const int8_t* xq, const float* xscale, const float* xzsum, int64_t Kp, int64_t M,
                  const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t n0, int64_t n1, float* out, int64_t N) {
  const QuantizedActivations a{xq, xscale, xzsum, Kp};
  switch (qtype) {
    case kQ4_0: return gemv_format<Q4Block<kQ4_0>>(a, M, w, row_bytes, nb, n0, n1, out, N);
    case kQ4_1: return gemv_format<Q4Block<kQ4_1>>(a, M, w, row_bytes, nb, n0, n1, out, N);
    case kQ5_0: return gemv_format<Q5Block<kQ5_0>>(a, M, w, row_bytes, nb, n0, n1, out, N);
    case kQ5_1: return gemv_format<Q5Block<kQ5_1>>(a, M, w, row_bytes, nb, n0, n1, out, N);
    case kQ8_0: return gemv_format<Q8Block>(a, M, w, row_bytes, nb, n0, n1, out, N);
    case kQ4_K: return gemv_format<QK45<false>>(a, M, w, row_bytes, nb, n0, n1, out, N);
    case kQ5_K: return gemv_format<QK45<true>>(a, M, w, row_bytes, nb, n0, n1, out, N);
    default: return gemv_format<Q6K>(a, M, w, row_bytes, nb, n0, n1, out, N);
  }
}

// ---- slab dequantization (the M > 8 path) -----------------------------------------------------------------
// One decoded chunk -> kChunk floats: weight = u * d + z with d, z per 4-value lane.
template <bool kSigned>
inline void store_chunk(VI u, VI s, VF d, VF z, float* dst) {
#if defined(FI_QUANT_WIDE)
  alignas(64) uint8_t raw[64];
  _mm512_store_si512(raw, kSigned ? s : u);
  for (int g = 0; g < 4; ++g) {  // 16 values: lanes 4g .. 4g + 3
    const __m128i b = _mm_load_si128(reinterpret_cast<const __m128i*>(raw + 16 * g));
    const __m512i v = kSigned ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
    const VI pick = _mm512_add_epi32(_mm512_set1_epi32(4 * g),
                                     _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    fstoreu(dst + 16 * g, fmadd(cvt(v), _mm512_permutexvar_ps(pick, d), _mm512_permutexvar_ps(pick, z)));
  }
#else
  alignas(32) uint8_t raw[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(raw), kSigned ? s : u);
  for (int g = 0; g < 4; ++g) {  // 8 values: lanes 2g, 2g + 1
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(raw + 8 * g));
    const __m256i v = kSigned ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
    const __m256i pick = _mm256_setr_epi32(2 * g, 2 * g, 2 * g, 2 * g, 2 * g + 1, 2 * g + 1, 2 * g + 1, 2 * g + 1);
    fstoreu(dst + 8 * g, fmadd(cvt(v), _mm256_permutevar8x32_ps(d, pick), _mm256_permutevar8x32_ps(z, pick)));
  }
#endif
}

// Rows [r0, r1) of w -> rows of nb * block_elems values at dst (row stride `width`), f32 or bf16 (uint16 bits).
template <class F, class Out>
void dequantize_rows_format(const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t r0, int64_t r1, Out* dst,
                            int64_t width) {
  constexpr int kChunks = F::kGroup / kChunk;
  constexpr int kLanes = sizeof(VF) / sizeof(float);
  const int64_t values = nb * (F::kGroup == 256 ? 256 : 32);
  const int64_t groups = (values + F::kGroup - 1) / F::kGroup;
  alignas(64) float spill[kChunk];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    Out* out = dst + (r - r0) * width;
    for (int64_t g = 0; g < groups; ++g) {
      const typename F::Group grp = F::begin(row, g, nb);
      for (int c = 0; c < kChunks; ++c) {
        VI u = VI(), s = VI();
        VF d, z;
        F::chunk(grp, c, u, s, d, z);
        const int64_t k0 = g * F::kGroup + c * kChunk;
        const bool whole = k0 + kChunk <= values;  // else an AVX-512 pair whose second block is past the row's end
        if constexpr (std::is_same_v<Out, float>) {
          store_chunk<F::kSigned>(u, s, d, z, whole ? out + k0 : spill);
          if (!whole) std::copy_n(spill, values - k0, out + k0);
        } else {
          store_chunk<F::kSigned>(u, s, d, z, spill);
          alignas(64) uint16_t narrow[kChunk];
          for (int i = 0; i < kChunk; i += kLanes) fstoreu_bf16((whole ? out + k0 : narrow) + i, floadu(spill + i));
          if (!whole) std::copy_n(narrow, values - k0, out + k0);
        }
      }
    }
  }
}

template <class Out>
void dequantize_rows_to(int64_t qtype, const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t r0, int64_t r1,
                        Out* dst, int64_t width) {
  switch (qtype) {
    case kQ4_0: return dequantize_rows_format<Q4Block<kQ4_0>>(w, row_bytes, nb, r0, r1, dst, width);
    case kQ4_1: return dequantize_rows_format<Q4Block<kQ4_1>>(w, row_bytes, nb, r0, r1, dst, width);
    case kQ5_0: return dequantize_rows_format<Q5Block<kQ5_0>>(w, row_bytes, nb, r0, r1, dst, width);
    case kQ5_1: return dequantize_rows_format<Q5Block<kQ5_1>>(w, row_bytes, nb, r0, r1, dst, width);
    case kQ8_0: return dequantize_rows_format<Q8Block>(w, row_bytes, nb, r0, r1, dst, width);
    case kQ4_K: return dequantize_rows_format<QK45<false>>(w, row_bytes, nb, r0, r1, dst, width);
    case kQ5_K: return dequantize_rows_format<QK45<true>>(w, row_bytes, nb, r0, r1, dst, width);
    default: return dequantize_rows_format<Q6K>(w, row_bytes, nb, r0, r1, dst, width);
  }
}

// Rows [r0, r1) of w -> f32 rows of nb * block_elems values at dst (row stride `width`).
void dequantize_rows(int64_t qtype, const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t r0, int64_t r1,
                     float* dst, int64_t width) {
  dequantize_rows_to(qtype, w, row_bytes, nb, r0, r1, dst, width);
}

// The same into bf16 bit patterns (the bf16 slab GEMM's operand, written once instead of f32 then converted).
void dequantize_rows_bf16(int64_t qtype, const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t r0, int64_t r1,
                          uint16_t* dst, int64_t width) {
  dequantize_rows_to(qtype, w, row_bytes, nb, r0, r1, dst, width);
}

}  // namespace fast_inference::cpu::FI_QUANT_ISA
