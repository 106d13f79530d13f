// Argument validation of apply_token_bitmask, called by the CPU and the CUDA implementations.
//
// Shape, dtype and device checks (TORCH_CHECK -> RuntimeError) read only metadata. The one value check,
// indices in [0, batch) (TORCH_CHECK_VALUE -> ValueError), reads the indices and so runs on the CPU only:
// the CUDA op never synchronizes with the host, and its kernel skips rows whose index is out of range.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <optional>

#include "checks/sampling_checks.h"

namespace fast_inference::checks {

// 32 vocabulary entries per int32 word of a bitmask row.
constexpr int64_t kTokensPerBitmaskWord = 32;

inline int64_t bitmask_words(int64_t vocab) { return (vocab + kTokensPerBitmaskWord - 1) / kTokensPerBitmaskWord; }

inline void check_token_bitmask(const at::Tensor& logits, const at::Tensor& bitmask,
                                const std::optional<at::Tensor>& indices) {
  check_logits(logits);
  const int64_t batch = logits.size(0), words = bitmask_words(logits.size(1));
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.size(0) == batch && bitmask.size(1) == words,
              "bitmask must have shape [", batch, ", ", words, "] (one row per logits row, ceil(vocab / 32) "
              "words), got ", bitmask.sizes());
  TORCH_CHECK(bitmask.scalar_type() == at::kInt, "bitmask must be int32, got ", bitmask.scalar_type());
  TORCH_CHECK(bitmask.device() == logits.device(), "bitmask must be on ", logits.device(), " like logits, got ",
              bitmask.device());
  TORCH_CHECK(batch == 0 || bitmask.stride(1) == 1, "bitmask must be contiguous along its words (stride(1) == 1)");
  if (!indices.has_value()) return;
  const at::Tensor& idx = *indices;
  TORCH_CHECK(idx.dim() == 1, "indices must be 1-D [num_rows], got shape ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt, "indices must be int32, got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == logits.device(), "indices must be on ", logits.device(), " like logits, got ",
              idx.device());
}

// CPU only (reads the values): every index names a logits row.
inline void check_token_bitmask_indices(const at::Tensor& indices, int64_t batch) {
  const int32_t* v = indices.data_ptr<int32_t>();
  for (int64_t i = 0; i < indices.numel(); ++i) {
    TORCH_CHECK_VALUE(v[i] >= 0 && v[i] < batch, "indices must hold logits rows in [0, ", batch, "), got ", v[i],
                      " at position ", i);
  }
}

}  // namespace fast_inference::checks
