// The ggml block formats of quantized weights (bit-exact with GGUF files): layouts, sizes, and per-block
// dequantization shared by the CPU and CUDA kernels. Framework-free; host and device.
//
// A quantized weight is [N, row_bytes] uint8: each of the N rows is ceil(K / block_elems) blocks laid end to
// end, K padded with zeros up to a whole block. qtype is ggml's type id (the number a GGUF file stores).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FI_HOST_DEVICE __host__ __device__
#else
#define FI_HOST_DEVICE
#endif

namespace fast_inference::quant {

enum QType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

constexpr const char* kSupportedQTypes = "Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8, Q4_K=12, Q5_K=13, Q6_K=14";

// d: scale, m: min (fp16 bit patterns). Values: Q4_0 (q - 8) * d; Q4_1 q * d + m; Q8_0 q * d.
// qs of Q4_0/Q4_1: value j in the low nibble of qs[j], value j + 16 in the high nibble.
struct BlockQ4_0 { uint16_t d; uint8_t qs[16]; };
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[16]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[32]; };
// Q5_0 / Q5_1: Q4_0 / Q4_1's nibbles plus a fifth bit per value, bit j of qh (a little-endian uint32) for value j.
// Values: Q5_0 (q - 16) * d; Q5_1 q * d + m. llama.cpp writes them where a K-quant's row is not a multiple of 256
// (a Q4_K_M file of a 576-wide model holds most of its tensors as Q5_0).
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; };
struct BlockQ5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; };
// K-quants: super-blocks of 256 values in sub-blocks of 32 (Q4_K, Q5_K: 6-bit scale and min each, packed
// in 12 bytes) or 16 (Q6_K: int8 scales).
struct BlockQ4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; };
struct BlockQ5_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; };
struct BlockQ6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; };
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ5_0) == 22 && sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210);

FI_HOST_DEVICE inline bool is_supported(int64_t qtype) {
  return qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ5_0 || qtype == kQ5_1 || qtype == kQ8_0 || qtype == kQ4_K ||
         qtype == kQ5_K || qtype == kQ6_K;
}
FI_HOST_DEVICE inline int64_t block_elems(int64_t qtype) { return qtype >= kQ4_K ? 256 : 32; }
FI_HOST_DEVICE inline int64_t block_bytes(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return sizeof(BlockQ4_0);
    case kQ4_1: return sizeof(BlockQ4_1);
    case kQ5_0: return sizeof(BlockQ5_0);
    case kQ5_1: return sizeof(BlockQ5_1);
    case kQ8_0: return sizeof(BlockQ8_0);
    case kQ4_K: return sizeof(BlockQ4_K);
    case kQ5_K: return sizeof(BlockQ5_K);
    default: return sizeof(BlockQ6_K);
  }
}
FI_HOST_DEVICE inline int64_t blocks_per_row(int64_t qtype, int64_t K) {
  return (K + block_elems(qtype) - 1) / block_elems(qtype);
}
FI_HOST_DEVICE inline int64_t row_bytes(int64_t qtype, int64_t K) { return blocks_per_row(qtype, K) * block_bytes(qtype); }

// ---- the interleaved layout (CPU decode) -----------------------------------------------------------------
// Weights of every format may also be kept as uint8 [N / 16, nb, 16 * block_bytes]: tiles of 16 rows x 1 block
// (a super-block for the K-quants), holding the same bytes as the 16 blocks, regrouped so that one SIMD load
// covers all 16 rows:
//   the header fields (d; Q4_1 / Q5_1: d then m; Q4_K / Q5_K: d then dmin), each as 16 fp16 values (row 0..15),
//   then the rest of the block's bytes, in the block's order, as words of 4 bytes: word j is 16 rows x bytes
//   4j .. 4j + 3 of each row's bytes other than the header.
// So a 4-bit word of Q4_0 / Q4_1 holds values 4j .. 4j + 3 (low nibbles) and 16 + 4j ... (high nibbles); Q5_0 /
// Q5_1's first word is qh (the 16 rows' fifth bits in one line); Q4_K's words are scales (3), then qs (32);
// Q5_K's scales (3), qh (8), qs (32); Q6_K's ql (32), qh (16), scales (4) (its d, the block's last field, is
// the tile's header like every other format's).
constexpr int64_t kTileRows = 16;
// fp16 header fields per block: d (and m for Q4_1 / Q5_1, dmin for Q4_K / Q5_K).
FI_HOST_DEVICE inline int64_t header_fields(int64_t qtype) {
  return qtype == kQ4_1 || qtype == kQ5_1 || qtype == kQ4_K || qtype == kQ5_K ? 2 : 1;
}
// Where the header sits in a block: first, except Q6_K's d at the end.
FI_HOST_DEVICE inline int64_t header_offset(int64_t qtype) { return qtype == kQ6_K ? 208 : 0; }
// Where the rest (the tile's words) starts in a block.
FI_HOST_DEVICE inline int64_t words_offset(int64_t qtype) {
  return qtype == kQ6_K ? 0 : 2 * header_fields(qtype);
}

