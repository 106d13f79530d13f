// fast_inference::quantize / dequantize / quant_linear on CPU: ggml block-format weights used in place.
//
//   quant_linear, M <= 8 (decode): a GEMV that streams each weight row once for all M rows
//     (quant_gemv_kernel.h, compiled for AVX2 and AVX-512): every format (K-quants too) as int8 dot products
//     against activations quantized once per call to 32-value int8 blocks.
//   quant_linear, M > 8 (prefill, big batches): slabs of weight rows dequantized to f32 by the same kernels'
//     vectorized decoders into a per-thread buffer that stays in cache, multiplied by torch's f32 GEMM, so the
//     weight is read once and the math runs at GEMM speed (bf16 activations: bf16 slabs and oneDNN's bf16 GEMM
//     on AVX-512 BF16 CPUs, f32 elsewhere).
//   Interleaved weights (every format in tiles of 16 rows, quant_formats.h; what the engine keeps on CPU):
//     M <= 8 by the tile GEMV (quant_tile_gemv_kernel.h), reading f32 or bf16 activations and writing the
//     output dtype directly; larger M by the slab path, which dequantizes each slab of tiles straight into W^T
//     (K-quant tiles: regrouped into plain rows first, then the plain-row decoders).
//     On AMX (bf16 activations, K % 32 == 0) the slab path's GEMM is ours: each slab of 32 rows is dequantized
//     to bf16, put in VNNI tiles and multiplied on the tile unit straight into the output (linear_amx.cpp).
//   No AVX2: every path goes through the dequantized slabs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "checks/quant_checks.h"
#include "cpu/cpu_features.h"
#include "quant_formats.h"
#include "quant_interleave.h"

