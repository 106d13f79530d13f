// CPU apply_token_bitmask: the driver (checks, dtype and ISA dispatch, one thread) and the portable
// row kernel. A grammar's mask is mostly zero words (every token but a few is disallowed) and all-ones
// words (free text), so each word takes one of three paths: skip, fill 32 entries, or test its bits.
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks/token_bitmask_checks.h"
#include "cpu/cpu_features.h"
#include "cpu/token_bitmask_kernels.h"

namespace fast_inference::cpu {
namespace {

template <typename T>
void mask_row_portable(T* row, const int32_t* words, int64_t vocab, T neg_inf) {
  const int64_t full_words = vocab / 32;
  for (int64_t k = 0; k < full_words; ++k) {
    const uint32_t w = static_cast<uint32_t>(words[k]);
    T* chunk = row + k * 32;
    if (w == 0xFFFFFFFFu) continue;
    if (w == 0) {
      for (int j = 0; j < 32; ++j) chunk[j] = neg_inf;
      continue;
    }
    for (int j = 0; j < 32; ++j) chunk[j] = (w >> j) & 1u ? chunk[j] : neg_inf;
  }
  const int64_t tail = vocab - full_words * 32;
  if (tail > 0) {
    const uint32_t w = static_cast<uint32_t>(words[full_words]);
    T* chunk = row + full_words * 32;
    for (int64_t j = 0; j < tail; ++j) chunk[j] = (w >> j) & 1u ? chunk[j] : neg_inf;
  }
}

void mask_f32_portable(float* row, const int32_t* words, int64_t vocab) {
  mask_row_portable<float>(row, words, vocab, -std::numeric_limits<float>::infinity());
}

void mask_16bit_portable(uint16_t* row, const int32_t* words, int64_t vocab, uint16_t neg_inf) {
  mask_row_portable<uint16_t>(row, words, vocab, neg_inf);
}

const TokenBitmaskKernels kPortable{mask_f32_portable, mask_16bit_portable};

const TokenBitmaskKernels& kernels() {
  switch (selected_isa()) {
    case Isa::kAvx512: return avx512_token_bitmask_kernels();
    case Isa::kAvx2: return avx2_token_bitmask_kernels();
    default: return kPortable;
  }
}

// Bit patterns of -inf in the 16-bit float types.
constexpr uint16_t kHalfNegInf = 0xFC00u;
constexpr uint16_t kBFloat16NegInf = 0xFF80u;

}  // namespace

const TokenBitmaskKernels& portable_token_bitmask_kernels() { return kPortable; }

void apply_token_bitmask_cpu(const at::Tensor& logits,                  // float [B, V], in place
                             const at::Tensor& bitmask,                 // int32 [B, ceil(V / 32)]
                             const std::optional<at::Tensor>& indices) {  // int32 [K] rows, or all rows
  checks::check_token_bitmask(logits, bitmask, indices);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  std::optional<at::Tensor> rows;
  if (indices.has_value()) {
    rows = indices->contiguous();
    checks::check_token_bitmask_indices(*rows, batch);
  }
  const int64_t num_rows = rows.has_value() ? rows->numel() : batch;
  if (num_rows == 0) return;
  const int32_t* row_ids = rows.has_value() ? rows->data_ptr<int32_t>() : nullptr;
  const TokenBitmaskKernels& K = kernels();
  const auto dtype = logits.scalar_type();
  char* base = static_cast<char*>(logits.data_ptr());
  const int64_t row_bytes = logits.stride(0) * static_cast<int64_t>(logits.element_size());
  const int32_t* mask_base = bitmask.data_ptr<int32_t>();
  const int64_t mask_stride = bitmask.stride(0);
  // One thread: the op is a stream of stores (a [32, 49152] f32 mask is 6 MB, about a millisecond), and
  // on a shared machine an OpenMP join costs more than it saves (measured on a loaded 2-core Xeon:
  // median 7.4 ms with 2 threads vs 1.0 ms with one).
  for (int64_t i = 0; i < num_rows; ++i) {
    const int64_t b = row_ids != nullptr ? row_ids[i] : i;
    void* row = base + b * row_bytes;
    const int32_t* words = mask_base + b * mask_stride;
    if (dtype == at::kFloat) {
      K.mask_f32(static_cast<float*>(row), words, vocab);
    } else {
      K.mask_16bit(static_cast<uint16_t*>(row), words, vocab, dtype == at::kHalf ? kHalfNegInf : kBFloat16NegInf);
    }
  }
}

}  // namespace fast_inference::cpu

TORCH_LIBRARY_IMPL(fast_inference, CPU, m) {
  m.impl("apply_token_bitmask", &fast_inference::cpu::apply_token_bitmask_cpu);
}
