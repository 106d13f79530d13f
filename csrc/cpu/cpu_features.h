// The one run-time instruction-set pick of every CPU kernel: what this CPU runs, lowered by FI_CPU_ISA.
//
// Vectorized kernels are compiled once per ISA (*_avx2.cpp, *_avx512.cpp get their flags in CMakeLists.txt)
// and a kernel's glue switches on selected_isa(). FI_CPU_ISA=portable|avx2|avx512 asks for a lower path
// (read at every call, so one process can test and benchmark every path); asking for more than the CPU has
// gives the best it has. AMX (the bf16 tile unit of Sapphire Rapids and later) is one more step above
// kAvx512 for the kernels that have an AMX path: amx_selected(), off under any FI_CPU_ISA but "amx".
#pragma once

#include <cpuid.h>

#include <cstdlib>
#include <cstring>

namespace fast_inference::cpu {

enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// kAvx2: AVX2 + FMA + F16C (Haswell, Zen 1 and later).
// kAvx512: F + BW + VL + DQ + BF16 + VNNI (Zen 4, Sapphire Rapids and later); older AVX-512 CPUs take kAvx2.
inline Isa best_isa() {
  static const Isa best = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
    return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kPortable;
  }();
  return best;
}

inline Isa selected_isa() {
  const Isa best = best_isa();
  const char* want = std::getenv("FI_CPU_ISA");
  if (want == nullptr) return best;
  Isa asked = best;
  if (std::strcmp(want, "portable") == 0) asked = Isa::kPortable;
  else if (std::strcmp(want, "avx2") == 0) asked = Isa::kAvx2;
  return asked < best ? asked : best;
}

// Defined in linear_amx.cpp: asks Linux for the AMX tile state (once per process); false when refused.
namespace amx {
bool tiles_permitted();
}

// The CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22) and the OS lets us use them.
inline bool amx_available() {
  static const bool available = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;
    return tile && bf16 && best_isa() == Isa::kAvx512 && amx::tiles_permitted();
  }();
  return available;
}

inline bool amx_selected() {
  const char* want = std::getenv("FI_CPU_ISA");
  return amx_available() && (want == nullptr || std::strcmp(want, "amx") == 0);
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

}  // namespace fast_inference::cpu
