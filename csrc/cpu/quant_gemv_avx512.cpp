// The quantized GEMV and tile dequantization compiled for AVX-512 (512-bit vectors, AVX512-VNNI dpbusd).
// GCC 12 flags the _mm512_undefined_* placeholders inside its own cvtepi8/permutexvar/insert intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FI_QUANT_ISA avx512
#define FI_QUANT_WIDE 1
#include "cpu/quant_gemv_kernel.h"
