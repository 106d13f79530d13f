// The decode GEMV (M <= 8 activation rows) over interleaved tiles of every format (quant_formats.h) for one ISA.
// Included by quant_gemv_avx2.cpp and quant_gemv_avx512.cpp after quant_gemv_kernel.h (its vector helpers).
//
// Why a layout of its own: with plain rows a GEMV decodes one row at a time and must broadcast each block's
// scale across the lanes of its values, then sum lanes horizontally; a tile holds 16 rows x 1 block with the 16
// rows' scales side by side and each 4-byte word of the 16 rows in one 64-byte line. So one integer dot product
// (AVX-512 VNNI dpbusd on 16 rows, or AVX2 maddubs on 8) takes a word of every row against 4 broadcast
// activation bytes, the block's 16 integer sums land one per lane, the scales are a single fp16 load, and the
// results are 16 consecutive outputs: ~1/6 of the plain kernel's instructions per weight byte, so the loop is
// bound by the memory stream, not by decoding.
//
// A "unit" is the rows one float vector holds: 16 (AVX-512) or 8 (AVX2, half a tile). Units are independent.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quant_formats.h"

namespace fast_inference::cpu::FI_QUANT_ISA {

using namespace fast_inference::quant;

#if defined(FI_QUANT_WIDE)
constexpr int64_t kUnitRows = 16;
#else
constexpr int64_t kUnitRows = 8;
#endif
constexpr int64_t kUnitsPerTile = kTileRows / kUnitRows;

// Activations quantized per 32-value block (the weights' block size): q [M, nb * 32] int8 (zero-padded past K),
// d [M, nb] the block's scale (amax / 127), s [M, nb] = d * (sum of the block's q), h [M, nb] = d * (sum of the
// block's first 16 q): Q6_K's scales cover 16 values.
struct BlockActivations {
  const int8_t* q;
  const float* d;
  const float* s;
  const float* h;
  int64_t nb;
};

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> 8 f32 (exact: bf16 is the top half of an f32)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p)), 16));
}

// x: [M, K] f32 or bf16 (uint16 bit patterns), row stride x_stride -> BlockActivations' q, d, s for nb blocks.
template <class T>
void quantize_activation_blocks(const T* x, int64_t x_stride, int64_t M, int64_t K, int64_t nb, int8_t* q,
                                float* d, float* s, float* h) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * 32;
      __m256 v[4];
      if (k0 + 32 <= K) {
        for (int i = 0; i < 4; ++i) v[i] = load8(x + m * x_stride + k0 + 8 * i);
      } else {  // the last, partial block: zeros past K
        alignas(32) float tail[32];
        for (int i = 0; i < 32; ++i) {
          if (k0 + i >= K) {
            tail[i] = 0.f;
          } else if constexpr (std::is_same_v<T, float>) {
            tail[i] = x[m * x_stride + k0 + i];
          } else {
            const uint32_t bits = static_cast<uint32_t>(x[m * x_stride + k0 + i]) << 16;
            std::memcpy(&tail[i], &bits, 4);
          }
        }
        for (int i = 0; i < 4; ++i) v[i] = _mm256_load_ps(tail + 8 * i);
      }
      int32_t sum_lo, sum_hi;
      const float scale = quantize_block32(v, q + m * nb * 32 + k0, sum_lo, sum_hi);
      d[m * nb + b] = scale;
      s[m * nb + b] = scale * static_cast<float>(sum_lo + sum_hi);
      h[m * nb + b] = scale * static_cast<float>(sum_lo);
    }
  }
}

inline VI bcast4(const int8_t* p) {  // 4 activation bytes in every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
#if defined(FI_QUANT_WIDE)
  return _mm512_set1_epi32(v);
#else
  return _mm256_set1_epi32(v);
#endif
}

inline VF load_scales(const uint8_t* p) {  // kUnitRows fp16 -> f32
#if defined(FI_QUANT_WIDE)
  return _mm512_cvtph_ps(load256(p));
#else
  return _mm256_cvtph_ps(load128(p));
#endif
}

