// AVX2 paged attention: every dtype widened to f32 in registers, 8-wide FMAs (see paged_attention_fma_ops.h).
#include "cpu/vec_avx2.h"

#define FI_CPU_ISA avx2
#include "cpu/paged_attention_kernel.h"
#include "cpu/paged_attention_fma_ops.h"

namespace fast_inference::cpu {

void paged_attention_avx2(const PagedAttentionArgs& args, c10::ScalarType dtype) {
  avx2::paged_attention_dispatch<avx2::FmaOpsFor<avx2::Vec256>::Ops>(args, dtype);
}

}  // namespace fast_inference::cpu
