// Per-ISA entry points of the decoder's elementwise kernels (elementwise_kernels.h): each processes a range
// of rows for float32 or bfloat16 and lives in a translation unit compiled with its ISA's flags
// (elementwise_avx2.cpp, elementwise_avx512.cpp). The glue (norm.cpp, fused_elementwise.cpp) validates,
// allocates, splits the rows across threads and picks the ISA.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fast_inference::cpu {
namespace avx2 {
// x [rows, H] (row stride x_stride); residual [rows, H] contiguous or null; weight [H]; out [rows, H] contiguous
void rms_norm_rows(c10::ScalarType dtype, const void* x, int64_t x_stride, void* residual, const void* weight,
                   void* out, int64_t H, float eps, int64_t r0, int64_t r1);
// x [rows, 2 * I] (row stride x_stride) -> out [rows, I] contiguous
void silu_and_mul_rows(c10::ScalarType dtype, const void* x, int64_t x_stride, void* out, int64_t I, int64_t r0,
                       int64_t r1);
// head rows [i0, i1) of x [T, H, D] (strides st, sh; unit along D), rotated in place; cos, sin [T, D]
void rope_rows(c10::ScalarType dtype, void* x, int64_t st, int64_t sh, const void* cos, const void* sin, int64_t H,
               int64_t D, int64_t i0, int64_t i1);
}  // namespace avx2
namespace avx512 {  // the same three, AVX-512
void rms_norm_rows(c10::ScalarType dtype, const void* x, int64_t x_stride, void* residual, const void* weight,
                   void* out, int64_t H, float eps, int64_t r0, int64_t r1);
void silu_and_mul_rows(c10::ScalarType dtype, const void* x, int64_t x_stride, void* out, int64_t I, int64_t r0,
                       int64_t r1);
void rope_rows(c10::ScalarType dtype, void* x, int64_t st, int64_t sh, const void* cos, const void* sin, int64_t H,
               int64_t D, int64_t i0, int64_t i1);
}  // namespace avx512
}  // namespace fast_inference::cpu
