// FmaOps: the paged-attention Ops policy over a float32 vector type (AVX-512 or AVX2 FMA).
//
// Each cache row is widened to f32 once into an L1-resident buffer and then reused by every row of
// the work item (all the query heads of the GQA group, all the tokens of the query tile). Included
// by a per-ISA translation unit after paged_attention_kernel.h, with the ISA's vector traits `Vec`:
// V, W, zero, set1, load, store, fma, mul, max, reduce_add, reduce_max, load_f32(T*, count), exp.
#pragma once

#ifndef FI_CPU_ISA
#error "define FI_CPU_ISA before including paged_attention_fma_ops.h"
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fast_inference::cpu::FI_CPU_ISA {

template <typename Vec>
struct FmaOpsFor {
  template <typename T>
  class Ops {
   public:
    using V = typename Vec::V;
    static constexpr int W = Vec::W;

    // Rows are padded to Dp (a multiple of W) with zeros so the inner loops need no tail.
    Ops(int64_t max_rows, int64_t D, int64_t /*block_size*/)
        : D_(D), Dp_((D + W - 1) / W * W), q_(max_rows * Dp_), acc_(max_rows * Dp_), row_(Dp_) {}

    void load_query(int64_t r, const T* src) { widen(src, q_.data() + r * Dp_); }
    void zero_acc(int64_t R) { std::fill(acc_.begin(), acc_.begin() + R * Dp_, 0.f); }
    void rescale_acc(int64_t r, float alpha) { scale(acc_.data() + r * Dp_, Dp_, alpha); }
    void read_acc(int64_t r, float* dst) const { std::copy_n(acc_.data() + r * Dp_, D_, dst); }

    void scores(int64_t r0, int64_t R, const T* k, int64_t k_stride, int64_t n, float* S, int64_t S_stride) {
      float* kt = row_.data();
      for (int64_t t = 0; t < n; ++t) {
        widen(k + t * k_stride, kt);
        for (int64_t r = r0; r < r0 + R; ++r) {
          const float* q = q_.data() + r * Dp_;
          V s0 = Vec::zero(), s1 = Vec::zero();  // two chains hide the FMA latency
          int64_t c = 0;
          for (; c + 2 * W <= Dp_; c += 2 * W) {
            s0 = Vec::fma(Vec::load(q + c), Vec::load(kt + c), s0);
            s1 = Vec::fma(Vec::load(q + c + W), Vec::load(kt + c + W), s1);
          }
          if (c < Dp_) s0 = Vec::fma(Vec::load(q + c), Vec::load(kt + c), s0);
          S[r * S_stride + t] = Vec::reduce_add(Vec::add(s0, s1));
        }
      }
    }

    void accumulate(const float* P, int64_t P_stride, int64_t r0, int64_t R, const T* v, int64_t v_stride,
                    int64_t n) {
      float* vt = row_.data();
      for (int64_t t = 0; t < n; ++t) {
        widen(v + t * v_stride, vt);
        for (int64_t r = r0; r < r0 + R; ++r) {
          const float p = P[r * P_stride + t];
          if (p == 0.f) continue;  // masked by causality
          const V pv = Vec::set1(p);
          float* acc = acc_.data() + r * Dp_;
          for (int64_t c = 0; c < Dp_; c += W) Vec::store(acc + c, Vec::fma(pv, Vec::load(vt + c), Vec::load(acc + c)));
        }
      }
    }

    float exp_row(int64_t /*r*/, float* s, int64_t n, int64_t visible, float scale, float m) const {
      const V scale_v = Vec::set1(scale), neg_m = Vec::set1(-m);
      V sum = Vec::zero();
      int64_t i = 0;
      for (; i + W <= visible; i += W) {
        const V e = Vec::exp(Vec::fma(Vec::load(s + i), scale_v, neg_m));
        Vec::store(s + i, e);
        sum = Vec::add(sum, e);
      }
      float total = Vec::reduce_add(sum);
      for (; i < visible; ++i) total += (s[i] = std::exp(s[i] * scale - m));
      std::fill(s + visible, s + n, 0.f);
      return total;
    }
    static float max(const float* x, int64_t n) {
      float best = -std::numeric_limits<float>::infinity();
      int64_t i = 0;
      if (n >= W) {
        V mv = Vec::load(x);
        for (i = W; i + W <= n; i += W) mv = Vec::max(mv, Vec::load(x + i));
        best = Vec::reduce_max(mv);
      }
      for (; i < n; ++i) best = std::max(best, x[i]);
      return best;
    }
    static void scale(float* x, int64_t n, float s) {
      const V sv = Vec::set1(s);
      int64_t i = 0;
      for (; i + W <= n; i += W) Vec::store(x + i, Vec::mul(Vec::load(x + i), sv));
      for (; i < n; ++i) x[i] *= s;
    }

   private:
    // One row of D elements of T -> Dp floats (zero padded), W at a time, never reading past D.
    void widen(const T* src, float* dst) const {
      for (int64_t c = 0; c < Dp_; c += W) Vec::store(dst + c, Vec::load_f32(src + c, int(std::min<int64_t>(W, D_ - c))));
    }

    int64_t D_, Dp_;
    std::vector<float> q_, acc_, row_;
  };
};

}  // namespace fast_inference::cpu::FI_CPU_ISA