#if defined(FI_QUANT_WIDE)
inline VI srl32(VI v, int n) { return _mm512_srli_epi32(v, n); }
inline VI sll32(VI v, int n) { return _mm512_slli_epi32(v, n); }
inline VI srai32(VI v, int n) { return _mm512_srai_epi32(v, n); }
inline VI sub32(VI a, VI b) { return _mm512_sub_epi32(a, b); }
inline VI set1_32(int v) { return _mm512_set1_epi32(v); }
#else
inline VI srl32(VI v, int n) { return _mm256_srli_epi32(v, n); }
inline VI sll32(VI v, int n) { return _mm256_slli_epi32(v, n); }
inline VI srai32(VI v, int n) { return _mm256_srai_epi32(v, n); }
inline VI sub32(VI a, VI b) { return _mm256_sub_epi32(a, b); }
inline VI set1_32(int v) { return _mm256_set1_epi32(v); }
#endif

// Tile geometry per format: bytes of a 16-row tile, its header (16 fp16 d, then 16 fp16 m for Q4_1 / Q5_1), and
// where the quant words start: Q5's first word line is the 16 rows' qh (fifth bits), its 4 qs words follow.
template <int64_t QT>
struct TileFormat {
  static constexpr bool kQ5 = QT == kQ5_0 || QT == kQ5_1;
  static constexpr bool kHasMin = QT == kQ4_1 || QT == kQ5_1;
  static constexpr int64_t kBlockBytes = QT == kQ4_0 ? 18 : QT == kQ4_1 ? 20 : QT == kQ5_0 ? 22 : QT == kQ5_1 ? 24 : 34;
  static constexpr int64_t kTileBytes = kTileRows * kBlockBytes;
  static constexpr int64_t kHeaderBytes = kHasMin ? 64 : 32;
  static constexpr int64_t kQsOffset = kHeaderBytes + (kQ5 ? 64 : 0);
  static constexpr int kWords = QT == kQ8_0 ? 8 : 4;
  static constexpr float kOffset = QT == kQ4_0 ? -8.f : QT == kQ5_0 ? -16.f : 0.f;  // w = u + offset (then * d)
};

// Bits 0..3 of each 32-bit lane -> its 4 bytes as 0x10 or 0 (the fifth bits of 4 Q5 values, one per byte):
// t * 0x00204081 puts bit k at bit 8k (the shifted copies do not overlap, so nothing carries).
inline VI spread_fifth_bits(VI t) {
#if defined(FI_QUANT_WIDE)
  const VI spread = _mm512_mullo_epi32(band(t, set1_32(0xF)), set1_32(0x00204081));
#else
  const VI spread = _mm256_mullo_epi32(band(t, set1_32(0xF)), set1_32(0x00204081));
#endif
  return sll32(band(spread, set1_32(0x01010101)), 4);
}

inline void store_unit(float* dst, VF v) { fstoreu(dst, v); }
inline void store_unit(uint16_t* dst, VF v) { fstoreu_bf16(dst, v); }

// Units [u, u + NU) of a weight of nb tiles per row group, kTileBytes each: where unit i's tile of block b is,
// and the prefetch of the next group of units while this one computes.
template <int NU, int64_t kTileBytes>
struct UnitGroup {
  const uint8_t* first[NU];  // unit i's first tile
  int64_t half[NU];          // which kUnitRows rows of its tiles unit i is
  const char* next;          // the next group's first tile
  // The next group's tiles are contiguous, right after this group's: one step's share of them is prefetched
  // per block, in address order, so the prefetches trickle out evenly and run a whole group ahead.
  // (Prefetching a fixed distance along each unit's own tiles overshoots into the units being read right now
  // when a row has few blocks: K = 576 is 18 blocks.) Into L2 (T1): the group is read a few microseconds
  // later; A/B on the SmolLM2 GGUFs, T1 beat T0 by 5-15% per token and NTA lost 2.7x.
  static constexpr int64_t kGroupTiles = NU >= kUnitsPerTile ? NU / kUnitsPerTile : 1;

  UnitGroup(const uint8_t* w, int64_t u, int64_t nb) {
    for (int i = 0; i < NU; ++i) {
      first[i] = w + (u + i) / kUnitsPerTile * nb * kTileBytes;
      half[i] = (u + i) % kUnitsPerTile;
    }
    next = reinterpret_cast<const char*>(w + (u + NU) / kUnitsPerTile * nb * kTileBytes);
  }
  const uint8_t* tile(int i, int64_t b) const { return first[i] + b * kTileBytes; }
  void prefetch(int64_t b) const { prefetch_part(b, 0, 1); }
  // Part `part` of `parts` of block b's share: a K-quant step covers NU tiles of 2-3 KiB, and its share issued
  // in one burst (144-210 lines) overflows the outstanding-miss queues, so those kernels spread it out.
  void prefetch_part(int64_t b, int64_t part, int64_t parts) const {
    constexpr int64_t kLines = kGroupTiles * kTileBytes / 64;
    const char* at = next + b * kGroupTiles * kTileBytes;
    for (int64_t line = part * kLines / parts; line < (part + 1) * kLines / parts; ++line)
      _mm_prefetch(at + 64 * line, _MM_HINT_T1);
  }
};

