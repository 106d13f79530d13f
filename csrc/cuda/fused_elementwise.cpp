// CUDA implementations of the fused elementwise ops (rms_norm, add_rms_norm, rotary_embedding,
// silu_and_mul) composed from ATen kernels: same arithmetic and rounding points as the CPU kernels.
// On CUDA these ops are not on the decode critical path (CUDA graphs remove the launch overhead the CPU
// kernels exist to avoid), so a composition keeps one schema working on both devices with little code.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace fast_inference::cuda {
namespace {

void check_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "x must be [T, H], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight must be [", x.size(1), "], got ",
              weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), "weight must be on ", x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype must equal x dtype");
}

at::Tensor normalize(const at::Tensor& x, const at::Tensor& weight, double eps) {
  // Statistics in float32, x * rstd rounded to x's dtype, then times weight in x's dtype (transformers).
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor rstd = at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * (xf * rstd).to(x.scalar_type());
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  return normalize(x, weight, eps);
}

at::Tensor add_rms_norm_cuda(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual must have x's shape ", x.sizes(), ", got ",
              residual.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && residual.device() == x.device(),
              "residual must match x's dtype and device");
  residual.add_(x);
  return normalize(residual, weight, eps);
}

void rotary_embedding_cuda(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3, "x must be a CUDA tensor [T, H, D], got ", x.sizes());
  const int64_t T = x.size(0), D = x.size(2);
  TORCH_CHECK(D % 2 == 0, "x's head size must be even, got ", D);
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->size(1) == D, "cos and sin must be [", T, ", ", D,
                "], got ", t->sizes());
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type(),
                "cos and sin must match x's dtype and device");
  }
  // Neox halves: cos is [c, c] and sin is [-s, s], so x * cos + [x2, x1] * sin rotates each pair.
  const at::Tensor swapped = at::cat({x.narrow(2, D / 2, D / 2), x.narrow(2, 0, D / 2)}, 2);
  x.copy_(x * cos.unsqueeze(1) + swapped * sin.unsqueeze(1));
}

at::Tensor silu_and_mul_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(1) % 2 == 0, "x must be a CUDA tensor [T, 2 * I], got ",
              x.sizes());
  const int64_t I = x.size(1) / 2;
  return at::silu(x.narrow(1, 0, I)) * x.narrow(1, I, I);
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_inference, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("rotary_embedding", &rotary_embedding_cuda);
  m.impl("silu_and_mul", &silu_and_mul_cuda);
}

}  // namespace fast_inference::cuda
