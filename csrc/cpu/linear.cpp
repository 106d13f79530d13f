// fast_inference::linear on CPU: y = x W^T (+ b). bf16 with at most 4 rows of x on an AVX-512 BF16 CPU
// runs the weight-streaming kernel of linear_avx512.cpp (batch-1..4 decode); all else uses at::linear.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "cpu/cpu_features.h"

namespace fast_inference::cpu {
namespace avx512 {
void linear_bf16_small_m(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* w,
                         const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K);
}

namespace {

constexpr int64_t kMaxRows = 4;

// x: [M, K]; weight: [N, K]; bias: [N] or None -> [M, N]
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [N, K], got ", weight.dim(), "-D");
  TORCH_CHECK(x.size(1) == weight.size(1), "x has K=", x.size(1), " but weight has K=", weight.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x dtype ", x.scalar_type(), " must equal weight dtype ",
              weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), "x is on ", x.device(), " but weight is on ", weight.device());
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [N=", N, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias dtype ", bias->scalar_type(),
                " must equal x dtype ", x.scalar_type());
  }
  const bool fast = x.scalar_type() == at::kBFloat16 && M >= 1 && M <= kMaxRows && K > 0 && N > 0 &&
                    selected_isa() == Isa::kAvx512 && weight.is_contiguous() && x.stride(1) == 1 &&
                    (!bias.has_value() || bias->is_contiguous());
  if (!fast) return at::linear(x, weight, bias);
  at::Tensor out = at::empty({M, N}, x.options());
  avx512::linear_bf16_small_m(
      reinterpret_cast<const c10::BFloat16*>(x.data_ptr()), x.stride(0),
      reinterpret_cast<const c10::BFloat16*>(weight.data_ptr()),
      bias.has_value() ? reinterpret_cast<const c10::BFloat16*>(bias->data_ptr()) : nullptr,
      reinterpret_cast<c10::BFloat16*>(out.data_ptr()), M, N, K);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_inference, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace fast_inference::cpu
