// The quantized GEMV and tile dequantization compiled for AVX2 + FMA (Haswell, Zen 1 and later).
#define FI_QUANT_ISA avx2
#include "cpu/quant_gemv_kernel.h"
