// bf16 y = x W^T (+ b) on AVX2 + FMA for a weight in VNNI tiles (ops.vnni_tiles), every M.
//
// Tile (j, t) holds W[16j .. 16j+15, 32t .. 32t+31] as 16 k-pairs x 16 columns x 2. A 32-byte load of a
// k-pair is 8 columns with (k even, k odd) in each 32-bit lane, so (lane << 16) is the even k as f32 and
// (lane & 0xFFFF0000) the odd one: a column vector widens in two ALU ops and is multiplied by x[m][k]
// broadcast (x is widened to f32 once per call). A register tile of MB rows x 16 columns keeps 2 * MB ymm
// accumulators over all of K with no horizontal reductions, and reads the weight once per MB rows, which
// is what lets bf16 batches run at f32 FMA speed without the widened-slab copy + sgemm of the row layout.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/linear_tiles_driver.h"

namespace fast_inference::cpu::avx2 {

void widen_bf16_rows(const c10::BFloat16* src, int64_t src_stride, float* dst, int64_t rows, int64_t K);

namespace {

// Rows of x per pass over a thread's column blocks: 128 rows of K = 1536 f32 (768 KiB) stay in L2.
constexpr int64_t kRowChunk = 128;

// One call's operands; xf: [M, K] f32 (x widened once).
struct Avx2Tiles : VnniTileOperands {
  const float* xf;
  int64_t K;

  // Rows [m0, m0 + MB) x the 16 columns of blocks [j, j + NB). next: the following NB column blocks,
  // streamed into L2 meanwhile (NB lines per k-pair step, in address order), or null.
  // Not inlined: inside the driver's walk GCC's register allocation spilled the accumulators of the
  // 16-register ISA to the stack (the 4-row tile ran at half speed, A/B on the AVX2 stand-in).
  template <int MB, int NB>
  __attribute__((noinline)) void run(int64_t m0, int64_t j, const char* next) const {
    // Few rows (decode): the odd k gets accumulators of its own, or each accumulator's FMA chain (4 cycles
    // a link) would bound the weight stream at 2 links per 64 bytes.
    constexpr bool kSplitOdd = MB <= 2;
    __m256 acc[MB][NB][2], acc_odd[MB][NB][2];
    for (int i = 0; i < MB; ++i)
      for (int b = 0; b < NB; ++b)
        for (int h = 0; h < 2; ++h) acc[i][b][h] = acc_odd[i][b][h] = _mm256_setzero_ps();
    const uint16_t* block = tiles + j * k_tiles * kVnniTileElems;
    const float* xr = xf + m0 * K;
    const __m256i high = _mm256_set1_epi32(int(0xFFFF0000u));
    for (int64_t t = 0; t < k_tiles; ++t) {
      for (int p = 0; p < 16; ++p) {
        if (next != nullptr) {
          for (int b = 0; b < NB; ++b) _mm_prefetch(next + ((t * 16 + p) * NB + b) * 64, _MM_HINT_T1);
        }
        const int64_t k = 32 * t + 2 * p;
        for (int b = 0; b < NB; ++b) {
          const uint16_t* pair = block + (b * k_tiles + t) * kVnniTileElems + 32 * p;
          const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair));       // columns 0..7
          const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair + 16));  // columns 8..15
          const __m256 lo_even = _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16));
          const __m256 lo_odd = _mm256_castsi256_ps(_mm256_and_si256(lo, high));
          const __m256 hi_even = _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16));
          const __m256 hi_odd = _mm256_castsi256_ps(_mm256_and_si256(hi, high));
          for (int i = 0; i < MB; ++i) {
            const __m256 x_even = _mm256_broadcast_ss(xr + i * K + k);
            const __m256 x_odd = _mm256_broadcast_ss(xr + i * K + k + 1);
            acc[i][b][0] = _mm256_fmadd_ps(lo_even, x_even, acc[i][b][0]);
            acc[i][b][1] = _mm256_fmadd_ps(hi_even, x_even, acc[i][b][1]);
            if constexpr (kSplitOdd) {
              acc_odd[i][b][0] = _mm256_fmadd_ps(lo_odd, x_odd, acc_odd[i][b][0]);
              acc_odd[i][b][1] = _mm256_fmadd_ps(hi_odd, x_odd, acc_odd[i][b][1]);
            } else {
              acc[i][b][0] = _mm256_fmadd_ps(lo_odd, x_odd, acc[i][b][0]);
              acc[i][b][1] = _mm256_fmadd_ps(hi_odd, x_odd, acc[i][b][1]);
            }
          }
        }
      }
    }
    for (int b = 0; b < NB; ++b) {
      const int64_t n0 = (j + b) * 16;
      float bias_f[16] = {};
      if (bias != nullptr)
        for (int c = 0; c < 16; ++c) bias_f[c] = static_cast<float>(bias[n0 + c]);
      for (int i = 0; i < MB; ++i) {
        alignas(32) float y[16];
        for (int h = 0; h < 2; ++h) {
          __m256 sum = acc[i][b][h];
          if constexpr (kSplitOdd) sum = _mm256_add_ps(sum, acc_odd[i][b][h]);
          _mm256_store_ps(y + 8 * h, _mm256_add_ps(sum, _mm256_loadu_ps(bias_f + 8 * h)));
        }
        c10::BFloat16* o = out + (m0 + i) * N + n0;
        for (int c = 0; c < 16; ++c) o[c] = c10::BFloat16(y[c]);
      }
    }
  }
};

}  // namespace

