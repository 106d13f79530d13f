// The decoder's per-row elementwise kernels (RMSNorm with the fused residual add, neox RoPE, SiLU-and-mul),
// written once over a vector type and compiled per ISA (elementwise_avx2.cpp, elementwise_avx512.cpp).
//
// Every rounding point of the torch op chain they replace is kept: Ops::round<T> rounds a f32 vector to T
// (round to nearest even, as c10's conversion) and back, and Ops::store rounds the same way. So bf16 results
// equal the chain's bit for bit, except silu's exp (a polynomial, ~1e-7 relative) and the order of the
// mean-square sum.
//
// Ops provides (V holds W f32 lanes): load<T>(const T*) widened to f32, store<T>(T*, V) rounded to T,
// round<T>(V), exp(V) for arguments <= 0, and the arithmetic add/sub/mul/div/fma/abs/set1/zero/reduce_add
// plus select_nonneg(x, a, b) = x >= 0 ? a : b.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fast_inference::cpu::elementwise {

// Round to T and back: the result of one torch op in dtype T. For f32 the value itself, kept in a register so
// that a * b + c is never contracted into one FMA (each op of the chain rounds its own result).
template <typename T>
inline float round_scalar(float v) {
  if constexpr (std::is_same_v<T, float>) {
    __asm__("" : "+x"(v));
    return v;
  } else {
    return static_cast<float>(T(v));
  }
}

template <typename T>
inline float silu_scalar(float g) {
  return round_scalar<T>(g / (1.0f + std::exp(-g)));
}

// Rows [r0, r1) of x [rows, H] (row stride x_stride) -> out [rows, H] contiguous. With residual (contiguous
// [rows, H]): residual = T(residual + x) first, and the sum is normalised. mean(x^2) and rsqrt in f32,
// T(x * rstd), then T(weight * that): the transformers arithmetic.
template <typename Ops, typename T>
void rms_norm_rows(const T* x, int64_t x_stride, T* residual, const T* weight, T* out, int64_t H, float eps,
                   int64_t r0, int64_t r1) {
  using V = typename Ops::V;
  constexpr int64_t W = Ops::W;
  const int64_t main = H / W * W;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * x_stride;
    const T* src = xr;
    V acc0 = Ops::zero(), acc1 = Ops::zero();
    float tail_ss = 0.0f;
    if (residual != nullptr) {
      T* res = residual + r * H;
      int64_t i = 0;
      for (; i < main; i += W) {
        const V s = Ops::round(Ops::add(Ops::load(res + i), Ops::load(xr + i)), res);
        Ops::store(res + i, s);
        acc0 = Ops::fma(s, s, acc0);
      }
      for (; i < H; ++i) {
        res[i] = T(static_cast<float>(res[i]) + static_cast<float>(xr[i]));
        const float v = static_cast<float>(res[i]);
        tail_ss += v * v;
      }
      src = res;
    } else {
      int64_t i = 0;
      for (; i + 2 * W <= main; i += 2 * W) {  // two chains: the FMA latency, not the loads, would bind
        const V a = Ops::load(src + i), b = Ops::load(src + i + W);
        acc0 = Ops::fma(a, a, acc0);
        acc1 = Ops::fma(b, b, acc1);
      }
      for (; i < main; i += W) {
        const V a = Ops::load(src + i);
        acc0 = Ops::fma(a, a, acc0);
      }
      for (; i < H; ++i) {
        const float v = static_cast<float>(src[i]);
        tail_ss += v * v;
      }
    }
    const float ss = Ops::reduce_add(Ops::add(acc0, acc1)) + tail_ss;
    const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    const V rstd_v = Ops::set1(rstd);
    T* o = out + r * H;
    int64_t i = 0;
    for (; i < main; i += W) {
      const V normed = Ops::round(Ops::mul(Ops::load(src + i), rstd_v), o);
      Ops::store(o + i, Ops::mul(Ops::load(weight + i), normed));
    }
    for (; i < H; ++i) {
      const float normed = round_scalar<T>(static_cast<float>(src[i]) * rstd);
      o[i] = T(static_cast<float>(weight[i]) * normed);
    }
  }
}

