// The walk shared by the VNNI-tile linear kernels (linear_tiles_avx512.cpp, linear_tiles_avx2.cpp): which
// register tile covers which rows and column blocks, and which blocks stream into L2 meanwhile.
//
// A Tile is one ISA's kernel over one call's operands: VnniTileOperands plus its view of x, and
//   template <int MB, int NB> void run(int64_t m0, int64_t j, const char* next) const
//     rows [m0, m0 + MB) x column blocks [j, j + NB) of out; next: the following NB blocks (contiguous
//     after these) to prefetch into L2 while it computes, or null
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

namespace fast_inference::cpu {

constexpr int64_t kVnniTileElems = 512;  // one tile: 16 k-pairs x 16 columns x 2 bf16 = 1 KiB

// What every Tile shares. tiles: [N / 16, K / 32, 512] bf16 (k_tiles = K / 32); bias: [N] or null; out: [M, N].
struct VnniTileOperands {
  const uint16_t* tiles;
  int64_t k_tiles;
  const c10::BFloat16* bias;
  c10::BFloat16* out;
  int64_t N;
};

// Column blocks per parallel task: at least ~256 KiB of weight (~10 us of streaming) or ~2 M multiply-adds,
// whichever is less, so a parallel region pays for its fork/join.
inline int64_t tile_task_blocks(int64_t M, int64_t K) {
  const int64_t block_bytes = K / 32 * 1024, block_macs = 16 * K * M;
  return std::max<int64_t>(1, std::min((256 * 1024) / block_bytes, (2 << 20) / block_macs));
}

// Rows [m0, m0 + rows), rows <= MB: MB is the full tile height, a short tile gets a kernel of its height.
template <int MB, int NB, typename Tile>
void tile_rows(const Tile& tile, int64_t rows, int64_t m0, int64_t j, const char* next) {
  if constexpr (MB > 1) {
    if (rows < MB) return tile_rows<MB - 1, NB>(tile, rows, m0, j, next);
  }
  tile.template run<MB, NB>(m0, j, next);
}

// Column blocks [j0, j1) for rows [0, M), NB blocks at a time, row_chunk rows per pass over them (so those
// rows of x stay in L2 while the blocks go by).
template <int MB, int NB, typename Tile>
void tile_column_blocks(const Tile& tile, int64_t M, int64_t row_chunk, int64_t j0, int64_t j1) {
  for (int64_t mc = 0; mc < M; mc += row_chunk) {
    const int64_t m_end = std::min(M, mc + row_chunk);
    int64_t j = j0;
    for (; j + NB <= j1; j += NB) {
      // One pass of few rows (decode) streams the next group in; more rows reread this group from cache.
      const bool stream = M <= MB && j + 2 * NB <= j1;
      const char* next =
          stream ? reinterpret_cast<const char*>(tile.tiles + (j + NB) * tile.k_tiles * kVnniTileElems) : nullptr;
      for (int64_t m = mc; m < m_end; m += MB) tile_rows<MB, NB>(tile, std::min<int64_t>(MB, m_end - m), m, j, next);
    }
    for (; j < j1; ++j) {  // fewer than NB blocks left
      for (int64_t m = mc; m < m_end; m += MB) tile_rows<MB, 1>(tile, std::min<int64_t>(MB, m_end - m), m, j, nullptr);
    }
  }
}

}  // namespace fast_inference::cpu
