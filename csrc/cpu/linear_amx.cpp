// bf16 y = x W^T (+ b) on Intel AMX (Sapphire Rapids and later) for a weight in VNNI tiles, every M.
//
// The weight layout (ops.vnni_tiles): [N / 16, K / 32, 512] bf16, tile (j, t) holding W[16j .. 16j+15,
// 32t .. 32t+31] as 16 rows of k-pairs x 16 columns x 2, which is the B operand of TDPBF16PS as it sits in
// memory. One column block's K / 32 tiles are contiguous, so a thread streams its columns front to back
// exactly once per call whatever M is (rows of x beyond 32 reread the block from L2, not from memory).
//
// Why our own: oneDNN's AMX GEMM on a prepacked weight reads that weight at ~17 GB/s for decode-sized M
// on a 2-core Sapphire Rapids (this kernel's goal is the streaming read, ~30 GB/s), and its M <= 2 path
// is slower than our GEMV, so the engine kept two copies of every weight. TDPBF16PS does 16x16x32 MACs
// per 1 KiB weight tile: even at M = 1 the tile unit outruns memory, so one copy serves every batch.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>

namespace fast_inference::cpu::amx {

namespace {

constexpr int64_t kTileBytes = 1024;  // one B tile: 16 k-pairs x 16 columns x 2 bf16
constexpr int64_t kTileElems = 512;

// The 64-byte AMX tile configuration (palette 1): tmm0/1 = A (rows of x), tmm2/3 = B (weight tiles),
// tmm4..7 = C (f32 accumulators: A0B0, A0B1, A1B0, A1B1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure(int rows0, int rows1) {
  TileConfig cfg;
  const int a_rows[2] = {rows0, rows1 > 0 ? rows1 : 1};
  for (int t = 0; t < 2; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(a_rows[t]);
    cfg.colsb[t] = 64;
    cfg.rows[2 + t] = 16;
    cfg.colsb[2 + t] = 64;
  }
  for (int t = 0; t < 4; ++t) {
    cfg.rows[4 + t] = static_cast<uint8_t>(a_rows[t / 2]);
    cfg.colsb[4 + t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// A stored C tile c[rows][16] -> rows [m0, m0 + rows) of out, columns [n0, n0 + 16), plus bias, rounded to bf16.
void write_rows(const float (*c)[16], c10::BFloat16* out, int64_t N, int64_t m0, int rows, int64_t n0,
                const c10::BFloat16* bias) {
  const __m512 b = bias != nullptr
                       ? _mm512_castsi512_ps(_mm512_slli_epi32(
                             _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + n0))),
                             16))
                       : _mm512_setzero_ps();
  for (int r = 0; r < rows; ++r) {
    const __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(c[r]), b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (m0 + r) * N + n0), (__m256i)y);
  }
}

// Rows [m0, m0 + rows0 + rows1) of x against column blocks j (and j + 1 when kTwo): rows0 <= 16 in A0,
// rows1 <= 16 in A1 when kTwoA. `next` (or null): the next column blocks' tiles, pulled into L2 one
// K-step's share per step so memory stays busy across the block boundary.
template <bool kTwo, bool kTwoA>
void block_pass(const uint16_t* x, int64_t x_stride, const uint16_t* b0, const uint16_t* b1, int64_t k_tiles,
                const char* next, int64_t next_blocks_bytes) {
  _tile_zero(4);
  if constexpr (kTwo) _tile_zero(5);
  if constexpr (kTwoA) _tile_zero(6);
  if constexpr (kTwo && kTwoA) _tile_zero(7);
  const int64_t stride = x_stride * 2;
  for (int64_t t = 0; t < k_tiles; ++t) {
    if (next != nullptr) {
      // This step's share of the next blocks: (next_blocks_bytes / k_tiles), a multiple of 1 KiB.
      const char* p = next + t * (next_blocks_bytes / k_tiles);
      for (int64_t off = 0; off < next_blocks_bytes / k_tiles; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
    }
    _tile_loadd(0, x + t * 32, stride);
    if constexpr (kTwoA) _tile_loadd(1, x + 16 * x_stride + t * 32, stride);
    _tile_loadd(2, b0 + t * kTileElems, 64);
    if constexpr (kTwo) _tile_loadd(3, b1 + t * kTileElems, 64);
    _tile_dpbf16ps(4, 0, 2);
    if constexpr (kTwo) _tile_dpbf16ps(5, 0, 3);
    if constexpr (kTwoA) _tile_dpbf16ps(6, 1, 2);
    if constexpr (kTwo && kTwoA) _tile_dpbf16ps(7, 1, 3);
  }
}

// Column blocks [j0, j1) of out for all M rows, on this thread: rows in chunks of kRowChunk (a chunk of x
// stays in L2 while its columns go by), and within a chunk, per pair of column blocks, 32 rows at a time
// (the pair's tiles stay in L1/L2 across them).
constexpr int64_t kRowChunk = 256;

// w: block j0's tiles, the others after it.
void columns(const uint16_t* x, int64_t x_stride, const uint16_t* w, const c10::BFloat16* bias,
             c10::BFloat16* out, int64_t M, int64_t N, int64_t K, int64_t j0, int64_t j1) {
  const int64_t k_tiles = K / 32;
  const int64_t block_elems = k_tiles * kTileElems;
  w -= j0 * block_elems;  // indexed by the absolute block below
  int configured = -1;
  for (int64_t mc = 0; mc < M; mc += kRowChunk) {
    const int64_t m_end = std::min(M, mc + kRowChunk);
    for (int64_t j = j0; j < j1; j += 2) {
      const bool two = j + 1 < j1;
      const uint16_t* b0 = w + j * block_elems;
      const uint16_t* b1 = b0 + block_elems;
      // The blocks after this pair, within this thread's range, prefetched during the chunk's first rows.
      const int64_t next_blocks = std::min<int64_t>(2, j1 - (j + 2));
      const int64_t next_bytes = next_blocks * k_tiles * kTileBytes;
      for (int64_t m0 = mc; m0 < m_end; m0 += 32) {
        const int rows0 = static_cast<int>(std::min<int64_t>(16, m_end - m0));
        const int rows1 = static_cast<int>(std::min<int64_t>(16, m_end - m0 - 16));
        const int key = rows0 * 32 + std::max(rows1, 0);
        if (key != configured) {
          configure(rows0, rows1);
          configured = key;
        }
        const char* next =
            m0 == mc && next_blocks > 0 ? reinterpret_cast<const char*>(b0 + 2 * block_elems) : nullptr;
        const uint16_t* xm = x + m0 * x_stride;
        if (rows1 > 0) {
          if (two) block_pass<true, true>(xm, x_stride, b0, b1, k_tiles, next, next_bytes);
          else block_pass<false, true>(xm, x_stride, b0, b1, k_tiles, next, next_bytes);
        } else {
          if (two) block_pass<true, false>(xm, x_stride, b0, b1, k_tiles, next, next_bytes);
          else block_pass<false, false>(xm, x_stride, b0, b1, k_tiles, next, next_bytes);
        }
        // (_tile_stored needs its tile number as a literal.)
        alignas(64) float c[16][16];
        _tile_stored(4, c, 64);
        write_rows(c, out, N, m0, rows0, j * 16, bias);
        if (two) {
          _tile_stored(5, c, 64);
          write_rows(c, out, N, m0, rows0, (j + 1) * 16, bias);
        }
        if (rows1 > 0) {
          _tile_stored(6, c, 64);
          write_rows(c, out, N, m0 + 16, rows1, j * 16, bias);
          if (two) {
            _tile_stored(7, c, 64);
            write_rows(c, out, N, m0 + 16, rows1, (j + 1) * 16, bias);
          }
        }
      }
    }
  }
  if (configured >= 0) _tile_release();
}

}  // namespace

