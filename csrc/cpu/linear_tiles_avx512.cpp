// bf16 y = x W^T (+ b) on AVX512_BF16 without AMX, for a weight in VNNI tiles (ops.vnni_tiles), every M.
//
// Tile (j, t) holds W[16j .. 16j+15, 32t .. 32t+31] as 16 k-pairs x 16 columns x 2: one k-pair of 16
// output columns is one zmm, the B operand of vdpbf16ps as it sits in memory. The A operand is the
// matching pair of x broadcast to every lane, so a register tile of MB rows x NB column blocks (MB * NB
// zmm accumulators, 16 outputs each) needs NB weight loads and MB broadcasts per MB * NB dot products,
// and no horizontal reductions at all (a row-major weight needs a transpose-and-add tree per 16 outputs,
// ~15% of the work at K = 576). One copy of the weight serves decode (M = 1: the column blocks stream
// front to back at the read bandwidth) and prefill alike, where the engine used to keep a row-major copy
// for the GEMV next to oneDNN's prepacked one.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/linear_tiles_driver.h"

namespace fast_inference::cpu::avx512 {

namespace {

// Rows of x per pass over a thread's column blocks: 256 rows of K = 1536 bf16 (768 KiB) stay in L2.
constexpr int64_t kRowChunk = 256;

inline __m512bh pair_of(const uint16_t* x) {  // x[0], x[1] in every 32-bit lane
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}

// One call's operands; x: [M, K] bf16, rows x_stride apart.
struct Avx512Tiles : VnniTileOperands {
  const uint16_t* x;
  int64_t x_stride;

  // Rows [m0, m0 + MB) x column blocks [j0, j0 + NB) of out. next: the following NB column blocks to stream
  // into L2 meanwhile, NB lines per k-pair step in address order, or null. A decode step's few rows leave
  // the core waiting on memory, and NB interleaved streams of K / 32 KiB each are short for the hardware
  // prefetcher (as in the row GEMV).
  template <int MB, int NB>
  void run(int64_t m0, int64_t j0, const char* next) const {
    __m512 acc[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int b = 0; b < NB; ++b) acc[i][b] = _mm512_setzero_ps();
    const uint16_t* block[NB];
    for (int b = 0; b < NB; ++b) block[b] = tiles + (j0 + b) * k_tiles * kVnniTileElems;
    const uint16_t* xr = x + m0 * x_stride;
    for (int64_t t = 0; t < k_tiles; ++t) {
      for (int p = 0; p < 16; ++p) {
        if (next != nullptr) {
          for (int b = 0; b < NB; ++b) _mm_prefetch(next + ((t * 16 + p) * NB + b) * 64, _MM_HINT_T1);
        }
        __m512bh w[NB];
        for (int b = 0; b < NB; ++b) w[b] = (__m512bh)_mm512_loadu_si512(block[b] + t * kVnniTileElems + 32 * p);
        for (int i = 0; i < MB; ++i) {
          const __m512bh a = pair_of(xr + i * x_stride + 32 * t + 2 * p);
          for (int b = 0; b < NB; ++b) acc[i][b] = _mm512_dpbf16_ps(acc[i][b], w[b], a);
        }
      }
    }
    for (int b = 0; b < NB; ++b) {
      const int64_t n0 = (j0 + b) * 16;
      const __m512 bv = bias != nullptr ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                              _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                                  reinterpret_cast<const __m256i*>(bias + n0))),
                                              16))
                                        : _mm512_setzero_ps();
      for (int i = 0; i < MB; ++i) {
        const __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(acc[i][b], bv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m0 + i) * N + n0), (__m256i)y);
      }
    }
  }
};

}  // namespace

// x: [M, K] bf16 (row stride x_stride); tiles: [N / 16, K / 32, 512] bf16; bias: [N] or null; out: [M, N].
void linear_bf16_vnni_tiles(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* tiles,
                            const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K) {
  const Avx512Tiles tile{{reinterpret_cast<const uint16_t*>(tiles), K / 32, bias, out, N},
                         reinterpret_cast<const uint16_t*>(x),
                         x_stride};
  at::parallel_for(0, N / 16, tile_task_blocks(M, K), [&](int64_t j0, int64_t j1) {
    if (M < 4) {  // decode: more column streams in flight, fewer rows
      tile_column_blocks<3, 4>(tile, M, kRowChunk, j0, j1);
    } else {
      tile_column_blocks<8, 3>(tile, M, kRowChunk, j0, j1);
    }
  });
}

}  // namespace fast_inference::cpu::avx512