// Units [u, u + NU) against M activation rows: out[m * N + u * kUnitRows + r] for the NU * kUnitRows rows.
template <int64_t QT, int M, int NU, class Out>
inline void tile_units(const BlockActivations& a, const uint8_t* w, int64_t u, Out* out, int64_t N) {
  using TF = TileFormat<QT>;
  constexpr int64_t kTileBytes = TF::kTileBytes;
  constexpr int kWords = TF::kWords;
  const int64_t nb = a.nb;
  const UnitGroup<NU, kTileBytes> units(w, u, nb);
  const int64_t* half = units.half;
  VF acc[NU][M];
  for (int i = 0; i < NU; ++i)
    for (int m = 0; m < M; ++m) acc[i][m] = fzero();
  for (int64_t b = 0; b < nb; ++b) {
    units.prefetch(b);
    for (int i = 0; i < NU; ++i) {
      const uint8_t* tile = units.tile(i, b);
      const uint8_t* words = tile + TF::kQsOffset + 32 * half[i];
      VI high = VI();  // Q5: lane r holds row r's 32 fifth bits
      if constexpr (TF::kQ5) high = iloadu(tile + TF::kHeaderBytes + 32 * half[i]);
      VI isum[M];
#if defined(FI_QUANT_WIDE)
      for (int m = 0; m < M; ++m) isum[m] = _mm512_setzero_si512();
      for (int j = 0; j < kWords; ++j) {
        const VI v = iloadu(words + 64 * j);
        if constexpr (TF::kQ5) {
          const VI lo = bor(band(v, bytes(0x0F)), spread_fifth_bits(srl32(high, 4 * j)));
          const VI hi = bor(band(srl16(v, 4), bytes(0x0F)), spread_fifth_bits(srl32(high, 16 + 4 * j)));
          for (int m = 0; m < M; ++m) {
            const int8_t* xq = a.q + (m * nb + b) * 32 + 4 * j;
            isum[m] = _mm512_dpbusd_epi32(isum[m], lo, bcast4(xq));
            isum[m] = _mm512_dpbusd_epi32(isum[m], hi, bcast4(xq + 16));
          }
        } else if constexpr (QT == kQ8_0) {
          const VI uw = _mm512_xor_si512(v, bytes(0x80));  // w + 128: dpbusd's unsigned operand
          for (int m = 0; m < M; ++m)
            isum[m] = _mm512_dpbusd_epi32(isum[m], uw, bcast4(a.q + (m * nb + b) * 32 + 4 * j));
        } else {
          const VI lo = band(v, bytes(0x0F)), hi = band(srl16(v, 4), bytes(0x0F));
          for (int m = 0; m < M; ++m) {
            const int8_t* xq = a.q + (m * nb + b) * 32 + 4 * j;
            isum[m] = _mm512_dpbusd_epi32(isum[m], lo, bcast4(xq));
            isum[m] = _mm512_dpbusd_epi32(isum[m], hi, bcast4(xq + 16));
          }
        }
      }
#else
      for (int m = 0; m < M; ++m) isum[m] = _mm256_setzero_si256();
      const __m256i ones = _mm256_set1_epi16(1);
      if constexpr (QT == kQ8_0) {
        // |w| <= 128 times x with w's sign: each maddubs pair <= 2 * 128 * 127, widened to int32 at once.
        for (int j = 0; j < kWords; ++j) {
          const VI v = iloadu(words + 64 * j), mag = _mm256_abs_epi8(v);
          for (int m = 0; m < M; ++m) {
            const VI xs = _mm256_sign_epi8(bcast4(a.q + (m * nb + b) * 32 + 4 * j), v);
            isum[m] = _mm256_add_epi32(isum[m], _mm256_madd_epi16(_mm256_maddubs_epi16(mag, xs), ones));
          }
        }
      } else if constexpr (TF::kQ5) {
        // 5-bit: a word's two maddubs sum to <= 4 * 31 * 127 < 2^15; widened to int32 per word.
        for (int j = 0; j < kWords; ++j) {
          const VI v = iloadu(words + 64 * j);
          const VI lo = bor(band(v, bytes(0x0F)), spread_fifth_bits(srl32(high, 4 * j)));
          const VI hi = bor(band(srl16(v, 4), bytes(0x0F)), spread_fifth_bits(srl32(high, 16 + 4 * j)));
          for (int m = 0; m < M; ++m) {
            const int8_t* xq = a.q + (m * nb + b) * 32 + 4 * j;
            const VI pair = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xq)), _mm256_maddubs_epi16(hi, bcast4(xq + 16)));
            isum[m] = _mm256_add_epi32(isum[m], _mm256_madd_epi16(pair, ones));
          }
        }
      } else {
        // 4-bit: a lane's 8 maddubs pairs sum to <= 16 * 15 * 127 < 2^15, so they add in int16, widened once.
        for (int j = 0; j < kWords; ++j) {
          const VI v = iloadu(words + 64 * j);
          const VI lo = band(v, bytes(0x0F)), hi = band(srl16(v, 4), bytes(0x0F));
          for (int m = 0; m < M; ++m) {
            const int8_t* xq = a.q + (m * nb + b) * 32 + 4 * j;
            isum[m] = _mm256_add_epi16(isum[m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xq)),
                                                                 _mm256_maddubs_epi16(hi, bcast4(xq + 16))));
          }
        }
        for (int m = 0; m < M; ++m) isum[m] = _mm256_madd_epi16(isum[m], ones);
      }
