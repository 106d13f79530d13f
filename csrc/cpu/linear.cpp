// fast_inference::linear on CPU: y = x W^T (+ b), with our own kernels for bf16 weights on every x86 CPU.
//
//   bf16, M <= 8 (decode): a GEMV that reads each weight row once for all M rows and widens bf16 in
//     registers: AVX512_BF16 dot products (linear_avx512.cpp) or AVX2 + FMA (linear_avx2.cpp).
//   bf16, M > 8 on a CPU without AVX512_BF16: a blocked GEMM. Slabs of weight rows are widened to f32 into
//     a per-thread buffer that stays in cache and multiplied by torch's f32 GEMM (MKL / oneDNN sgemm), so
//     the bf16 weight is read from memory once and the math runs at f32 GEMM speed. torch's own bf16 GEMM
//     on such a CPU has no fast path (about 3x slower than f32 on Zen 1).
//   bf16, M > 8 with AVX512_BF16: at::linear (oneDNN's native bf16 GEMM).
//   f32, M <= 8 with AVX2: the same GEMV (f32 weight rows streamed at bandwidth); f32 otherwise: at::linear.
//   bf16 weight in VNNI tiles [N / 16, K / 32, 512] (ops.vnni_tiles), the engine's layout on every x86
//     CPU with AVX2: AMX (linear_amx.cpp), else AVX512_BF16 register tiles (linear_tiles_avx512.cpp), else
//     AVX2 FMA register tiles up to kMaxAvx2TileRows rows (linear_tiles_avx2.cpp) and widened slabs +
//     sgemm above; the portable build puts the tiles back in row order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu/cpu_features.h"

namespace fast_inference::cpu {
namespace avx512 {
void linear_bf16_small_m(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* w,
                         const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K);
void linear_bf16_vnni_tiles(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* tiles,
                            const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K);
}
namespace amx {
void linear_bf16_tiles(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* w, const c10::BFloat16* bias,
                       c10::BFloat16* out, int64_t M, int64_t N, int64_t K);
}
namespace avx2 {
void linear_bf16_small_m(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* w,
                         const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K);
void linear_f32_small_m(const float* x, int64_t x_stride, const float* w, const float* bias, float* out, int64_t M,
                        int64_t N, int64_t K);
void widen_bf16_rows(const c10::BFloat16* src, int64_t src_stride, float* dst, int64_t rows, int64_t K);
void linear_bf16_vnni_tiles(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* tiles,
                            const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K);
void widen_tiles_k_major(const c10::BFloat16* tiles, int64_t j0, int64_t blocks, int64_t K, float* dst);
}  // namespace avx2

namespace {

constexpr int64_t kMaxGemvRows = 8;
// AVX2 on VNNI tiles: up to this many rows the FMA register tiles (1.1-1.9x the widened row slabs +
// sgemm at M = 4..128 on SmolLM2's shapes), above it the widened slabs + sgemm (0.9x-1.0x the tiles there);
// measured on an AMD EPYC Zen 4 with the kernels and torch lowered to AVX2.
constexpr int64_t kMaxAvx2TileRows = 128;
// A widened weight slab of about this size stays in L2 while the GEMM walks it (Zen 1 has 512 KiB).
constexpr int64_t kSlabBytes = 256 * 1024;

void widen_bf16_rows_portable(const c10::BFloat16* src, int64_t src_stride, float* dst, int64_t rows, int64_t K) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) dst[r * K + k] = static_cast<float>(src[r * src_stride + k]);
}

// x: [M, K] bf16; weight: [N, K] bf16 contiguous, or VNNI tiles [N / 16, K / 32, 512] (AVX2 and up);
// bias: [N] or None -> [M, N] bf16 (f32 accumulation).
at::Tensor linear_bf16_blocked(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               Isa isa) {
  const bool tiled = weight.dim() == 3;
  const int64_t M = x.size(0), N = tiled ? weight.size(0) * 16 : weight.size(0), K = x.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());
  // Slab rows: a cache-sized slab, but at least M columns so the GEMM's packing of x (M x K per call) is
  // amortised over as many weight rows as x has rows, and no more than an even share per thread.
  const int64_t threads = at::get_num_threads();
  int64_t slab = std::max<int64_t>(kSlabBytes / (4 * K), M);
  slab = std::min<int64_t>({slab, 1024, (N + threads - 1) / threads});
  slab = std::max<int64_t>(16, (slab + 15) / 16 * 16);
  const int64_t num_slabs = (N + slab - 1) / slab;
  const auto* w = reinterpret_cast<const c10::BFloat16*>(weight.data_ptr());
  auto* o = reinterpret_cast<c10::BFloat16*>(out.data_ptr());
  const float* b = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  at::parallel_for(0, num_slabs, 1, [&](int64_t s0, int64_t s1) {
    std::vector<float> w_slab(slab * K), y_slab(M * slab);
    const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t n0 = s * slab, nb = std::min(slab, N - n0);
      at::Tensor y = at::from_blob(y_slab.data(), {M, nb}, f32);
      // Inside a parallel region the GEMM runs on this thread alone.
      if (tiled) {  // slab and N are multiples of 16: whole column blocks, widened k-major [K, nb]
        avx2::widen_tiles_k_major(w, n0 / 16, nb / 16, K, w_slab.data());
        at::mm_out(y, xf, at::from_blob(w_slab.data(), {K, nb}, f32));
      } else {
        if (isa == Isa::kPortable) {
          widen_bf16_rows_portable(w + n0 * K, K, w_slab.data(), nb, K);
        } else {
          avx2::widen_bf16_rows(w + n0 * K, K, w_slab.data(), nb, K);
        }
        at::mm_out(y, xf, at::from_blob(w_slab.data(), {nb, K}, f32).t());
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* ym = y_slab.data() + m * nb;
        c10::BFloat16* om = o + m * N + n0;
        for (int64_t j = 0; j < nb; ++j) om[j] = c10::BFloat16(ym[j] + (b != nullptr ? b[n0 + j] : 0.f));
      }
    }
  });
  return out;
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// VNNI tiles [N / 16, K / 32, 512] -> the same weight as rows [N, K].
at::Tensor untile(const at::Tensor& tiles) {
  const int64_t blocks = tiles.size(0), k_tiles = tiles.size(1);
  return tiles.view({blocks, k_tiles, 16, 16, 2}).permute({0, 3, 1, 2, 4}).reshape({blocks * 16, k_tiles * 32});
}

