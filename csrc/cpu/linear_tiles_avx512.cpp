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

namespace fast_inference::cpu::avx512 {

namespace {

constexpr int64_t kTileElems = 512;  // 16 k-pairs x 16 columns x 2 bf16 = 1 KiB
// Rows of x per pass over a thread's column blocks: 256 rows of K = 1536 bf16 (768 KiB) stay in L2.
constexpr int64_t kRowChunk = 256;

inline __m512bh pair_of(const uint16_t* x) {  // x[0], x[1] in every 32-bit lane
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}

// Rows [m0, m0 + MB) x column blocks [j0, j0 + NB) of out. tiles: [N / 16, K / 32, 512]; x rows x_stride apart.
// next: the following NB column blocks (contiguous after these) to stream into L2 meanwhile, NB lines per
// k-pair step in address order, or null. A decode step's few rows leave the core waiting on memory, and
// NB interleaved streams of K / 32 KiB each are short for the hardware prefetcher (as in the row GEMV).
template <int MB, int NB>
void register_tile(const uint16_t* __restrict x, int64_t x_stride, const uint16_t* __restrict tiles, int64_t k_tiles,
                   const c10::BFloat16* __restrict bias, c10::BFloat16* __restrict out, int64_t N, int64_t m0,
                   int64_t j0, const char* next) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int b = 0; b < NB; ++b) acc[i][b] = _mm512_setzero_ps();
  const uint16_t* block[NB];
  for (int b = 0; b < NB; ++b) block[b] = tiles + (j0 + b) * k_tiles * kTileElems;
  const uint16_t* xr = x + m0 * x_stride;
  for (int64_t t = 0; t < k_tiles; ++t) {
    for (int p = 0; p < 16; ++p) {
      if (next != nullptr) {
        for (int b = 0; b < NB; ++b) _mm_prefetch(next + ((t * 16 + p) * NB + b) * 64, _MM_HINT_T1);
      }
      __m512bh w[NB];
      for (int b = 0; b < NB; ++b) w[b] = (__m512bh)_mm512_loadu_si512(block[b] + t * kTileElems + 32 * p);
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

// Rows [m0, m0 + rows) (rows <= MB) of column blocks [j0, j0 + NB): MB is the full tile height.
template <int MB, int NB>
void row_block(int64_t rows, const uint16_t* x, int64_t x_stride, const uint16_t* tiles, int64_t k_tiles,
               const c10::BFloat16* bias, c10::BFloat16* out, int64_t N, int64_t m0, int64_t j0, const char* next) {
  if constexpr (MB > 1) {
    if (rows < MB) return row_block<MB - 1, NB>(rows, x, x_stride, tiles, k_tiles, bias, out, N, m0, j0, next);
  }
  register_tile<MB, NB>(x, x_stride, tiles, k_tiles, bias, out, N, m0, j0, next);
}

// Column blocks [j0, j1) of out for every row of x.
template <int MB, int NB>
void column_blocks(const uint16_t* x, int64_t x_stride, const uint16_t* tiles, int64_t k_tiles,
                   const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t j0, int64_t j1) {
  for (int64_t mc = 0; mc < M; mc += kRowChunk) {
    const int64_t m_end = std::min(M, mc + kRowChunk);
    int64_t j = j0;
    for (; j + NB <= j1; j += NB) {
      // One pass of few rows (decode) streams the next group in; more rows reread this group from L2.
      const bool stream = M <= MB && j + 2 * NB <= j1;
      const char* next = stream ? reinterpret_cast<const char*>(tiles + (j + NB) * k_tiles * kTileElems) : nullptr;
      for (int64_t m = mc; m < m_end; m += MB)
        row_block<MB, NB>(std::min<int64_t>(MB, m_end - m), x, x_stride, tiles, k_tiles, bias, out, N, m, j, next);
    }
    for (; j < j1; ++j) {  // fewer than NB blocks left
      for (int64_t m = mc; m < m_end; m += MB)
        row_block<MB, 1>(std::min<int64_t>(MB, m_end - m), x, x_stride, tiles, k_tiles, bias, out, N, m, j, nullptr);
    }
  }
}

}  // namespace

// x: [M, K] bf16 (row stride x_stride); tiles: [N / 16, K / 32, 512] bf16; bias: [N] or null; out: [M, N].
void linear_bf16_vnni_tiles(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* tiles,
                            const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K) {
  const auto* xp = reinterpret_cast<const uint16_t*>(x);
  const auto* tp = reinterpret_cast<const uint16_t*>(tiles);
  const int64_t col_blocks = N / 16, k_tiles = K / 32;
  // Tasks of at least ~256 KiB of weight (~10 us of streaming) or ~2 M multiply-adds, whichever is less.
  const int64_t block_bytes = k_tiles * 1024, block_macs = 16 * K * M;
  const int64_t grain = std::max<int64_t>(1, std::min((256 * 1024) / block_bytes, (2 << 20) / block_macs));
  at::parallel_for(0, col_blocks, grain, [&](int64_t j0, int64_t j1) {
    if (M < 4) {  // decode: more column streams in flight, fewer rows
      column_blocks<3, 4>(xp, x_stride, tp, k_tiles, bias, out, M, N, j0, j1);
    } else {
      column_blocks<8, 3>(xp, x_stride, tp, k_tiles, bias, out, M, N, j0, j1);
    }
  });
}

}  // namespace fast_inference::cpu::avx512