#endif
      const VF dw = load_scales(tile + 16 * half[i]);
      for (int m = 0; m < M; ++m) {
        const float dx = a.d[m * nb + b], sx = a.s[m * nb + b];
        VF f = fmul(cvt(isum[m]), fset1(dx));  // dx * dot(u, xq)
        if constexpr (TF::kOffset != 0.f) f = fmadd(fset1(sx), fset1(TF::kOffset), f);  // w = u - 8 (Q4_0), - 16 (Q5_0)
#if defined(FI_QUANT_WIDE)
        if constexpr (QT == kQ8_0) f = fmadd(fset1(sx), fset1(-128.f), f);  // u = w + 128
#endif
        acc[i][m] = fmadd(f, dw, acc[i][m]);
        if constexpr (TF::kHasMin) acc[i][m] = fmadd(load_scales(tile + 32 + 16 * half[i]), fset1(sx), acc[i][m]);
      }
    }
  }
  for (int i = 0; i < NU; ++i)
    for (int m = 0; m < M; ++m) store_unit(out + m * N + (u + i) * kUnitRows, acc[i][m]);
}

// ---- K-quant tiles: 16 rows x 1 super-block of 256 values ---------------------------------------------------

// A unit's integer dot products against one activation row: lanes (rows) += sum over 4 bytes of u * xq, xq
// broadcast. AVX-512 VNNI: dpbusd into int32. AVX2: maddubs pairs summed in int16, which the caller folds into
// int32 (fold()) often enough that they cannot overflow: each word adds at most 2 * umax * 127 to an int16 lane
// (u <= 15: 8 words; u <= 31: 4; u <= 63: 2).
struct DotAcc {
  VI i32;
#if defined(FI_QUANT_WIDE)
  DotAcc() : i32(_mm512_setzero_si512()) {}
  void add(VI u, VI x) { i32 = _mm512_dpbusd_epi32(i32, u, x); }
  void fold() {}
#else
  VI i16;
  DotAcc() : i32(_mm256_setzero_si256()), i16(_mm256_setzero_si256()) {}
  void add(VI u, VI x) { i16 = _mm256_add_epi16(i16, _mm256_maddubs_epi16(u, x)); }
  void fold() {
    i32 = _mm256_add_epi32(i32, _mm256_madd_epi16(i16, _mm256_set1_epi16(1)));
    i16 = _mm256_setzero_si256();
  }
#endif
};

// Sub-block j's (0..7) 6-bit scale and min of a Q4_K / Q5_K unit, one row per lane, from the three word lines
// of the rows' 12 scale bytes (quant_formats.h k_scale_min, on 32-bit lanes).
inline void k_scale_min_lanes(VI w0, VI w1, VI w2, int j, VI& scale, VI& min) {
  if (j < 4) {
    scale = band(srl32(w0, 8 * j), set1_32(63));
    min = band(srl32(w1, 8 * j), set1_32(63));
  } else {
    const int at = 8 * (j - 4);
    scale = bor(band(srl32(w2, at), set1_32(15)), sll32(band(srl32(w0, at + 6), set1_32(3)), 4));
    min = bor(band(srl32(w2, at + 4), set1_32(15)), sll32(band(srl32(w1, at + 6), set1_32(3)), 4));
  }
}

