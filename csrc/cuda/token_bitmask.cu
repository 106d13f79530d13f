// CUDA apply_token_bitmask: one thread per vocabulary entry (a warp shares one bitmask word, read once
// and broadcast), -inf stored where the entry's bit is 0; coalesced stores, no loads of the logits.
//
// No host synchronisation and no allocation: the checks read only metadata, and a row whose index is
// out of range is skipped by the kernel instead of being refused (the CPU op refuses it, as it can read
// the indices for free), so the op can run inside a CUDA graph or ahead of the sampler on the stream.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks/token_bitmask_checks.h"

namespace fast_inference::cuda {
namespace {

constexpr int kThreads = 256;

// grid: (ceil(vocab / kThreads) capped, num_rows); each thread walks the row with a grid stride.
template <typename T>
__global__ void token_bitmask_kernel(T* __restrict__ logits, int64_t row_stride, int64_t vocab, int64_t batch,
                                     const int32_t* __restrict__ bitmask, int64_t mask_stride,
                                     const int32_t* __restrict__ indices, T neg_inf) {
  const int64_t b = indices != nullptr ? indices[blockIdx.y] : static_cast<int64_t>(blockIdx.y);
  if (b < 0 || b >= batch) return;
  T* row = logits + b * row_stride;
  const int32_t* words = bitmask + b * mask_stride;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vocab;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t w = static_cast<uint32_t>(__ldg(words + (v >> 5)));
    if (!((w >> (v & 31)) & 1u)) row[v] = neg_inf;
  }
}

}  // namespace

void apply_token_bitmask_cuda(const at::Tensor& logits,                  // float [B, V], in place
                              const at::Tensor& bitmask,                 // int32 [B, ceil(V / 32)]
                              const std::optional<at::Tensor>& indices) {  // int32 [K] rows, or all rows
  const c10::cuda::CUDAGuard guard(logits.device());
  checks::check_token_bitmask(logits, bitmask, indices);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  std::optional<at::Tensor> rows;
  if (indices.has_value()) rows = indices->contiguous();
  const int64_t num_rows = rows.has_value() ? rows->numel() : batch;
  if (num_rows == 0) return;
  TORCH_CHECK(num_rows <= 65535, "indices (or logits rows) must number at most 65535, got ", num_rows);
  const int32_t* row_ids = rows.has_value() ? rows->data_ptr<int32_t>() : nullptr;
  const int64_t blocks_per_row = std::min<int64_t>((vocab + kThreads - 1) / kThreads, 1024);
  const dim3 grid(static_cast<unsigned>(blocks_per_row), static_cast<unsigned>(num_rows));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = logits.scalar_type();
  if (dtype == at::kFloat) {
    token_bitmask_kernel<float><<<grid, kThreads, 0, stream>>>(
        logits.data_ptr<float>(), logits.stride(0), vocab, batch, bitmask.data_ptr<int32_t>(), bitmask.stride(0),
        row_ids, -std::numeric_limits<float>::infinity());
  } else {
    // The 16-bit types store -inf's bit pattern: no conversion on the device.
    const uint16_t neg_inf = dtype == at::kHalf ? 0xFC00u : 0xFF80u;
    token_bitmask_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(
        static_cast<uint16_t*>(logits.data_ptr()), logits.stride(0), vocab, batch, bitmask.data_ptr<int32_t>(),
        bitmask.stride(0), row_ids, neg_inf);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fast_inference::cuda

TORCH_LIBRARY_IMPL(fast_inference, CUDA, m) {
  m.impl("apply_token_bitmask", &fast_inference::cuda::apply_token_bitmask_cuda);
}
