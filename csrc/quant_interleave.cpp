// fast_inference::interleave_rows (CPU and CUDA): plain ggml rows -> the interleaved tile layout the CPU decode
// GEMV reads (quant_formats.h), and its inverse for the paths that read plain rows. Pure byte permutations in
// ATen ops, so one implementation serves both devices.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks/quant_checks.h"
#include "quant_interleave.h"

namespace fast_inference::quant {

// qweight: plain uint8 [N, row_bytes] -> interleaved [N / 16, nb, 16 * block_bytes]
at::Tensor interleave_rows(const at::Tensor& qweight, int64_t qtype) {
  check_interleave(qweight, qtype);
  const int64_t header = 2 * header_fields(qtype), quants = block_bytes(qtype) - header;
  const int64_t groups = qweight.size(0) / kTileRows, nb = qweight.size(1) / block_bytes(qtype);
  // [G, nb, 16 rows, block bytes]
  const at::Tensor blocks = qweight.contiguous().view({groups, kTileRows, nb, block_bytes(qtype)}).permute({0, 2, 1, 3});
  // header fields: [G, nb, field, 16 rows, 2 bytes]
  const at::Tensor heads = blocks.narrow(3, header_offset(qtype), header)
                               .reshape({groups, nb, kTileRows, header / 2, 2})
                               .permute({0, 1, 3, 2, 4})
                               .reshape({groups, nb, kTileRows * header});
  // quant words: [G, nb, word, 16 rows, 4 bytes]
  const at::Tensor words = blocks.narrow(3, words_offset(qtype), quants)
                               .reshape({groups, nb, kTileRows, quants / 4, 4})
                               .permute({0, 1, 3, 2, 4})
                               .reshape({groups, nb, kTileRows * quants});
  return at::cat({heads, words}, 2).contiguous();
}

// interleaved [N / 16, nb, 16 * block_bytes] -> plain [N, row_bytes]
at::Tensor deinterleave_rows(const at::Tensor& qweight, int64_t qtype) {
  const int64_t header = 2 * header_fields(qtype), quants = block_bytes(qtype) - header;
  const int64_t groups = qweight.size(0), nb = qweight.size(1);
  const at::Tensor heads = qweight.narrow(2, 0, kTileRows * header)
                               .reshape({groups, nb, header / 2, kTileRows, 2})
                               .permute({0, 1, 3, 2, 4})
                               .reshape({groups, nb, kTileRows, header});
  const at::Tensor words = qweight.narrow(2, kTileRows * header, kTileRows * quants)
                               .reshape({groups, nb, quants / 4, kTileRows, 4})
                               .permute({0, 1, 3, 2, 4})
                               .reshape({groups, nb, kTileRows, quants});
  const at::Tensor blocks = header_offset(qtype) == 0 ? at::cat({heads, words}, 3) : at::cat({words, heads}, 3);
  return blocks.permute({0, 2, 1, 3}).reshape({groups * kTileRows, nb * block_bytes(qtype)});
}

TORCH_LIBRARY_IMPL(fast_inference, CPU, m) { m.impl("interleave_rows", &interleave_rows); }
#if defined(FI_WITH_CUDA)
TORCH_LIBRARY_IMPL(fast_inference, CUDA, m) { m.impl("interleave_rows", &interleave_rows); }
#endif

}  // namespace fast_inference::quant
