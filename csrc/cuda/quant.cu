// fast_inference::quantize / dequantize / quant_linear on CUDA, over the same ggml block formats as the CPU.
//
// dequantize / quantize: one thread per block. quant_linear: M <= 8 by a GEMV (one warp per output row, each
// lane dequantizing whole blocks in registers and dotting them with the M activation rows, then a warp sum);
// larger M dequantizes W once into x's dtype and runs cuBLAS through at::matmul. An interleaved qweight (the CPU
// decode layout; the engine keeps plain rows on CUDA) is regrouped into plain rows first: correct, not fast.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "checks/quant_checks.h"
#include "quant_formats.h"
#include "quant_interleave.h"

namespace fast_inference::cuda {
namespace {

using namespace fast_inference::quant;

constexpr int kMaxGemvRows = 8;

// q: [N, row_bytes] -> out: f32 [N, nb * block_elems]
__global__ void dequantize_kernel(const uint8_t* __restrict__ q, float* __restrict__ out, int64_t qtype, int64_t N,
                                  int64_t nb) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;  // block index over all rows
  if (i >= N * nb) return;
  dequantize_block(qtype, q + i * block_bytes(qtype), out + i * block_elems(qtype));
}

// w: f32 [N, nb * 32] (zero-padded) -> q: [N, nb * block_bytes]
__global__ void quantize_kernel(const float* __restrict__ w, uint8_t* __restrict__ q, int64_t qtype, int64_t N,
                                int64_t nb) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= N * nb) return;
  quantize_block(qtype, w + i * 32, q + i * block_bytes(qtype));
}

// x: f32 [M, Kp] (zero-padded to whole blocks); q: [N, nb blocks]; out: f32 [M, N]. One warp per output row.
template <int M>
__global__ void quant_gemv_kernel(const float* __restrict__ x, const uint8_t* __restrict__ q, float* __restrict__ out,
                                  int64_t qtype, int64_t N, int64_t nb, int64_t Kp) {
  const int64_t n = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const int64_t belems = block_elems(qtype), bbytes = block_bytes(qtype);
  float acc[M] = {};
  float vals[256];
  for (int64_t b = lane; b < nb; b += 32) {
    dequantize_block(qtype, q + (n * nb + b) * bbytes, vals);
    for (int m = 0; m < M; ++m) {
      const float* xm = x + m * Kp + b * belems;
      float s = 0.f;
      for (int64_t j = 0; j < belems; ++j) s += vals[j] * xm[j];
      acc[m] += s;
    }
  }
  for (int m = 0; m < M; ++m) {
    float s = acc[m];
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
    if (lane == 0) out[m * N + n] = s;
  }
}

// Blocks of every row, dequantized: f32 [N, nb * block_elems]
at::Tensor dequantize_full(const at::Tensor& qweight, int64_t qtype, int64_t in_features) {
  const int64_t N = qweight.size(0), nb = blocks_per_row(qtype, in_features);
  at::Tensor out = at::empty({N, nb * block_elems(qtype)}, qweight.options().dtype(at::kFloat));
  const int64_t total = N * nb;
  if (total > 0) {
    const int threads = 128;
    dequantize_kernel<<<(total + threads - 1) / threads, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        qweight.data_ptr<uint8_t>(), out.data_ptr<float>(), qtype, N, nb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// qweight: uint8 [N, row_bytes] -> [N, in_features] in dtype
at::Tensor dequantize_cuda(const at::Tensor& qweight_in, int64_t qtype, int64_t in_features, at::ScalarType dtype) {
  check_qweight(qweight_in, qtype, in_features);
  const c10::cuda::CUDAGuard guard(qweight_in.device());
  const at::Tensor qweight = qweight_in.dim() == 3 ? deinterleave_rows(qweight_in, qtype) : qweight_in;
  return dequantize_full(qweight, qtype, in_features).narrow(1, 0, in_features).to(dtype).contiguous();
}

// weight: float [N, K] -> uint8 [N, row_bytes(qtype, K)]
at::Tensor quantize_cuda(const at::Tensor& weight, int64_t qtype) {
  check_quantize(weight, qtype);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t N = weight.size(0), K = weight.size(1), nb = blocks_per_row(qtype, K);
  const at::Tensor padded = at::constant_pad_nd(weight.to(at::kFloat), {0, nb * 32 - K}).contiguous();
  at::Tensor out = at::empty({N, row_bytes(qtype, K)}, weight.options().dtype(at::kByte));
  const int64_t total = N * nb;
  if (total > 0) {
    const int threads = 128;
    quantize_kernel<<<(total + threads - 1) / threads, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        padded.data_ptr<float>(), out.data_ptr<uint8_t>(), qtype, N, nb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

template <int M>
void launch_gemv(const at::Tensor& x, const at::Tensor& q, at::Tensor& out, int64_t qtype, int64_t nb) {
  const int64_t N = q.size(0);
  const int warps = 4;
  quant_gemv_kernel<M><<<(N + warps - 1) / warps, warps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), q.data_ptr<uint8_t>(), out.data_ptr<float>(), qtype, N, nb, x.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x: [M, K]; qweight: uint8 [N, row_bytes(qtype, K)]; bias: [N] or None -> [M, N] in x's dtype
at::Tensor quant_linear_cuda(const at::Tensor& x, const at::Tensor& qweight_in, int64_t qtype,
                             const std::optional<at::Tensor>& bias) {
  check_quant_linear(x, qweight_in, qtype, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor qweight = qweight_in.dim() == 3 ? deinterleave_rows(qweight_in, qtype) : qweight_in;
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), nb = blocks_per_row(qtype, K);
  at::Tensor out;
  if (M <= kMaxGemvRows) {
    // The GEMV is instantiated for 1, 2, 4 and 8 rows; x is padded with zero rows up to the next one.
    const int64_t rows = M <= 2 ? M : M <= 4 ? 4 : 8;
    const at::Tensor xp =
        at::constant_pad_nd(x.to(at::kFloat), {0, nb * block_elems(qtype) - K, 0, rows - M}).contiguous();
    out = at::empty({rows, N}, x.options().dtype(at::kFloat));
    if (M > 0 && N > 0) {
      switch (rows) {
        case 1: launch_gemv<1>(xp, qweight, out, qtype, nb); break;
        case 2: launch_gemv<2>(xp, qweight, out, qtype, nb); break;
        case 4: launch_gemv<4>(xp, qweight, out, qtype, nb); break;
        default: launch_gemv<8>(xp, qweight, out, qtype, nb); break;
      }
    }
    out = out.narrow(0, 0, M);
  } else {
    const at::Tensor w = dequantize_full(qweight, qtype, K).narrow(1, 0, K).to(x.scalar_type());
    out = at::matmul(x, w.t()).to(at::kFloat);
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_inference, CUDA, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("quant_linear", &quant_linear_cuda);
}

}  // namespace fast_inference::cuda
