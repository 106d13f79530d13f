// The interleaved tile layout of Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 weights (quant_formats.h): to it and back, in ATen ops.
#pragma once

#include <ATen/ATen.h>

namespace fast_inference::quant {

// qweight: plain uint8 [N, row_bytes], N a multiple of 16 -> interleaved [N / 16, nb, 16 * block_bytes]
at::Tensor interleave_rows(const at::Tensor& qweight, int64_t qtype);
// interleaved [N / 16, nb, 16 * block_bytes] (already checked) -> plain [N, row_bytes]
at::Tensor deinterleave_rows(const at::Tensor& qweight, int64_t qtype);

}  // namespace fast_inference::quant