// Q4_K / Q5_K units. Tile: d, dmin (16 fp16 each), then word lines: scales (3), Q5_K's qh (8), qs (32).
// Sub-block j (32 values) of a row is u * (d * scale_j) - dmin * min_j; its u are the low (j even) or high
// (j odd) nibbles of qs lines 8 (j / 2) .. + 7, word t holding values 4t .. 4t + 3, and Q5_K's fifth bits are
// bit j of the bytes of qh line t. Per activation block (= sub-block) a row adds
// (d scale_j) * dx * dot(u, xq) - (dmin min_j) * s.
template <int64_t QT, int M, int NU, class Out>
inline void tile_units_k45(const BlockActivations& a, const uint8_t* w, int64_t u, Out* out, int64_t N) {
  constexpr bool kQ5 = QT == kQ5_K;
  constexpr int64_t kTileBytes = kTileRows * (kQ5 ? 176 : 144);
  constexpr int64_t kScales = 64, kQh = kScales + 3 * 64, kQs = kQh + (kQ5 ? 8 * 64 : 0);
  constexpr int kFoldWords = kQ5 ? 4 : 8;
  const int64_t nsb = a.nb / 8;
  const UnitGroup<NU, kTileBytes> units(w, u, nsb);
  VF acc[NU][M];
  for (int i = 0; i < NU; ++i)
    for (int m = 0; m < M; ++m) acc[i][m] = fzero();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    for (int i = 0; i < NU; ++i) {
      const uint8_t* tile = units.tile(i, sb);
      const int64_t at = 32 * units.half[i];  // this unit's bytes in each word line
      const VF d = load_scales(tile + 16 * units.half[i]), dmin = load_scales(tile + 32 + 16 * units.half[i]);
      const VI w0 = iloadu(tile + kScales + at), w1 = iloadu(tile + kScales + 64 + at);
      const VI w2 = iloadu(tile + kScales + 128 + at);
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {  // sub-blocks 2p (low nibbles) and 2p + 1 (high nibbles)
        units.prefetch_part(sb, 4 * i + p, 4 * NU);
        DotAcc lo_dot[M], hi_dot[M];
#pragma GCC unroll 8
        for (int t = 0; t < 8; ++t) {
          const VI v = iloadu(tile + kQs + 64 * (8 * p + t) + at);
          VI lo = band(v, bytes(0x0F)), hi = band(srl16(v, 4), bytes(0x0F));
          if constexpr (kQ5) {
            const VI qh = iloadu(tile + kQh + 64 * t + at);
            lo = bor(lo, sll16(band(srl16(qh, 2 * p), bytes(1)), 4));
            hi = bor(hi, sll16(band(srl16(qh, 2 * p + 1), bytes(1)), 4));
          }
          for (int m = 0; m < M; ++m) {
            const int8_t* xq = a.q + (m * a.nb + sb * 8 + 2 * p) * 32 + 4 * t;
            lo_dot[m].add(lo, bcast4(xq));
            hi_dot[m].add(hi, bcast4(xq + 32));
          }
          if ((t + 1) % kFoldWords == 0)
            for (int m = 0; m < M; ++m) lo_dot[m].fold(), hi_dot[m].fold();
        }
#pragma GCC unroll 2
        for (int half = 0; half < 2; ++half) {
          VI scale, min;
          k_scale_min_lanes(w0, w1, w2, 2 * p + half, scale, min);
          const VF dscale = fmul(d, cvt(scale)), dmin_min = fmul(dmin, cvt(min));
          for (int m = 0; m < M; ++m) {
            const int64_t blk = m * a.nb + sb * 8 + 2 * p + half;
            const VI isum = half ? hi_dot[m].i32 : lo_dot[m].i32;
            acc[i][m] = fmadd(fmul(cvt(isum), fset1(a.d[blk])), dscale, acc[i][m]);
            acc[i][m] = fmadd(dmin_min, fset1(-a.s[blk]), acc[i][m]);
          }
        }
      }
    }
  }
  for (int i = 0; i < NU; ++i)
    for (int m = 0; m < M; ++m) store_unit(out + m * N + (u + i) * kUnitRows, acc[i][m]);
}