// x: [M, K] bf16 (row stride x_stride); tiles: [N / 16, K / 32, 512] bf16; bias: [N] or null; out: [M, N].
void linear_bf16_vnni_tiles(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* tiles,
                            const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K) {
  std::vector<float> xf(M * K);
  widen_bf16_rows(x, x_stride, xf.data(), M, K);
  const Avx2Tiles tile{{reinterpret_cast<const uint16_t*>(tiles), K / 32, bias, out, N}, xf.data(), K};
  at::parallel_for(0, N / 16, tile_task_blocks(M, K), [&](int64_t j0, int64_t j1) {
    // 16 ymm: M = 1 takes 2 blocks (4 + 4 split-odd accumulators, more weight streams in flight); else
    // 4 rows x 1 block (8 accumulators + 4 widened weight vectors + 2 broadcasts).
    if (M == 1) {
      tile_column_blocks<1, 2>(tile, M, kRowChunk, j0, j1);
    } else {
      tile_column_blocks<4, 1>(tile, M, kRowChunk, j0, j1);
    }
  });
}

// Column blocks [j0, j0 + blocks) of tiles [N / 16, K / 32, 512] -> f32 dst [K, blocks * 16] (k-major: a
// tile's k-pair is 16 columns of row k and 16 of row k + 1, so the widening stores whole vectors).
void widen_tiles_k_major(const c10::BFloat16* tiles, int64_t j0, int64_t blocks, int64_t K, float* dst) {
  const auto* tp = reinterpret_cast<const uint16_t*>(tiles);
  const int64_t k_tiles = K / 32, ld = blocks * 16;
  const __m256i high = _mm256_set1_epi32(int(0xFFFF0000u));
  for (int64_t b = 0; b < blocks; ++b) {
    const uint16_t* block = tp + (j0 + b) * k_tiles * kVnniTileElems;
    for (int64_t t = 0; t < k_tiles; ++t) {
      for (int p = 0; p < 16; ++p) {
        const uint16_t* pair = block + t * kVnniTileElems + 32 * p;
        float* even = dst + (32 * t + 2 * p) * ld + 16 * b;
        for (int h = 0; h < 2; ++h) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair + 16 * h));
          _mm256_storeu_ps(even + 8 * h, _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)));
          _mm256_storeu_ps(even + ld + 8 * h, _mm256_castsi256_ps(_mm256_and_si256(raw, high)));
        }
      }
    }
  }
}

}  // namespace fast_inference::cpu::avx2
