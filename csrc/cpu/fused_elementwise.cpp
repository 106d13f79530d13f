// fast_inference::rotary_embedding and silu_and_mul on CPU: the decoder's small elementwise chains as one
// op each (a batch-1 decode step is dominated by per-op dispatch, not by this arithmetic). Each rounding
// point of the torch op chain is kept, so bf16/fp16 results equal the chain's exactly (up to exp for silu).
// float32 and bfloat16 run the AVX2 / AVX-512 row kernels (elementwise_kernels.h); float16 and CPUs without
// AVX2 the portable loops below.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/cpu_features.h"
#include "cpu/elementwise.h"

namespace fast_inference::cpu {
namespace {

template <typename T>
inline float r(float v) {  // round to T and back: the result of one torch op in dtype T
  return static_cast<float>(T(v));
}

// x: [T, H, D] (unit stride along D), rotated in place; cos, sin: [T, D] full-width tables ([c, c] and
// [-s, s]), x's dtype. x = x * cos + roll(x, D/2) * sin, rounded as those three torch ops round.
void rotary_embedding_cpu(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3, "x must be 3-D [T, H, D], got ", x.dim(), "-D");
  TORCH_CHECK(x.stride(2) == 1, "x must have unit stride along D");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(D % 2 == 0, "x's head dim D must be even, got ", D);
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->size(1) == D && t->is_contiguous(),
                "cos and sin must be contiguous [T=", T, ", D=", D, "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "cos/sin dtype ", t->scalar_type(), " must equal x dtype ",
                x.scalar_type());
    TORCH_CHECK(t->device() == x.device(), "cos/sin must be on x's device");
  }
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  const int64_t half = D / 2;
  const int64_t grain = std::max<int64_t>(1, 65536 / D);
  const Isa isa = selected_isa();
  const at::ScalarType dtype = x.scalar_type();
  if (isa != Isa::kPortable && (dtype == at::kFloat || dtype == at::kBFloat16)) {
    const auto rows = isa == Isa::kAvx512 ? &avx512::rope_rows : &avx2::rope_rows;
    at::parallel_for(0, T * H, grain, [&](int64_t i0, int64_t i1) {
      rows(dtype, x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(), H, D, i0, i1);
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_embedding", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    const int64_t st = x.stride(0), sh = x.stride(1);
    at::parallel_for(0, T * H, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t t = i / H, h = i % H;
        scalar_t* v = xp + t * st + h * sh;
        const scalar_t* c = cp + t * D;
        const scalar_t* s = sp + t * D;
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = static_cast<float>(v[j]), x2 = static_cast<float>(v[j + half]);
          const float lo = r<scalar_t>(x1 * static_cast<float>(c[j])) + r<scalar_t>(x2 * static_cast<float>(s[j]));
          const float hi = r<scalar_t>(x2 * static_cast<float>(c[j + half])) +
                           r<scalar_t>(x1 * static_cast<float>(s[j + half]));
          v[j] = scalar_t(lo);
          v[j + half] = scalar_t(hi);
        }
      }
    });
  });
}

// x: [T, 2 * I] = [gate | up] (unit stride along the last dim) -> [T, I] = silu(gate) * up
at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [T, 2 * I], got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) % 2 == 0, "x's last dim must be even (gate and up halves), got ", x.size(1));
  TORCH_CHECK(x.stride(1) == 1, "x must have unit stride along the last dim");
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  const int64_t T = x.size(0), I = x.size(1) / 2;
  at::Tensor out = at::empty({T, I}, x.options());
  // About 32K elements per thread: a decode batch's few rows run inline (no parallel region).
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(I, 1));
  const Isa isa = selected_isa();
  const at::ScalarType dtype = x.scalar_type();
  if (isa != Isa::kPortable && (dtype == at::kFloat || dtype == at::kBFloat16)) {
    const auto rows = isa == Isa::kAvx512 ? &avx512::silu_and_mul_rows : &avx2::silu_and_mul_rows;
    at::parallel_for(0, T, grain, [&](int64_t r0, int64_t r1) {
      rows(dtype, x.data_ptr(), x.stride(0), out.data_ptr(), I, r0, r1);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t st = x.stride(0);
    at::parallel_for(0, T, grain, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* g = xp + t * st;
        const scalar_t* u = g + I;
        scalar_t* o = op + t * I;
        for (int64_t j = 0; j < I; ++j) {
          const float gv = static_cast<float>(g[j]);
          o[j] = scalar_t(r<scalar_t>(gv / (1.0f + std::exp(-gv))) * static_cast<float>(u[j]));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_inference, CPU, m) {
  m.impl("rotary_embedding", &rotary_embedding_cpu);
  m.impl("silu_and_mul", &silu_and_mul_cpu);
}

}  // namespace fast_inference::cpu