// Q6_K units. Tile: d (16 fp16), then word lines ql (32), qh (16), scales (4). Value 128 n + 32 k + l of a row
// (half n, quarter k, l < 32) is (u - 32) * d * scale[8 n + 2 k + l / 16], u = 4 bits of ql line
// 16 n + 8 (k % 2) + l / 4 (low nibbles for k < 2, high for k >= 2) | bits 2k, 2k + 1 of qh line 8 n + l / 4
// as bits 4, 5: three word lines give the u of four quarters at once. Per 16 values (4 words) a row adds
// (d scale) * dx * (dot(u, xq) - 32 * sum of xq), the activation sum in float: 32 * (h or s - h).
template <int M, int NU, class Out>
inline void tile_units_q6k(const BlockActivations& a, const uint8_t* w, int64_t u, Out* out, int64_t N) {
  constexpr int64_t kTileBytes = kTileRows * 210, kQl = 32, kQh = kQl + 32 * 64, kScales = kQh + 16 * 64;
  const int64_t nsb = a.nb / 8;
  const UnitGroup<NU, kTileBytes> units(w, u, nsb);
  VF acc[NU][M];
  for (int i = 0; i < NU; ++i)
    for (int m = 0; m < M; ++m) acc[i][m] = fzero();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    for (int i = 0; i < NU; ++i) {
      const uint8_t* tile = units.tile(i, sb);
      const int64_t at = 32 * units.half[i];
      const VF d = load_scales(tile + 16 * units.half[i]);
#pragma GCC unroll 2
      for (int n = 0; n < 2; ++n) {
        // Scales 8n .. 8n + 7: line 2n holds quarters 0, 1 (bytes 2k, 2k + 1), line 2n + 1 quarters 2, 3.
        const VI scale_lines[2] = {iloadu(tile + kScales + 64 * (2 * n) + at),
                                   iloadu(tile + kScales + 64 * (2 * n + 1) + at)};
#pragma GCC unroll 2
        for (int sixteen = 0; sixteen < 2; ++sixteen) {
          units.prefetch_part(sb, 4 * i + 2 * n + sixteen, 4 * NU);
          DotAcc dot[4][M];  // per quarter k
#pragma GCC unroll 4
          for (int t = 4 * sixteen; t < 4 * sixteen + 4; ++t) {
            const VI lo_k = iloadu(tile + kQl + 64 * (16 * n + t) + at);      // quarters 0 (low), 2 (high)
            const VI hi_k = iloadu(tile + kQl + 64 * (16 * n + 8 + t) + at);  // quarters 1 (low), 3 (high)
            const VI qh = iloadu(tile + kQh + 64 * (8 * n + t) + at);
            const VI q[4] = {bor(band(lo_k, bytes(0x0F)), band(sll16(qh, 4), bytes(0x30))),
                             bor(band(hi_k, bytes(0x0F)), band(sll16(qh, 2), bytes(0x30))),
                             bor(band(srl16(lo_k, 4), bytes(0x0F)), band(qh, bytes(0x30))),
                             bor(band(srl16(hi_k, 4), bytes(0x0F)), band(srl16(qh, 2), bytes(0x30)))};
            for (int k = 0; k < 4; ++k)
              for (int m = 0; m < M; ++m) dot[k][m].add(q[k], bcast4(a.q + (m * a.nb + sb * 8 + 4 * n + k) * 32 + 4 * t));
            if (t % 2 == 1)
              for (int k = 0; k < 4; ++k)
                for (int m = 0; m < M; ++m) dot[k][m].fold();
          }
#pragma GCC unroll 4
          for (int k = 0; k < 4; ++k) {
            const int byte = 2 * (k % 2) + sixteen;  // int8 scale 8n + 2k + sixteen, sign-extended
            const VF dscale = fmul(d, cvt(srai32(sll32(scale_lines[k / 2], 24 - 8 * byte), 24)));
            for (int m = 0; m < M; ++m) {
              const int64_t blk = m * a.nb + sb * 8 + 4 * n + k;
              const float xsum = sixteen ? a.s[blk] - a.h[blk] : a.h[blk];  // dx * sum of these 16 xq
              const VF f = fmadd(fset1(xsum), fset1(-32.f), fmul(cvt(dot[k][m].i32), fset1(a.d[blk])));
              acc[i][m] = fmadd(f, dscale, acc[i][m]);
            }
          }
        }
      }
    }
  }
  for (int i = 0; i < NU; ++i)
    for (int m = 0; m < M; ++m) store_unit(out + m * N + (u + i) * kUnitRows, acc[i][m]);
}