// x: [M, K] bf16; tiles: [N / 16, K / 32, 512] bf16; bias: [N] or None -> [M, N]
at::Tensor linear_tiles(const at::Tensor& x, const at::Tensor& tiles, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(tiles.size(2) == 512 && tiles.scalar_type() == at::kBFloat16 && tiles.is_contiguous(),
              "a 3-D weight must be contiguous bf16 VNNI tiles [N / 16, K / 32, 512], got ", tiles.scalar_type(), " ",
              tiles.sizes());
  const int64_t N = tiles.size(0) * 16, K = tiles.size(1) * 32;
  const Isa isa = selected_isa();
  const bool amx = amx_selected();
  if (!(isa != Isa::kPortable && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1 && x.size(1) == K &&
        (!bias.has_value() || bias->is_contiguous()) && x.size(0) > 0)) {
    return linear_cpu(x, untile(tiles), bias);  // argument checks, and every path but the tile kernels
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [N=", N, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias dtype ", bias->scalar_type(),
                " must equal x dtype ", x.scalar_type());
  }
  const int64_t M = x.size(0);
  if (isa == Isa::kAvx2 && M > kMaxAvx2TileRows) return linear_bf16_blocked(x, tiles, bias, isa);
  at::Tensor out = at::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const c10::BFloat16*>(x.data_ptr());
  const auto* tp = reinterpret_cast<const c10::BFloat16*>(tiles.data_ptr());
  const auto* bp = bias.has_value() ? reinterpret_cast<const c10::BFloat16*>(bias->data_ptr()) : nullptr;
  auto* op = reinterpret_cast<c10::BFloat16*>(out.data_ptr());
  if (amx) {
    amx::linear_bf16_tiles(xp, x.stride(0), tp, bp, op, M, N, K);
  } else if (isa == Isa::kAvx512) {
    avx512::linear_bf16_vnni_tiles(xp, x.stride(0), tp, bp, op, M, N, K);
  } else {
    avx2::linear_bf16_vnni_tiles(xp, x.stride(0), tp, bp, op, M, N, K);
  }
  return out;
}

// x: [M, K]; weight: [N, K] (or bf16 VNNI tiles [N / 16, K / 32, 512]); bias: [N] or None -> [M, N]
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [M, K], got ", x.dim(), "-D");
  if (weight.dim() == 3) return linear_tiles(x, weight, bias);
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [N, K] or VNNI tiles [N / 16, K / 32, 512], got ",
              weight.dim(), "-D");
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
  const bool own_layout = weight.is_contiguous() && x.stride(1) == 1 && (!bias.has_value() || bias->is_contiguous());
  if (!own_layout || M == 0 || N == 0 || K == 0) return at::linear(x, weight, bias);
  const Isa isa = selected_isa();
  const bool gemv = M <= kMaxGemvRows && isa != Isa::kPortable;
  if (x.scalar_type() == at::kBFloat16) {
    if (!gemv) {
      if (isa == Isa::kAvx512) return at::linear(x, weight, bias);
      return linear_bf16_blocked(x, weight, bias, isa);
    }
    at::Tensor out = at::empty({M, N}, x.options());
    const auto* xp = reinterpret_cast<const c10::BFloat16*>(x.data_ptr());
    const auto* wp = reinterpret_cast<const c10::BFloat16*>(weight.data_ptr());
    const auto* bp = bias.has_value() ? reinterpret_cast<const c10::BFloat16*>(bias->data_ptr()) : nullptr;
    auto* op = reinterpret_cast<c10::BFloat16*>(out.data_ptr());
    if (isa == Isa::kAvx512) {
      avx512::linear_bf16_small_m(xp, x.stride(0), wp, bp, op, M, N, K);
    } else {
      avx2::linear_bf16_small_m(xp, x.stride(0), wp, bp, op, M, N, K);
    }
    return out;
  }
  if (x.scalar_type() == at::kFloat && gemv) {
    at::Tensor out = at::empty({M, N}, x.options());
    avx2::linear_f32_small_m(x.data_ptr<float>(), x.stride(0), weight.data_ptr<float>(),
                             bias.has_value() ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), M, N, K);
    return out;
  }
  return at::linear(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_inference, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace fast_inference::cpu