// Rows [r0, r1) of x [rows, 2 * I] = [gate | up] (row stride x_stride) -> out [rows, I] contiguous:
// T(T(silu(gate)) * up). silu(g) = g / (1 + exp(-g)), computed as (g >= 0 ? g : g e) / (1 + e) with
// e = exp(-|g|) so that exp only sees arguments <= 0 (no overflow for very negative g).
template <typename Ops, typename T>
void silu_and_mul_rows(const T* x, int64_t x_stride, T* out, int64_t I, int64_t r0, int64_t r1) {
  using V = typename Ops::V;
  constexpr int64_t W = Ops::W;
  const int64_t main = I / W * W;
  const V one = Ops::set1(1.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = x + r * x_stride;
    const T* u = g + I;
    T* o = out + r * I;
    int64_t j = 0;
    for (; j < main; j += W) {
      const V gv = Ops::load(g + j);
      const V e = Ops::exp(Ops::sub(Ops::zero(), Ops::abs(gv)));
      const V silu = Ops::div(Ops::select_nonneg(gv, gv, Ops::mul(gv, e)), Ops::add(one, e));
      Ops::store(o + j, Ops::mul(Ops::round(silu, o), Ops::load(u + j)));
    }
    for (; j < I; ++j) o[j] = T(silu_scalar<T>(static_cast<float>(g[j])) * static_cast<float>(u[j]));
  }
}

// Rotates rows [i0, i1) of the T * H head rows of x [T, H, D] (strides st, sh; unit along D) in place with
// the full-width tables cos [T, D] = [c, c] and sin [T, D] = [-s, s]:
// x = T(T(x * cos) + T(roll(x, D/2) * sin)), as the three torch ops round.
template <typename Ops, typename T>
void rope_rows(T* x, int64_t st, int64_t sh, const T* cos, const T* sin, int64_t H, int64_t D, int64_t i0,
               int64_t i1) {
  using V = typename Ops::V;
  constexpr int64_t W = Ops::W;
  const int64_t half = D / 2;
  const int64_t main = half / W * W;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t t = i / H, h = i % H;
    T* v = x + t * st + h * sh;
    const T* c = cos + t * D;
    const T* s = sin + t * D;
    int64_t j = 0;
    for (; j < main; j += W) {
      const V x1 = Ops::load(v + j), x2 = Ops::load(v + j + half);
      const V lo = Ops::add(Ops::round(Ops::mul(x1, Ops::load(c + j)), v),
                            Ops::round(Ops::mul(x2, Ops::load(s + j)), v));
      const V hi = Ops::add(Ops::round(Ops::mul(x2, Ops::load(c + j + half)), v),
                            Ops::round(Ops::mul(x1, Ops::load(s + j + half)), v));
      Ops::store(v + j, lo);
      Ops::store(v + j + half, hi);
    }
    for (; j < half; ++j) {
      const float x1 = static_cast<float>(v[j]), x2 = static_cast<float>(v[j + half]);
      const float lo = round_scalar<T>(x1 * static_cast<float>(c[j])) + round_scalar<T>(x2 * static_cast<float>(s[j]));
      const float hi = round_scalar<T>(x2 * static_cast<float>(c[j + half])) +
                       round_scalar<T>(x1 * static_cast<float>(s[j + half]));
      v[j] = T(lo);
      v[j + half] = T(hi);
    }
  }
}

// elementwise.h's entry points over one Ops, for float32 and bfloat16 (each ISA file forwards to these).
template <typename Ops, typename Fn>
void for_dtype(c10::ScalarType dtype, const char* name, Fn&& fn) {
  if (dtype == c10::kBFloat16) {
    fn(c10::BFloat16{});
  } else {
    TORCH_CHECK(dtype == c10::kFloat, name, ": float32 or bfloat16, got ", dtype);
    fn(float{});
  }
}

template <typename Ops>
void rms_norm_entry(c10::ScalarType dtype, const void* x, int64_t x_stride, void* residual, const void* weight,
                    void* out, int64_t H, float eps, int64_t r0, int64_t r1) {
  for_dtype<Ops>(dtype, "rms_norm_rows", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<Ops, T>(static_cast<const T*>(x), x_stride, static_cast<T*>(residual),
                          static_cast<const T*>(weight), static_cast<T*>(out), H, eps, r0, r1);
  });
}

template <typename Ops>
void silu_and_mul_entry(c10::ScalarType dtype, const void* x, int64_t x_stride, void* out, int64_t I, int64_t r0,
                        int64_t r1) {
  for_dtype<Ops>(dtype, "silu_and_mul_rows", [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_rows<Ops, T>(static_cast<const T*>(x), x_stride, static_cast<T*>(out), I, r0, r1);
  });
}

template <typename Ops>
void rope_entry(c10::ScalarType dtype, void* x, int64_t st, int64_t sh, const void* cos, const void* sin,
                int64_t H, int64_t D, int64_t i0, int64_t i1) {
  for_dtype<Ops>(dtype, "rope_rows", [&](auto tag) {
    using T = decltype(tag);
    rope_rows<Ops, T>(static_cast<T*>(x), st, sh, static_cast<const T*>(cos), static_cast<const T*>(sin), H, D,
                      i0, i1);
  });
}

}  // namespace fast_inference::cpu::elementwise
