// Argument checks of the quantized-weight ops (quantize, dequantize, quant_linear), shared by CPU and CUDA so
// the same bad input raises the same error (ValueError) on both devices.
#pragma once

#include <ATen/ATen.h>

#include "quant_formats.h"

namespace fast_inference::quant {

inline void check_qtype(int64_t qtype) {
  TORCH_CHECK_VALUE(is_supported(qtype), "qtype ", qtype, " is not a supported quantized format; supported: ",
                    kSupportedQTypes);
}

// Rows N of a quantized weight in either layout (plain [N, row_bytes] or interleaved [N / 16, nb, 16 * bytes]).
inline int64_t qweight_rows(const at::Tensor& qweight) {
  return qweight.dim() == 3 ? kTileRows * qweight.size(0) : qweight.size(0);
}

// qweight: uint8, contiguous, plain [N, row_bytes(qtype, in_features)] or interleaved
// [N / 16, blocks_per_row, 16 * block_bytes] (quant_formats.h).
inline void check_qweight(const at::Tensor& qweight, int64_t qtype, int64_t in_features) {
  check_qtype(qtype);
  TORCH_CHECK_VALUE(in_features > 0, "in_features must be positive, got ", in_features);
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte, "qweight must be uint8, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.is_contiguous(), "qweight must be contiguous");
  if (qweight.dim() == 3) {
    TORCH_CHECK_VALUE(qweight.size(1) == blocks_per_row(qtype, in_features) &&
                          qweight.size(2) == kTileRows * block_bytes(qtype),
                      "interleaved qweight must be [N / 16, ", blocks_per_row(qtype, in_features), ", ",
                      kTileRows * block_bytes(qtype), "] for qtype ", qtype, " with K=", in_features, ", got ",
                      qweight.sizes());
    return;
  }
  TORCH_CHECK_VALUE(qweight.dim() == 2, "qweight must be 2-D [N, row_bytes] or 3-D interleaved, got ",
                    qweight.dim(), "-D");
  TORCH_CHECK_VALUE(qweight.size(1) == row_bytes(qtype, in_features), "qweight has ", qweight.size(1),
                    " bytes per row but qtype ", qtype, " with K=", in_features, " needs ",
                    row_bytes(qtype, in_features));
}

// qweight: plain uint8 [N, row_bytes], N a multiple of 16 (interleave_rows).
inline void check_interleave(const at::Tensor& qweight, int64_t qtype) {
  check_qtype(qtype);
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte, "qweight must be uint8, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2, "qweight must be plain 2-D [N, row_bytes], got ", qweight.dim(), "-D");
  TORCH_CHECK_VALUE(qweight.size(0) % kTileRows == 0, "qweight must have a multiple of ", kTileRows,
                    " rows to interleave, got ", qweight.size(0));
  TORCH_CHECK_VALUE(qweight.size(1) % block_bytes(qtype) == 0, "qweight rows of ", qweight.size(1),
                    " bytes are not whole blocks of qtype ", qtype);
}

// x: [M, K] float32 / bfloat16 / float16; bias: [N] in x's dtype or None.
inline void check_quant_linear(const at::Tensor& x, const at::Tensor& qweight, int64_t qtype,
                               const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                        x.scalar_type() == at::kHalf,
                    "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  check_qweight(qweight, qtype, x.size(1));
  TORCH_CHECK_VALUE(x.device() == qweight.device(), "x is on ", x.device(), " but qweight is on ", qweight.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == qweight_rows(qweight), "bias must be [N=", qweight_rows(qweight),
                      "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "bias is on ", bias->device(), " but x is on ", x.device());
  }
}

// weight: float [N, K] for quantize; only the formats the engine quantizes at load are written.
inline void check_quantize(const at::Tensor& weight, int64_t qtype) {
  check_qtype(qtype);
  TORCH_CHECK_VALUE(qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ8_0, "quantize writes Q4_0=2, Q4_1=3, Q8_0=8; qtype ",
                    qtype, " (a K-quant) can be read but not written");
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D [N, K], got ", weight.dim(), "-D");
  TORCH_CHECK_VALUE(weight.size(1) > 0, "weight must have K > 0 columns");
  TORCH_CHECK_VALUE(at::isFloatingType(weight.scalar_type()), "weight must be floating point, got ",
                    weight.scalar_type());
}

}  // namespace fast_inference::quant
