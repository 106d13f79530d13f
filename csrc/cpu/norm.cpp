// fast_inference::rms_norm and add_rms_norm on CPU: one pass per row instead of torch's ~8 ops (a decode
// step calls the norm 61 times on a single row, so the op count, not the arithmetic, is what costs).
// float32 and bfloat16 run the AVX2 / AVX-512 row kernels (elementwise_kernels.h); float16 and CPUs without
// AVX2 the portable loop below.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/cpu_features.h"
#include "cpu/elementwise.h"

namespace fast_inference::cpu {
namespace {

// Rows [r0, r1) of x [T, H] (row stride x_stride). With residual (contiguous [T, H]): residual += x first
// (rounded to T, as a separate torch add would) and the sum is normalised. The arithmetic follows
// transformers: the mean square and rsqrt in float32, x * rstd rounded to T, then times weight in T.
template <typename T>
void rms_norm_rows(const T* x, int64_t x_stride, T* residual, const T* weight, T* out, int64_t H, float eps,
                   int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * x_stride;
    const T* src = xr;
    if (residual != nullptr) {
      T* res = residual + r * H;
      for (int64_t i = 0; i < H; ++i) res[i] = T(static_cast<float>(res[i]) + static_cast<float>(xr[i]));
      src = res;
    }
    float ss = 0.0f;
    for (int64_t i = 0; i < H; ++i) {
      const float v = static_cast<float>(src[i]);
      ss += v * v;
    }
    const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    T* o = out + r * H;
    for (int64_t i = 0; i < H; ++i) {
      const T normed = T(static_cast<float>(src[i]) * rstd);
      o[i] = T(static_cast<float>(weight[i]) * static_cast<float>(normed));
    }
  }
}

void check_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [T, H], got ", x.dim(), "-D");
  TORCH_CHECK(x.stride(1) == 1, "x must have unit stride along H");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "weight must be [H=", x.size(1), "], got ",
              weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "x and weight must be CPU tensors");
}

at::Tensor run(const at::Tensor& x, at::Tensor* residual, const at::Tensor& weight, double eps) {
  const int64_t T = x.size(0), H = x.size(1);
  at::Tensor out = at::empty({T, H}, x.options());
  // Rows split across threads only when there are many (a single decode row runs inline).
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
  const Isa isa = selected_isa();
  const at::ScalarType dtype = x.scalar_type();
  if (isa != Isa::kPortable && (dtype == at::kFloat || dtype == at::kBFloat16)) {
    const auto rows = isa == Isa::kAvx512 ? &avx512::rms_norm_rows : &avx2::rms_norm_rows;
    const void* xp = x.data_ptr();
    void* rp = residual != nullptr ? residual->data_ptr() : nullptr;
    at::parallel_for(0, T, grain, [&](int64_t r0, int64_t r1) {
      rows(dtype, xp, x.stride(0), rp, weight.data_ptr(), out.data_ptr(), H, static_cast<float>(eps), r0, r1);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual != nullptr ? residual->data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain, [&](int64_t r0, int64_t r1) {
      rms_norm_rows<scalar_t>(xp, x.stride(0), rp, wp, op, H, static_cast<float>(eps), r0, r1);
    });
  });
  return out;
}

// x: [T, H]; weight: [H] -> [T, H]
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_args(x, weight);
  return run(x, nullptr, weight, eps);
}

// x: [T, H]; residual: [T, H] contiguous, updated in place to residual + x; returns rms_norm(residual)
at::Tensor add_rms_norm_cpu(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_args(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual must have x's shape ", x.sizes(), ", got ",
              residual.sizes());
  TORCH_CHECK(residual.is_contiguous(), "residual must be contiguous");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), "residual dtype ", residual.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  TORCH_CHECK(residual.device().is_cpu(), "residual must be a CPU tensor");
  return run(x, &residual, weight, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_inference, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
}

}  // namespace fast_inference::cpu