template <int64_t QT, int M, int NU, class Out>
inline void format_units(const BlockActivations& a, const uint8_t* w, int64_t u, Out* out, int64_t N) {
  if constexpr (QT == kQ4_K || QT == kQ5_K) {
    tile_units_k45<QT, M, NU>(a, w, u, out, N);
  } else if constexpr (QT == kQ6_K) {
    tile_units_q6k<M, NU>(a, w, u, out, N);
  } else {
    tile_units<QT, M, NU>(a, w, u, out, N);
  }
}

template <int64_t QT, int M, class Out>
void tile_gemv_m(const BlockActivations& a, const uint8_t* w, int64_t u0, int64_t u1, Out* out, int64_t N) {
  // Independent units in flight hide the integer dot's latency chain when M alone cannot.
  constexpr int NU = M == 1 ? 4 : M == 2 ? 2 : 1;
  int64_t u = u0;
  for (; u + NU <= u1; u += NU) format_units<QT, M, NU>(a, w, u, out, N);
  for (; u < u1; ++u) format_units<QT, M, 1>(a, w, u, out, N);
}

template <int64_t QT, class Out>
void tile_gemv_format(const BlockActivations& a, int64_t M, const uint8_t* w, int64_t u0, int64_t u1, Out* out,
                      int64_t N) {
  switch (M) {
    case 1: return tile_gemv_m<QT, 1>(a, w, u0, u1, out, N);
    case 2: return tile_gemv_m<QT, 2>(a, w, u0, u1, out, N);
    case 3: return tile_gemv_m<QT, 3>(a, w, u0, u1, out, N);
    case 4: return tile_gemv_m<QT, 4>(a, w, u0, u1, out, N);
    case 5: return tile_gemv_m<QT, 5>(a, w, u0, u1, out, N);
    case 6: return tile_gemv_m<QT, 6>(a, w, u0, u1, out, N);
    case 7: return tile_gemv_m<QT, 7>(a, w, u0, u1, out, N);
    default: return tile_gemv_m<QT, 8>(a, w, u0, u1, out, N);
  }
}

// Whole tiles of rows [n0, n1) of the interleaved weight w, dequantized transposed: dst[k * ld + (r - n0)] for
// k < nb * 32, f32 or bf16 bits (the slab GEMM's operand W^T). A tile's word lines already hold its rows side
// by side, so every decoded vector is kUnitRows consecutive outputs of one column k: nothing is regrouped.
template <int64_t QT, class Out>
void dequantize_tiles_t_format(const uint8_t* w, int64_t nb, int64_t n0, int64_t n1, Out* dst, int64_t ld) {
  using TF = TileFormat<QT>;
  constexpr int64_t kTileBytes = TF::kTileBytes;
  constexpr int kWords = TF::kWords;
  auto store = [&](int64_t k, int64_t col, VF v) { store_unit(dst + k * ld + col, v); };
  for (int64_t g = n0 / kTileRows; g < n1 / kTileRows; ++g) {
    for (int64_t half = 0; half < kUnitsPerTile; ++half) {
      const int64_t col = g * kTileRows - n0 + half * kUnitRows;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* tile = w + (g * nb + b) * kTileBytes;
        const VF d = load_scales(tile + 16 * half);
        const uint8_t* words = tile + TF::kQsOffset + 32 * half;
        VI high = VI();  // Q5: lane r holds row r's 32 fifth bits
        if constexpr (TF::kQ5) high = iloadu(tile + TF::kHeaderBytes + 32 * half);
        for (int j = 0; j < kWords; ++j) {
          const VI v = iloadu(words + 64 * j);  // lane r: bytes 4j .. 4j + 3 of row r's quants
          for (int i = 0; i < 4; ++i) {
            const int64_t k = b * 32 + 4 * j + i;
            if constexpr (QT == kQ8_0) {
              store(k, col, fmul(cvt(srai32(sll32(v, 24 - 8 * i), 24)), d));
            } else {  // byte 4j + i holds value 4j + i (low nibble) and value 4j + i + 16 (high nibble)
              VI lo = band(srl32(v, 8 * i), set1_32(0x0F)), hi = band(srl32(v, 8 * i + 4), set1_32(0x0F));
              if constexpr (TF::kQ5) {  // fifth bits 4j + i and 16 + 4j + i
                lo = bor(lo, sll32(band(srl32(high, 4 * j + i), set1_32(1)), 4));
                hi = bor(hi, sll32(band(srl32(high, 16 + 4 * j + i), set1_32(1)), 4));
              }
              if constexpr (!TF::kHasMin) {  // (u + offset) * d, as ggml rounds it
                store(k, col, fmul(cvt(sub32(lo, set1_32(int(-TF::kOffset)))), d));
                store(k + 16, col, fmul(cvt(sub32(hi, set1_32(int(-TF::kOffset)))), d));
              } else {
                const VF m = load_scales(tile + 32 + 16 * half);
                store(k, col, fmadd(cvt(lo), d, m));
                store(k + 16, col, fmadd(cvt(hi), d, m));
              }
            }
          }
        }
      }
    }
  }
}

