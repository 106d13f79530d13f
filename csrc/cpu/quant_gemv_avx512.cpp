// The quantized GEMV compiled for AVX-512 (its int8 dot on AVX512-VNNI).
#define FI_QUANT_ISA avx512
#include "cpu/quant_gemv_kernel.h"