FI_HOST_DEVICE inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float f = (float)mant * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  const uint32_t bits = exp == 31 ? (sign | 0x7F800000u | (mant << 13)) : (sign | ((exp + 112) << 23) | (mant << 13));
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// Round-to-nearest-even float -> fp16 bit pattern (ggml stores block scales as fp16).
FI_HOST_DEVICE inline uint16_t float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  uint32_t x = __float_as_uint(f);
#else
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
#endif
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u);  // NaN, inf
  if (x >= 0x477FF000u) return sign | 0x7C00u;  // rounds past 65504: inf
  if (x < 0x38800000u) {  // below 2^-14: a subnormal half, round(|f| * 2^24)
    const float a = f < 0 ? -f : f;
    return sign | static_cast<uint16_t>(nearbyintf(a * 16777216.0f));
  }
  uint32_t h = (x >> 13) - (112u << 10);  // rebias the exponent, keep 10 mantissa bits
  const uint32_t rest = x & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;
  return static_cast<uint16_t>(sign | h);
}

// 32 floats -> one Q4_0 / Q4_1 / Q8_0 block at dst, with ggml's rounding (so files written here match its own).
FI_HOST_DEVICE inline void quantize_block(int64_t qtype, const float* x, uint8_t* dst) {
  if (qtype == kQ8_0) {
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    auto* b = reinterpret_cast<BlockQ8_0*>(dst);
    b->d = float_to_half(d);
    for (int j = 0; j < 32; ++j) b->qs[j] = static_cast<int8_t>(roundf(x[j] * id));
  } else if (qtype == kQ4_0) {
    float amax = 0.f, max = 0.f;  // the value of largest magnitude, with its sign
    for (int j = 0; j < 32; ++j) {
      if (fabsf(x[j]) > amax) {
        amax = fabsf(x[j]);
        max = x[j];
      }
    }
    const float d = max / -8.f, id = d != 0.f ? 1.f / d : 0.f;
    auto* b = reinterpret_cast<BlockQ4_0*>(dst);
    b->d = float_to_half(d);
    for (int j = 0; j < 16; ++j) {
      const int lo = static_cast<int>(fminf(15.f, x[j] * id + 8.5f));
      const int hi = static_cast<int>(fminf(15.f, x[j + 16] * id + 8.5f));
      b->qs[j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  } else {  // kQ4_1
    float lo_v = x[0], hi_v = x[0];
    for (int j = 1; j < 32; ++j) {
      lo_v = fminf(lo_v, x[j]);
      hi_v = fmaxf(hi_v, x[j]);
    }
    const float d = (hi_v - lo_v) / 15.f, id = d != 0.f ? 1.f / d : 0.f;
    auto* b = reinterpret_cast<BlockQ4_1*>(dst);
    b->d = float_to_half(d);
    b->m = float_to_half(lo_v);
    for (int j = 0; j < 16; ++j) {
      const int lo = static_cast<int>(fminf(15.f, (x[j] - lo_v) * id + 0.5f));
      const int hi = static_cast<int>(fminf(15.f, (x[j + 16] - lo_v) * id + 0.5f));
      b->qs[j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

// The j-th (0..7) 6-bit scale and min of a Q4_K / Q5_K super-block.
FI_HOST_DEVICE inline void k_scale_min(int j, const uint8_t* q, int* scale, int* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// One block of `qtype` at `src` -> block_elems(qtype) floats at `dst`.
FI_HOST_DEVICE inline void dequantize_block(int64_t qtype, const uint8_t* src, float* dst) {
  switch (qtype) {
    case kQ4_0: {
      const auto* b = reinterpret_cast<const BlockQ4_0*>(src);
      const float d = half_to_float(b->d);
      for (int j = 0; j < 16; ++j) {
        dst[j] = ((b->qs[j] & 0xF) - 8) * d;
        dst[j + 16] = ((b->qs[j] >> 4) - 8) * d;
      }
      break;
    }
    case kQ4_1: {
      const auto* b = reinterpret_cast<const BlockQ4_1*>(src);
      const float d = half_to_float(b->d), m = half_to_float(b->m);
      for (int j = 0; j < 16; ++j) {
        dst[j] = (b->qs[j] & 0xF) * d + m;
        dst[j + 16] = (b->qs[j] >> 4) * d + m;
      }
      break;
    }
    case kQ5_0:
    case kQ5_1: {
      const bool q5_1 = qtype == kQ5_1;
      const auto* b0 = reinterpret_cast<const BlockQ5_0*>(src);
      const auto* b1 = reinterpret_cast<const BlockQ5_1*>(src);
      const uint8_t* qh = q5_1 ? b1->qh : b0->qh;
      const uint8_t* qs = q5_1 ? b1->qs : b0->qs;
      const uint32_t high = uint32_t(qh[0]) | uint32_t(qh[1]) << 8 | uint32_t(qh[2]) << 16 | uint32_t(qh[3]) << 24;
      const float d = half_to_float(b0->d), m = q5_1 ? half_to_float(b1->m) : 0.f;
      const int offset = q5_1 ? 0 : 16;
      for (int j = 0; j < 16; ++j) {
        dst[j] = float(int((qs[j] & 0xF) | ((high >> j) & 1) << 4) - offset) * d + m;
        dst[j + 16] = float(int((qs[j] >> 4) | ((high >> (j + 16)) & 1) << 4) - offset) * d + m;
      }
      break;
    }
    case kQ8_0: {
      const auto* b = reinterpret_cast<const BlockQ8_0*>(src);
      const float d = half_to_float(b->d);
      for (int j = 0; j < 32; ++j) dst[j] = b->qs[j] * d;
      break;
    }
    case kQ4_K:
    case kQ5_K: {
      // Both share the header layout up to `scales`; Q5_K adds a fifth bit per value from qh.
      const bool five = qtype == kQ5_K;
      const auto* b4 = reinterpret_cast<const BlockQ4_K*>(src);
      const auto* b5 = reinterpret_cast<const BlockQ5_K*>(src);
      const float d = half_to_float(b4->d), dmin = half_to_float(b4->dmin);
      const uint8_t* scales = b4->scales;
      const uint8_t* qs = five ? b5->qs : b4->qs;
      for (int chunk = 0; chunk < 4; ++chunk) {  // 64 values: low nibbles then high nibbles of 32 bytes
        int sc0, m0, sc1, m1;
        k_scale_min(2 * chunk, scales, &sc0, &m0);
        k_scale_min(2 * chunk + 1, scales, &sc1, &m1);
        const float d0 = d * sc0, min0 = dmin * m0, d1 = d * sc1, min1 = dmin * m1;
        for (int l = 0; l < 32; ++l) {
          int lo = qs[l] & 0xF, hi = qs[l] >> 4;
          if (five) {
            lo += (b5->qh[l] >> (2 * chunk)) & 1 ? 16 : 0;
            hi += (b5->qh[l] >> (2 * chunk + 1)) & 1 ? 16 : 0;
          }
          dst[l] = d0 * lo - min0;
          dst[l + 32] = d1 * hi - min1;
        }
        qs += 32;
        dst += 64;
      }
      break;
    }
    default: {  // kQ6_K: 4 + 2 bits per value, int8 scale per 16 values, offset 32
      const auto* b = reinterpret_cast<const BlockQ6_K*>(src);
      const float d = half_to_float(b->d);
      const uint8_t* ql = b->ql;
      const uint8_t* qh = b->qh;
      const int8_t* sc = b->scales;
      for (int half = 0; half < 2; ++half) {
        for (int l = 0; l < 32; ++l) {
          const int is = l / 16;
          const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
          const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
          const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
          const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
          dst[l] = d * sc[is] * q1;
          dst[l + 32] = d * sc[is + 2] * q2;
          dst[l + 64] = d * sc[is + 4] * q3;
          dst[l + 96] = d * sc[is + 6] * q4;
        }
        dst += 128;
        ql += 64;
        qh += 32;
        sc += 8;
      }
      break;
    }
  }
}

}  // namespace fast_inference::quant
