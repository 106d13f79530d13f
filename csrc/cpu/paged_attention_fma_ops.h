// FmaOps: the paged-attention Ops policy over a float32 vector type (AVX-512 or AVX2 FMA).
//
// Each cache vector is widened to f32 in registers and reused by four rows of the work item at a time
// (the query heads of the GQA group, the tokens of the query tile). Included
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
        : D_(D), Dp_((D + W - 1) / W * W), q_(max_rows * Dp_), acc_(max_rows * Dp_) {}

    void load_query(int64_t r, const T* src) { widen(src, q_.data() + r * Dp_); }
    void zero_acc(int64_t R) { std::fill(acc_.begin(), acc_.begin() + R * Dp_, 0.f); }
    void rescale_acc(int64_t r, float alpha) { scale(acc_.data() + r * Dp_, Dp_, alpha); }
    void read_acc(int64_t r, float* dst) const { std::copy_n(acc_.data() + r * Dp_, D_, dst); }

    // Query rows go four at a time (a GQA group's heads, the tokens of a query tile): each key vector is
    // widened once in registers and feeds four FMAs, with no round trip through a widened-row buffer.
    void scores(int64_t r0, int64_t R, const T* k, int64_t k_stride, int64_t n, float* S, int64_t S_stride) {
      for (int64_t t = 0; t < n; ++t) {
        const T* kt = k + t * k_stride;
        int64_t r = r0;
        for (; r + 4 <= r0 + R; r += 4) {
          const float* q = q_.data() + r * Dp_;
          // Eight chains (two column chunks x four rows): one chain per row would wait on the FMA latency.
          V s0 = Vec::zero(), s1 = Vec::zero(), s2 = Vec::zero(), s3 = Vec::zero();
          V u0 = Vec::zero(), u1 = Vec::zero(), u2 = Vec::zero(), u3 = Vec::zero();
          int64_t c = 0;
          for (; c + 2 * W <= Dp_; c += 2 * W) {
            next_block_.step();
            const V ka = chunk(kt, c), kb = chunk(kt, c + W);
            s0 = Vec::fma(Vec::load(q + c), ka, s0);
            s1 = Vec::fma(Vec::load(q + Dp_ + c), ka, s1);
            s2 = Vec::fma(Vec::load(q + 2 * Dp_ + c), ka, s2);
            s3 = Vec::fma(Vec::load(q + 3 * Dp_ + c), ka, s3);
            u0 = Vec::fma(Vec::load(q + c + W), kb, u0);
            u1 = Vec::fma(Vec::load(q + Dp_ + c + W), kb, u1);
            u2 = Vec::fma(Vec::load(q + 2 * Dp_ + c + W), kb, u2);
            u3 = Vec::fma(Vec::load(q + 3 * Dp_ + c + W), kb, u3);
          }
          if (c < Dp_) {
            const V ka = chunk(kt, c);
            s0 = Vec::fma(Vec::load(q + c), ka, s0);
            s1 = Vec::fma(Vec::load(q + Dp_ + c), ka, s1);
            s2 = Vec::fma(Vec::load(q + 2 * Dp_ + c), ka, s2);
            s3 = Vec::fma(Vec::load(q + 3 * Dp_ + c), ka, s3);
          }
          S[r * S_stride + t] = Vec::reduce_add(Vec::add(s0, u0));
          S[(r + 1) * S_stride + t] = Vec::reduce_add(Vec::add(s1, u1));
          S[(r + 2) * S_stride + t] = Vec::reduce_add(Vec::add(s2, u2));
          S[(r + 3) * S_stride + t] = Vec::reduce_add(Vec::add(s3, u3));
        }
        for (; r < r0 + R; ++r) {
          const float* q = q_.data() + r * Dp_;
          V s0 = Vec::zero(), s1 = Vec::zero();  // two chains hide the FMA latency
          int64_t c = 0;
          for (; c + 2 * W <= Dp_; c += 2 * W) {
            next_block_.step();
            s0 = Vec::fma(Vec::load(q + c), chunk(kt, c), s0);
            s1 = Vec::fma(Vec::load(q + c + W), chunk(kt, c + W), s1);
          }
          if (c < Dp_) s0 = Vec::fma(Vec::load(q + c), chunk(kt, c), s0);
          S[r * S_stride + t] = Vec::reduce_add(Vec::add(s0, s1));
        }
      }
    }

    // acc[r] += sum_t P[r, t] v[t]. Per W-wide column chunk the accumulators of four rows stay in
    // registers across all n tokens of the block (stored once per block, not once per token), and each
    // value vector is widened once for the four rows. Causally masked tokens have P == 0 (exp_row zeroes
    // them) and add nothing.
    void accumulate(const float* P, int64_t P_stride, int64_t r0, int64_t R, const T* v, int64_t v_stride,
                    int64_t n) {
      int64_t r = r0;
      for (; r + 4 <= r0 + R; r += 4) {
        const float* p0 = P + r * P_stride;
        float* a0 = acc_.data() + r * Dp_;
        int64_t c = 0;
        // Two column chunks at once: eight independent FMA chains, each broadcast P value used twice.
        for (; c + 2 * W <= Dp_; c += 2 * W) {
          V x0 = Vec::load(a0 + c), x1 = Vec::load(a0 + Dp_ + c);
          V x2 = Vec::load(a0 + 2 * Dp_ + c), x3 = Vec::load(a0 + 3 * Dp_ + c);
          V y0 = Vec::load(a0 + c + W), y1 = Vec::load(a0 + Dp_ + c + W);
          V y2 = Vec::load(a0 + 2 * Dp_ + c + W), y3 = Vec::load(a0 + 3 * Dp_ + c + W);
          for (int64_t t = 0; t < n; ++t) {
            next_block_.step();
            const T* vt = v + t * v_stride;
            const V va = chunk(vt, c), vb = chunk(vt, c + W);
            const V p0v = Vec::set1(p0[t]), p1v = Vec::set1(p0[P_stride + t]);
            x0 = Vec::fma(p0v, va, x0);
            y0 = Vec::fma(p0v, vb, y0);
            x1 = Vec::fma(p1v, va, x1);
            y1 = Vec::fma(p1v, vb, y1);
            const V p2v = Vec::set1(p0[2 * P_stride + t]), p3v = Vec::set1(p0[3 * P_stride + t]);
            x2 = Vec::fma(p2v, va, x2);
            y2 = Vec::fma(p2v, vb, y2);
            x3 = Vec::fma(p3v, va, x3);
            y3 = Vec::fma(p3v, vb, y3);
          }
          Vec::store(a0 + c, x0);
          Vec::store(a0 + Dp_ + c, x1);
          Vec::store(a0 + 2 * Dp_ + c, x2);
          Vec::store(a0 + 3 * Dp_ + c, x3);
          Vec::store(a0 + c + W, y0);
          Vec::store(a0 + Dp_ + c + W, y1);
          Vec::store(a0 + 2 * Dp_ + c + W, y2);
          Vec::store(a0 + 3 * Dp_ + c + W, y3);
        }
        for (; c < Dp_; c += W) {
          V x0 = Vec::load(a0 + c), x1 = Vec::load(a0 + Dp_ + c);
          V x2 = Vec::load(a0 + 2 * Dp_ + c), x3 = Vec::load(a0 + 3 * Dp_ + c);
          for (int64_t t = 0; t < n; ++t) {
            const V vv = chunk(v + t * v_stride, c);
            x0 = Vec::fma(Vec::set1(p0[t]), vv, x0);
            x1 = Vec::fma(Vec::set1(p0[P_stride + t]), vv, x1);
            x2 = Vec::fma(Vec::set1(p0[2 * P_stride + t]), vv, x2);
            x3 = Vec::fma(Vec::set1(p0[3 * P_stride + t]), vv, x3);
          }
          Vec::store(a0 + c, x0);
          Vec::store(a0 + Dp_ + c, x1);
          Vec::store(a0 + 2 * Dp_ + c, x2);
          Vec::store(a0 + 3 * Dp_ + c, x3);
        }
      }
      for (; r < r0 + R; ++r) {
        const float* p = P + r * P_stride;
        float* acc = acc_.data() + r * Dp_;
        for (int64_t c = 0; c < Dp_; c += W) {
          V x0 = Vec::load(acc + c), x1 = Vec::zero();  // two chains over even and odd tokens
          int64_t t = 0;
          for (; t + 2 <= n; t += 2) {
            x0 = Vec::fma(Vec::set1(p[t]), chunk(v + t * v_stride, c), x0);
            x1 = Vec::fma(Vec::set1(p[t + 1]), chunk(v + (t + 1) * v_stride, c), x1);
          }
          if (t < n) x0 = Vec::fma(Vec::set1(p[t]), chunk(v + t * v_stride, c), x0);
          Vec::store(acc + c, Vec::add(x0, x1));
        }
      }
    }

    static float exp_row(int64_t /*r*/, float* s, int64_t n, int64_t visible, float scale, float m) {
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

    // The driver hands over the next cache block (bytes of K and of V, each contiguous) and the compute
    // loops prefetch it into L2, one line of K and one of V per inner step, so the fetch overlaps the
    // compute. Reading the block up front instead (one demand load per line) stalls the core on DRAM:
    // decode with FI_CPU_ISA=avx2 ran ~4.6x slower per token than the same kernel in cache. Prefetches
    // trickle out rather than burst (bursts are dropped once the miss queue is full, see the AVX-512 ops).
    // The scores loop alone takes D / (2W) steps per token, kv head and four rows: for bs x heads rows of
    // D elements that is at least one step per line for 4-byte elements; accumulate adds more.
    void stream_next_block(const char* k, const char* v, int64_t bytes) { next_block_.start(k, v, bytes); }

   private:
    // Elements [c, c + W) of a row of D elements of T widened to f32, zeros past D (never read).
    V chunk(const T* row, int64_t c) const { return Vec::load_f32(row + c, int(std::min<int64_t>(W, D_ - c))); }
    // One row of D elements of T -> Dp floats (zero padded), W at a time.
    void widen(const T* src, float* dst) const {
      for (int64_t c = 0; c < Dp_; c += W) Vec::store(dst + c, chunk(src, c));
    }

    int64_t D_, Dp_;
    std::vector<float> q_, acc_;
    BlockPrefetch next_block_;
  };
};

}  // namespace fast_inference::cpu::FI_CPU_ISA