namespace fast_inference::cpu {

#define FI_DECLARE_QUANT_GEMV(ns)                                                                              \
  namespace ns {                                                                                               \
  void quantize_activations(const float* x, int64_t x_stride, int64_t M, int64_t K, int64_t Kp, int8_t* q,    \
                            float* scale, float* zsum);                                                        \
  void gemv_rows_q8(int64_t qtype, const int8_t* xq, const float* xscale, const float* xzsum, int64_t Kp,      \
                    int64_t M, const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t n0, int64_t n1,        \
                    float* out, int64_t N);                                                                    \
  void dequantize_rows(int64_t qtype, const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t r0, int64_t r1, \
                       float* dst, int64_t width);                                                             \
  void dequantize_rows_bf16(int64_t qtype, const uint8_t* w, int64_t row_bytes, int64_t nb, int64_t r0,         \
                            int64_t r1, uint16_t* dst, int64_t width);                                         \
  void dequantize_tiles_t(int64_t qtype, const uint8_t* w, int64_t nb, int64_t n0, int64_t n1, void* dst,      \
                          bool dst_bf16, int64_t ld);                                                          \
  int64_t tile_unit_rows();                                                                                    \
  void quantize_activations_for_tiles(const void* x, bool x_bf16, int64_t x_stride, int64_t M, int64_t K,       \
                                      int64_t nb, int8_t* q, float* d, float* s, float* h);                    \
  void tile_gemv(int64_t qtype, const int8_t* xq, const float* xd, const float* xs, const float* xh, int64_t nb, \
                 int64_t M, const uint8_t* w, int64_t u0, int64_t u1, void* out, bool out_bf16, int64_t N);     \
  }
FI_DECLARE_QUANT_GEMV(avx2)
FI_DECLARE_QUANT_GEMV(avx512)
#undef FI_DECLARE_QUANT_GEMV

namespace amx {  // linear_amx.cpp
void vnni_tiles_from_transposed(const uint16_t* wt, int64_t ld, int64_t K, int64_t cols, uint16_t* tiles);
void linear_bf16_tile_columns(const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* tiles,
                              const c10::BFloat16* bias, c10::BFloat16* out, int64_t M, int64_t N, int64_t K,
                              int64_t j0, int64_t j1);
}  // namespace amx

namespace {

using namespace fast_inference::quant;

constexpr int64_t kMaxGemvRows = 8;
// Rows handed to one thread at a time by the GEMV: enough to amortise the scheduling, small enough to balance.
constexpr int64_t kGemvGrain = 16;
// A dequantized f32 weight slab of about this size stays in L2 while the GEMM walks it.
constexpr int64_t kSlabBytes = 256 * 1024;
// From this many activation rows the bf16 slab GEMM beats the f32 one (2 threads, SmolLM2 Q4_1 projections, slabs
// dequantized straight to bf16: 0.96x at M = 16, 1.1x at 32, 1.4x at 64, 1.6x at 128).
constexpr int64_t kBf16GemmMinRows = 32;

// Rows [r0, r1) of qweight -> f32 rows of width nb * block_elems at dst (row stride `width`).
void dequantize_rows(int64_t qtype, const uint8_t* qweight, int64_t rbytes, int64_t r0, int64_t r1, float* dst,
                     int64_t width) {
  const int64_t nb = rbytes / block_bytes(qtype), belems = block_elems(qtype), bbytes = block_bytes(qtype);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; ++b)
      dequantize_block(qtype, qweight + r * rbytes + b * bbytes, dst + (r - r0) * width + b * belems);
}

// Rows [r0, r1) of a plain qweight -> f32 rows at dst by the ISA's vectorized decoders (portable: per block).
void dequantize_rows_isa(Isa isa, int64_t qtype, const uint8_t* qweight, int64_t rbytes, int64_t r0, int64_t r1,
                         float* dst, int64_t width) {
  if (isa == Isa::kPortable) return dequantize_rows(qtype, qweight, rbytes, r0, r1, dst, width);
  (isa == Isa::kAvx512 ? avx512::dequantize_rows : avx2::dequantize_rows)(qtype, qweight, rbytes,
                                                                          rbytes / block_bytes(qtype), r0, r1, dst,
                                                                          width);
}

void regroup_plain(int64_t qtype, const uint8_t* w, int64_t nb, int64_t r0, int64_t r1, uint8_t* dst);

// qweight: uint8 [N, row_bytes] or interleaved; returns [N, in_features] in `dtype`. Interleaved tiles are
// regrouped a chunk of whole tiles at a time (an embedding lookup dequantizes the one tile holding its row).
at::Tensor dequantize_cpu(const at::Tensor& qweight, int64_t qtype, int64_t in_features, at::ScalarType dtype) {
  check_qweight(qweight, qtype, in_features);
  const bool interleaved = qweight.dim() == 3;
  const int64_t N = qweight_rows(qweight), nb = blocks_per_row(qtype, in_features);
  const int64_t width = nb * block_elems(qtype), rbytes = nb * block_bytes(qtype);
  const int64_t unit = interleaved ? kTileRows : 1;  // rows handed out together
  at::Tensor full = at::empty({N, width}, qweight.options().dtype(at::kFloat));
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  float* out = full.data_ptr<float>();
  const Isa isa = selected_isa();
  at::parallel_for(0, N / unit, std::max<int64_t>(1, 64 / unit), [&](int64_t u0, int64_t u1) {
    const int64_t r0 = u0 * unit, r1 = u1 * unit;
    if (!interleaved) return dequantize_rows_isa(isa, qtype, q, rbytes, r0, r1, out + r0 * width, width);
    std::vector<uint8_t> plain(kTileRows * rbytes);
    for (int64_t r = r0; r < r1; r += kTileRows) {
      regroup_plain(qtype, q, nb, r, r + kTileRows, plain.data());
      dequantize_rows_isa(isa, qtype, plain.data(), rbytes, 0, kTileRows, out + r * width, width);
    }
  });
  at::Tensor values = full.narrow(1, 0, in_features);
  return dtype == at::kFloat && width == in_features ? full : values.to(dtype).contiguous();
}

// weight: float [N, K]; returns uint8 [N, row_bytes(qtype, K)], K zero-padded to whole blocks
at::Tensor quantize_cpu(const at::Tensor& weight, int64_t qtype) {
  check_quantize(weight, qtype);
  const int64_t N = weight.size(0), K = weight.size(1), nb = blocks_per_row(qtype, K);
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({N, row_bytes(qtype, K)}, weight.options().dtype(at::kByte));
  const float* src = w.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t bbytes = block_bytes(qtype);
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    float block[32];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t j = 0; j < 32; ++j) block[j] = b * 32 + j < K ? src[r * K + b * 32 + j] : 0.f;
        quantize_block(qtype, block, dst + r * out.size(1) + b * bbytes);
      }
    }
  });
  return out;
}

