// The quantized GEMVs (plain rows, interleaved tiles) and slab dequantization for AVX-512 (VNNI dpbusd).
// GCC 12 flags the _mm512_undefined_* placeholders inside its own cvtepi8/permutexvar/insert intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FI_QUANT_ISA avx512
#define FI_QUANT_WIDE 1
#include "cpu/quant_gemv_kernel.h"
#include "cpu/quant_tile_gemv_kernel.h"