// Linux asks each process to request the AMX tile state before its first tile instruction.
bool tiles_permitted() {
  static const bool ok = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// x: [M, K] bf16 (row stride x_stride); w: VNNI tiles [N / 16, K / 32, 512]; bias: [N] or null;
// out: [M, N] contiguous. K % 32 == 0, N % 16 == 0 (checked by the caller); tiles_permitted().
void linear_bf16_tiles(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* w, const c10::BFloat16* bias,
                       c10::BFloat16* out, int64_t M, int64_t N, int64_t K) {
  const auto* xp = reinterpret_cast<const uint16_t*>(x);
  const auto* wp = reinterpret_cast<const uint16_t*>(w);
  const int64_t col_blocks = N / 16;
  // Grain: ~256 KiB of weight per task, so a parallel region is worth its fork/join (smaller projections
  // run inline); chunks are even, so a thread's pairs of blocks end in at most one single block.
  const int64_t block_bytes = K * 32;
  const int64_t grain = std::max<int64_t>(2, (256 * 1024) / block_bytes);
  at::parallel_for(0, col_blocks, grain, [&](int64_t j0, int64_t j1) {
    columns(xp, x_stride, wp + j0 * (K / 32) * kTileElems, bias, out, M, N, K, j0, j1);
  });
}

// Column blocks [j0, j1) of out from their tiles `tiles` (block j0's first), on the calling thread: for
// callers that make tiles on the fly (quant_linear's prefill dequantizes a slab of rows into them).
void linear_bf16_tile_columns(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* tiles,
                              const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K,
                              int64_t j0, int64_t j1) {
  columns(reinterpret_cast<const uint16_t*>(x), x_stride, reinterpret_cast<const uint16_t*>(tiles), bias, out, M, N,
          K, j0, j1);
}

// wt: W^T [K, cols] bf16 (row stride ld), K % 32 == 0, cols % 16 == 0 -> tiles [cols / 16, K / 32, 512]: rows
// 2p and 2p + 1 of each 16 columns interleaved element by element (one vpermt2w per k-pair).
void vnni_tiles_from_transposed(const uint16_t* wt, int64_t ld, int64_t K, int64_t cols, uint16_t* tiles) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx = _mm512_load_si512(kInterleave);
  for (int64_t j = 0; j < cols / 16; ++j) {
    for (int64_t k = 0; k < K; k += 2) {
      const __m512i even = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + k * ld + 16 * j)));
      const __m512i odd =
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + (k + 1) * ld + 16 * j)));
      // tile (j, k / 32), k-pair (k % 32) / 2: 32 values
      _mm512_storeu_si512(tiles + (j * (K / 32) + k / 32) * kTileElems + (k % 32) * 16,
                          _mm512_permutex2var_epi16(even, idx, odd));
    }
  }
}

}  // namespace fast_inference::cpu::amx