// Rows [r0, r1) (whole tiles) of an interleaved weight -> plain rows of nb blocks at dst.
void regroup_plain(int64_t qtype, const uint8_t* w, int64_t nb, int64_t r0, int64_t r1, uint8_t* dst) {
  const int64_t bbytes = block_bytes(qtype), header = 2 * header_fields(qtype), tile = kTileRows * bbytes;
  const int64_t words = (bbytes - header) / 4, hoff = header_offset(qtype), woff = words_offset(qtype);
  for (int64_t g = r0 / kTileRows; g < r1 / kTileRows; ++g) {
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* t = w + (g * nb + b) * tile;
      for (int64_t r = 0; r < kTileRows; ++r) {
        uint8_t* blk = dst + ((g * kTileRows + r - r0) * nb + b) * bbytes;
        for (int64_t f = 0; f < header / 2; ++f) std::memcpy(blk + hoff + 2 * f, t + f * 2 * kTileRows + 2 * r, 2);
        for (int64_t j = 0; j < words; ++j)
          std::memcpy(blk + woff + 4 * j, t + header * kTileRows + j * 4 * kTileRows + 4 * r, 4);
      }
    }
  }
}

// x: f32 [M, K] contiguous -> out f32 [M, N] through the GEMV of `isa`: x quantized once (shared by every
// thread), then rows of the weight split across threads, each row streamed once for all M activation rows.
void quant_gemv(Isa isa, const at::Tensor& x, const at::Tensor& qweight, int64_t qtype, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), rbytes = qweight.size(1);
  const int64_t nb = blocks_per_row(qtype, K), Kp = (K + 255) / 256 * 256;
  const float* xp = x.data_ptr<float>();
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  std::vector<int8_t> xq(M * Kp);
  std::vector<float> xscale(M * Kp / 4), xzsum(M * Kp / 4);
  const bool wide = isa == Isa::kAvx512;
  (wide ? avx512::quantize_activations : avx2::quantize_activations)(xp, K, M, K, Kp, xq.data(), xscale.data(),
                                                                      xzsum.data());
  auto gemv = wide ? avx512::gemv_rows_q8 : avx2::gemv_rows_q8;
  // Grain: at least kGemvGrain rows and ~64 KiB of weight per task, so small projections stay on few threads.
  const int64_t grain = std::max<int64_t>(kGemvGrain, (64 << 10) / std::max<int64_t>(rbytes, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    gemv(qtype, xq.data(), xscale.data(), xzsum.data(), Kp, M, w, rbytes, nb, n0, n1, o, N);
  });
}

// x: [M, K] f32 or bf16 with unit stride along K, M <= 8; qweight interleaved [N / 16, nb, 16 * block_bytes]
// -> out [M, N] in x's dtype: activations quantized once, then units of rows split across threads.
void quant_tile_gemv(Isa isa, const at::Tensor& x, const at::Tensor& qweight, int64_t qtype, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = qweight_rows(qweight), blocks = qweight.size(1);
  const int64_t nb = blocks * block_elems(qtype) / 32;  // 32-value activation blocks per row
  const bool wide = isa == Isa::kAvx512, bf16 = x.scalar_type() == at::kBFloat16;
  std::vector<int8_t> xq(M * nb * 32);
  std::vector<float> xd(M * nb), xs(M * nb), xh(M * nb);
  (wide ? avx512::quantize_activations_for_tiles : avx2::quantize_activations_for_tiles)(
      x.data_ptr(), bf16, x.stride(0), M, K, nb, xq.data(), xd.data(), xs.data(), xh.data());
  auto gemv = wide ? avx512::tile_gemv : avx2::tile_gemv;
  const int64_t unit_rows = wide ? avx512::tile_unit_rows() : avx2::tile_unit_rows();
  const int64_t units = N / unit_rows, unit_bytes = unit_rows * qweight.size(2) / kTileRows * blocks;
  // Grain: ~64 KiB of weight per task, so small projections stay on few threads.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(unit_bytes, 1));
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  void* o = out.data_ptr();
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    gemv(qtype, xq.data(), xd.data(), xs.data(), xh.data(), nb, M, w, u0, u1, o, bf16, N);
  });
}