void dequantize_tiles_t(int64_t qtype, const uint8_t* w, int64_t nb, int64_t n0, int64_t n1, void* dst, bool dst_bf16,
                        int64_t ld) {
  auto run = [&](auto* o) {
    switch (qtype) {
      case kQ4_0: return dequantize_tiles_t_format<kQ4_0>(w, nb, n0, n1, o, ld);
      case kQ4_1: return dequantize_tiles_t_format<kQ4_1>(w, nb, n0, n1, o, ld);
      case kQ5_0: return dequantize_tiles_t_format<kQ5_0>(w, nb, n0, n1, o, ld);
      case kQ5_1: return dequantize_tiles_t_format<kQ5_1>(w, nb, n0, n1, o, ld);
      default: return dequantize_tiles_t_format<kQ8_0>(w, nb, n0, n1, o, ld);
    }
  };
  if (dst_bf16) {
    run(static_cast<uint16_t*>(dst));
  } else {
    run(static_cast<float*>(dst));
  }
}

int64_t tile_unit_rows() { return kUnitRows; }

// x: [M, K] f32 (x_bf16 false) or bf16 bits, M <= 8 -> q, d, s of BlockActivations (nb blocks).
void quantize_activations_for_tiles(const void* x, bool x_bf16, int64_t x_stride, int64_t M, int64_t K, int64_t nb,
                                    int8_t* q, float* d, float* s, float* h) {
  if (x_bf16) {
    quantize_activation_blocks(static_cast<const uint16_t*>(x), x_stride, M, K, nb, q, d, s, h);
  } else {
    quantize_activation_blocks(static_cast<const float*>(x), x_stride, M, K, nb, q, d, s, h);
  }
}

// Units [u0, u1) of the interleaved weight w ([N / 16, blocks, tile bytes]) against the quantized activations
// (nb 32-value blocks per row): out [M, N] f32 (out_bf16 false) or bf16 bits.
void tile_gemv(int64_t qtype, const int8_t* xq, const float* xd, const float* xs, const float* xh, int64_t nb,
               int64_t M, const uint8_t* w, int64_t u0, int64_t u1, void* out, bool out_bf16, int64_t N) {
  const BlockActivations a{xq, xd, xs, xh, nb};
  auto run = [&](auto* o) {
    switch (qtype) {
      case kQ4_0: return tile_gemv_format<kQ4_0>(a, M, w, u0, u1, o, N);
      case kQ4_1: return tile_gemv_format<kQ4_1>(a, M, w, u0, u1, o, N);
      case kQ5_0: return tile_gemv_format<kQ5_0>(a, M, w, u0, u1, o, N);
      case kQ5_1: return tile_gemv_format<kQ5_1>(a, M, w, u0, u1, o, N);
      case kQ4_K: return tile_gemv_format<kQ4_K>(a, M, w, u0, u1, o, N);
      case kQ5_K: return tile_gemv_format<kQ5_K>(a, M, w, u0, u1, o, N);
      case kQ6_K: return tile_gemv_format<kQ6_K>(a, M, w, u0, u1, o, N);
      default: return tile_gemv_format<kQ8_0>(a, M, w, u0, u1, o, N);
    }
  };
  if (out_bf16) {
    run(static_cast<uint16_t*>(out));
  } else {
    run(static_cast<float*>(out));
  }
}

}  // namespace fast_inference::cpu::FI_QUANT_ISA
