// The quantized GEMVs (plain rows, interleaved tiles) and slab dequantization for AVX2 + FMA (Haswell, Zen 1 on).
#define FI_QUANT_ISA avx2
#include "cpu/quant_gemv_kernel.h"
#include "cpu/quant_tile_gemv_kernel.h"