// x: [M, K] contiguous, f32 or bf16 (the GEMM's dtype) -> out [M, N] in x's dtype: dequantized slabs of rows
// times x by torch's GEMM. bf16 x (only on the AVX-512 BF16 path) multiplies bf16 slabs, dequantized straight
// into bf16: oneDNN's bf16 GEMM (AMX / AVX512-BF16) runs several times f32's rate, which is what prefill of a
// quantized model is bound by. An interleaved qweight is dequantized a slab of whole tiles at a time straight
// into W^T (the tiles' own order).
void quant_gemm_slabs(Isa isa, const at::Tensor& x, const at::Tensor& qweight, int64_t qtype, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = qweight_rows(qweight);
  const bool interleaved = qweight.dim() == 3;
  const int64_t rbytes = row_bytes(qtype, K), nb = blocks_per_row(qtype, K);
  const int64_t width = nb * block_elems(qtype);
  const int64_t threads = at::get_num_threads();
  int64_t slab = std::max<int64_t>(kSlabBytes / (4 * width), M);
  slab = std::min<int64_t>({slab, 1024, (N + threads - 1) / threads});
  slab = std::max<int64_t>(16, (slab + 15) / 16 * 16);
  const int64_t num_slabs = (N + slab - 1) / slab;
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t out_bytes = out.element_size();
  char* o = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, num_slabs, 1, [&](int64_t s0, int64_t s1) {
    // Per thread: the slab's weight (f32 or bf16) and its product, both cache-sized. Interleaved tiles are
    // dequantized transposed ([width, slab]: the tiles' natural order), plain rows as rows ([slab, width]).
    const at::TensorOptions opts = at::TensorOptions().dtype(x.scalar_type());
    const bool transposed = interleaved && isa != Isa::kPortable && block_elems(qtype) == 32;
    at::Tensor w_slab = transposed ? at::empty({width, slab}, opts) : at::empty({slab, width}, opts);
    std::vector<uint8_t> plain(interleaved && !transposed ? slab * rbytes : 0);
    at::Tensor y_slab = at::empty({M, slab}, opts);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t n0 = s * slab, rows = std::min(slab, N - n0);
      at::Tensor wt;  // W^T of the slab's rows: [K, rows]
      const uint8_t* src = w;
      int64_t r0 = n0;
      if (interleaved && !transposed) {  // no vector decoder: tiles regrouped into plain rows first
        regroup_plain(qtype, w, nb, n0, n0 + rows, plain.data());
        src = plain.data();
        r0 = 0;
      }
      if (transposed) {
        (isa == Isa::kAvx512 ? avx512::dequantize_tiles_t : avx2::dequantize_tiles_t)(
            qtype, w, nb, n0, n0 + rows, w_slab.data_ptr(), bf16, slab);
        wt = w_slab.narrow(0, 0, K).narrow(1, 0, rows);
      } else if (bf16) {
        (isa == Isa::kAvx512 ? avx512::dequantize_rows_bf16 : avx2::dequantize_rows_bf16)(
            qtype, src, rbytes, nb, r0, r0 + rows, static_cast<uint16_t*>(w_slab.data_ptr()), width);
        wt = w_slab.narrow(0, 0, rows).narrow(1, 0, K).t();
      } else {
        dequantize_rows_isa(isa, qtype, src, rbytes, r0, r0 + rows, w_slab.data_ptr<float>(), width);
        wt = w_slab.narrow(0, 0, rows).narrow(1, 0, K).t();
      }
      // Inside a parallel region the GEMM runs on this thread alone.
      at::Tensor y = y_slab.narrow(1, 0, rows);
      at::mm_out(y, x, wt);
      const char* ys = static_cast<const char*>(y_slab.data_ptr());
      for (int64_t m = 0; m < M; ++m)
        std::memcpy(o + (m * N + n0) * out_bytes, ys + m * slab * out_bytes, rows * out_bytes);
    }
  });
}

