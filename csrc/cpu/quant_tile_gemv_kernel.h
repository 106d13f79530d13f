// The decode GEMV (M <= 8 activation rows) over interleaved Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 tiles (quant_formats.h) for one
// ISA. Included by quant_gemv_avx2.cpp and quant_gemv_avx512.cpp after quant_gemv_kernel.h (its vector helpers).
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
// d [M, nb] the block's scale (amax / 127), s [M, nb] = d * (sum of the block's q).
struct BlockActivations {
  const int8_t* q;
  const float* d;
  const float* s;
  int64_t nb;
};

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> 8 f32 (exact: bf16 is the top half of an f32)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p)), 16));
}

// x: [M, K] f32 or bf16 (uint16 bit patterns), row stride x_stride -> BlockActivations' q, d, s for nb blocks.
template <class T>
void quantize_activation_blocks(const T* x, int64_t x_stride, int64_t M, int64_t K, int64_t nb, int8_t* q,
                                float* d, float* s) {
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

// Units [u, u + NU) against M activation rows: out[m * N + u * kUnitRows + r] for the NU * kUnitRows rows.
template <int64_t QT, int M, int NU, class Out>
inline void tile_units(const BlockActivations& a, const uint8_t* w, int64_t u, Out* out, int64_t N) {
  using TF = TileFormat<QT>;
  constexpr int64_t kTileBytes = TF::kTileBytes;
  constexpr int kWords = TF::kWords;
  const int64_t nb = a.nb;
  const uint8_t* tiles[NU];  // unit i's first tile, at its half's offset
  int64_t half[NU];
  for (int i = 0; i < NU; ++i) {
    tiles[i] = w + (u + i) / kUnitsPerTile * nb * kTileBytes;
    half[i] = (u + i) % kUnitsPerTile;
  }
  VF acc[NU][M];
  for (int i = 0; i < NU; ++i)
    for (int m = 0; m < M; ++m) acc[i][m] = fzero();
  // The next group of units' tiles (contiguous, right after this group's) stream in while this group computes:
  // one step's share of them per block, in address order, so the prefetches trickle out evenly and run a whole
  // group ahead. (Prefetching a fixed distance along each unit's own tiles overshoots into the units being read
  // right now when a row has few blocks: K = 576 is 18 blocks.) Into L2 (T1): the group is read a few
  // microseconds later; A/B on the SmolLM2 GGUFs, T1 beat T0 by 5-15% per token and NTA lost 2.7x.
  constexpr int64_t kGroupTiles = NU >= kUnitsPerTile ? NU / kUnitsPerTile : 1;
  const char* next = reinterpret_cast<const char*>(w + (u + NU) / kUnitsPerTile * nb * kTileBytes);
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t line = 0; line < kGroupTiles * kTileBytes; line += 64)
      _mm_prefetch(next + b * kGroupTiles * kTileBytes + line, _MM_HINT_T1);
    for (int i = 0; i < NU; ++i) {
      const uint8_t* tile = tiles[i] + b * kTileBytes;
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

template <int64_t QT, int M, class Out>
void tile_gemv_m(const BlockActivations& a, const uint8_t* w, int64_t u0, int64_t u1, Out* out, int64_t N) {
  // Independent units in flight hide the integer dot's latency chain when M alone cannot.
  constexpr int NU = M == 1 ? 4 : M == 2 ? 2 : 1;
  int64_t u = u0;
  for (; u + NU <= u1; u += NU) tile_units<QT, M, NU>(a, w, u, out, N);
  for (; u < u1; ++u) tile_units<QT, M, 1>(a, w, u, out, N);
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
                                    int8_t* q, float* d, float* s) {
  if (x_bf16) {
    quantize_activation_blocks(static_cast<const uint16_t*>(x), x_stride, M, K, nb, q, d, s);
  } else {
    quantize_activation_blocks(static_cast<const float*>(x), x_stride, M, K, nb, q, d, s);
  }
}

// Units [u0, u1) of the interleaved weight w ([N / 16, nb, tile bytes]) against the quantized activations:
// out [M, N] f32 (out_bf16 false) or bf16 bits.
void tile_gemv(int64_t qtype, const int8_t* xq, const float* xd, const float* xs, int64_t nb, int64_t M,
               const uint8_t* w, int64_t u0, int64_t u1, void* out, bool out_bf16, int64_t N) {
  const BlockActivations a{xq, xd, xs, nb};
  auto run = [&](auto* o) {
    switch (qtype) {
      case kQ4_0: return tile_gemv_format<kQ4_0>(a, M, w, u0, u1, o, N);
      case kQ4_1: return tile_gemv_format<kQ4_1>(a, M, w, u0, u1, o, N);
      case kQ5_0: return tile_gemv_format<kQ5_0>(a, M, w, u0, u1, o, N);
      case kQ5_1: return tile_gemv_format<kQ5_1>(a, M, w, u0, u1, o, N);
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