// x: [M, K] bf16 contiguous, K % 32 == 0; qweight interleaved [N / 16, nb, 16 * block_bytes] -> out [M, N] bf16.
// The slab path on AMX: per slab of 32 weight rows, W^T dequantized to bf16 by the tile decoders (L1-sized),
// regrouped into VNNI tiles and multiplied on the tile unit, written straight into out (no per-slab GEMM call,
// no copy of the product; oneDNN repacked each slab it was handed).
void quant_gemm_amx(const at::Tensor& x, const at::Tensor& qweight, int64_t qtype, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = qweight_rows(qweight);
  const int64_t nb = blocks_per_row(qtype, K);
  constexpr int64_t kSlabRows = 32;
  const int64_t num_slabs = (N + kSlabRows - 1) / kSlabRows;
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const auto* xp = reinterpret_cast<const c10::BFloat16*>(x.data_ptr());
  auto* o = reinterpret_cast<c10::BFloat16*>(out.data_ptr());
  at::parallel_for(0, num_slabs, 1, [&](int64_t s0, int64_t s1) {
    std::vector<uint16_t> wt(K * kSlabRows), tiles(K * kSlabRows);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t n0 = s * kSlabRows, rows = std::min(kSlabRows, N - n0);  // rows: 16 or 32
      avx512::dequantize_tiles_t(qtype, w, nb, n0, n0 + rows, wt.data(), true, kSlabRows);
      amx::vnni_tiles_from_transposed(wt.data(), kSlabRows, K, rows, tiles.data());
      amx::linear_bf16_tile_columns(xp, K, reinterpret_cast<const c10::BFloat16*>(tiles.data()), nullptr, o, M, N,
                                    K, n0 / 16, (n0 + rows) / 16);
    }
  });
}

// x: [M, K]; qweight: uint8 [N, row_bytes(qtype, K)] or interleaved; bias: [N] or None -> [M, N] in x's dtype
at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, int64_t qtype,
                            const std::optional<at::Tensor>& bias) {
  check_quant_linear(x, qweight, qtype, bias);
  const int64_t M = x.size(0), N = qweight_rows(qweight);
  const Isa isa = selected_isa();
  const bool direct_dtype = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  // Prefill stays on the exact dequantized slabs above 8 rows: int8 activations there broke the real SmolLM2's
  // answer (the first token's outlier activations, quantized in 32-value blocks, corrupt the attention-sink
  // K/V that every later token reads), while tile-GEMV prefill measured 4-7x faster at M = 16-32.
  if (qweight.dim() == 3 && M > 0 && M <= kMaxGemvRows && isa != Isa::kPortable && direct_dtype) {
    at::Tensor out = at::empty({M, N}, x.options());
    quant_tile_gemv(isa, x.stride(1) == 1 ? x : x.contiguous(), qweight, qtype, out);
    if (bias.has_value()) out.add_(*bias);
    return out;
  }
  if (qweight.dim() == 3 && M > kMaxGemvRows && x.scalar_type() == at::kBFloat16 && x.size(1) % 32 == 0 &&
      block_elems(qtype) == 32 && amx_selected()) {
    at::Tensor out = at::empty({M, N}, x.options());
    quant_gemm_amx(x.contiguous(), qweight, qtype, out);
    if (bias.has_value()) out.add_(*bias);
    return out;
  }
  // bf16 activations keep a bf16 GEMM where the CPU has one natively and M is large enough for oneDNN's per-slab
  // call to pay off (the output then comes out in bf16); everything else multiplies in f32.
  const bool bf16_gemm = x.scalar_type() == at::kBFloat16 && isa == Isa::kAvx512 && M >= kBf16GemmMinRows;
  at::Tensor out = at::empty({M, N}, x.options().dtype(bf16_gemm ? at::kBFloat16 : at::kFloat));
  if (M > 0) {
    if (M <= kMaxGemvRows && isa != Isa::kPortable && qweight.dim() == 2) {
      quant_gemv(isa, x.to(at::kFloat).contiguous(), qweight, qtype, out);
    } else {
      quant_gemm_slabs(isa, x.to(out.scalar_type()).contiguous(), qweight, qtype, out);
    }
  }
  if (bias.has_value()) out.add_(bias->to(out.scalar_type()));
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_inference, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("quant_linear", &quant_linear_cpu);
}

}  // namespace fast_inference::cpu
