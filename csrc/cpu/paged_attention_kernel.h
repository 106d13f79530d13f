// The CPU paged-attention driver: work items, online softmax, split-KV and its reduction.
//
// Included by each per-ISA translation unit with FI_CPU_ISA defined to a distinct namespace name, so
// every inline function and template here gets its own copy compiled with that file's ISA flags (the
// linker can never swap an AVX-512 copy into the portable path). The ISA supplies an `Ops` policy:
//
//   Ops::scores<T>(q, R, D, k, k_stride, n, S, S_stride)       S[r][t] = dot(q[r], k[t]) for r<R, t<n
//   Ops::accumulate<T>(P, P_stride, R, D, v, v_stride, n, acc) acc[r] += sum_t P[r][t] * v[t]
//   Ops::exp_sub_sum(x, n, m)                                 x[t] = exp(x[t] - m), returns the sum
//   Ops::max(x, n), Ops::scale(x, n, s)
//
// where q, acc, S, P are float32 rows and k, v point at cache rows of element type T (f32/f16/bf16).
//
// Work item = (sequence, tile of query tokens, kv head, KV split). All the query heads of a GQA group
// and all the tokens of the tile form the R rows that share every K/V row read from the cache, so
// each cache row is read once per work item. Long contexts with few work items are split along the
// KV axis; each split writes (acc, max, sum) partials that a second pass merges.
#pragma once

#ifndef FI_CPU_ISA
#error "define FI_CPU_ISA (the namespace of this instruction set) before including paged_attention_kernel.h"
#endif

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/paged_attention.h"

namespace fast_inference::cpu::FI_CPU_ISA {

struct WorkItem {
  int32_t seq, q_begin, q_end, kv_head;
  int32_t kv_begin, kv_end;  // key positions [kv_begin, kv_end) this item reads
  int32_t split, num_splits;
};

// Rows of one work item: the tile's query tokens times the group's heads. 64 rows keep the f32 query,
// accumulator and score tiles inside L2 while amortising each K/V row over many dot products.
constexpr int kMaxRowsPerTile = 64;
// Never split a sequence's keys into chunks shorter than this: the merge pass costs a full row each.
constexpr int kMinSplitTokens = 256;

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
std::vector<WorkItem> make_work_items(const PagedAttentionArgs& a, int q_tile) {
  const int64_t groups = a.num_kv_heads;
  std::vector<WorkItem> base;
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const int32_t q0 = a.cu_query_lens[s], q1 = a.cu_query_lens[s + 1], seq_len = a.seq_lens[s];
    for (int32_t t = q0; t < q1; t += q_tile) {
      const int32_t t1 = std::min<int32_t>(t + q_tile, q1);
      // The last key any row of the tile may see: its last token's position (causal) or the whole context.
      const int32_t kv_end = a.causal ? seq_len - (q1 - q0) + (t1 - q0) : seq_len;
      base.push_back({int32_t(s), t, t1, 0, 0, kv_end, 0, 1});
    }
  }
  // Split the KV axis when there are too few items to keep every thread busy through the tail.
  const int64_t threads = at::get_num_threads();
  const int64_t base_count = int64_t(base.size()) * groups;
  int64_t want_splits = 1;
  if (base_count > 0 && base_count < 4 * threads) want_splits = (4 * threads + base_count - 1) / base_count;
  std::vector<WorkItem> items;
  items.reserve(base.size() * groups * want_splits);
  for (const WorkItem& b : base) {
    const int64_t blocks = (b.kv_end + a.block_size - 1) / a.block_size;
    const int64_t min_blocks = std::max<int64_t>(1, kMinSplitTokens / a.block_size);
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want_splits, blocks / min_blocks));
    for (int64_t h = 0; h < groups; ++h) {
      for (int64_t sp = 0; sp < splits; ++sp) {
        WorkItem w = b;
        w.kv_head = int32_t(h);
        w.split = int32_t(sp);
        w.num_splits = int32_t(splits);
        w.kv_begin = int32_t(blocks * sp / splits * a.block_size);
        w.kv_end = std::min<int32_t>(b.kv_end, int32_t(blocks * (sp + 1) / splits * a.block_size));
        items.push_back(w);
      }
    }
  }
  return items;
}

template <typename T, typename Ops>
void paged_attention_impl(const PagedAttentionArgs& a) {
  const int64_t D = a.head_size, bs = a.block_size;
  const int64_t group = a.num_heads / a.num_kv_heads;
  const int q_tile = int(std::max<int64_t>(1, kMaxRowsPerTile / group));
  const int64_t max_rows = q_tile * group;
  const std::vector<WorkItem> items = make_work_items<T>(a, q_tile);
  int max_splits = 1;
  for (const WorkItem& w : items) max_splits = std::max(max_splits, w.num_splits);
  const int64_t num_tokens = a.cu_query_lens[a.num_seqs];

  // Split partials, per (query token, head, split): the unnormalised accumulator, running max, sum.
  std::vector<float> part_acc, part_ml;
  if (max_splits > 1) {
    part_acc.resize(size_t(num_tokens) * a.num_heads * max_splits * D);
    part_ml.resize(size_t(num_tokens) * a.num_heads * max_splits * 2);
  }
  const T* query = static_cast<const T*>(a.query);
  const T* key_cache = static_cast<const T*>(a.key_cache);
  const T* value_cache = static_cast<const T*>(a.value_cache);
  T* out = static_cast<T*>(a.out);
  const int64_t cache_stride_block = bs * a.num_kv_heads * D, cache_stride_token = a.num_kv_heads * D;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(max_rows * D), acc(max_rows * D), S(max_rows * bs), m(max_rows), l(max_rows);
    std::vector<int32_t> row_pos(max_rows);
    for (int64_t wi = begin; wi < end; ++wi) {
      const WorkItem& w = items[wi];
      const int64_t q_len = a.cu_query_lens[w.seq + 1] - a.cu_query_lens[w.seq];
      const int64_t first_pos = a.seq_lens[w.seq] - q_len - a.cu_query_lens[w.seq];  // + token index
      const int64_t R = (w.q_end - w.q_begin) * group;
      // Row r = (token q_begin + r / group, head kv_head * group + r % group).
      for (int64_t r = 0; r < R; ++r) {
        const int64_t tok = w.q_begin + r / group, head = w.kv_head * group + r % group;
        const T* src = query + tok * a.q_stride_token + head * a.q_stride_head;
        for (int64_t d = 0; d < D; ++d) q[r * D + d] = to_float(src[d]);
        row_pos[r] = a.causal ? int32_t(first_pos + tok) : std::numeric_limits<int32_t>::max();
        m[r] = kNegInf;
        l[r] = 0.f;
      }
      std::fill(acc.begin(), acc.begin() + R * D, 0.f);
      const int32_t* table = a.block_tables + int64_t(w.seq) * a.block_tables_stride;
      for (int64_t pos0 = w.kv_begin; pos0 < w.kv_end; pos0 += bs) {
        const int64_t n = std::min<int64_t>(bs, w.kv_end - pos0);
        const int64_t block = table[pos0 / bs];
        const int64_t offset = block * cache_stride_block + w.kv_head * D;
        Ops::template scores<T>(q.data(), R, D, key_cache + offset, cache_stride_token, n, S.data(), bs);
        for (int64_t r = 0; r < R; ++r) {
          float* s = S.data() + r * bs;
          // Causal: keys past this row's position are masked; rows with nothing visible add nothing.
          const int64_t visible = std::clamp<int64_t>(row_pos[r] - pos0 + 1, 0, n);
          std::fill(s + visible, s + n, 0.f);
          if (visible == 0) continue;
          Ops::scale(s, visible, a.scale);
          const float block_max = Ops::max(s, visible);
          const float m_new = std::max(m[r], block_max);
          const float alpha = std::exp(m[r] - m_new);  // 0 on the first visible block
          if (alpha != 1.f) {
            Ops::scale(acc.data() + r * D, D, alpha);
            l[r] *= alpha;
          }
          m[r] = m_new;
          l[r] += Ops::exp_sub_sum(s, visible, m_new);
        }
        Ops::template accumulate<T>(S.data(), bs, R, D, value_cache + offset, cache_stride_token, n, acc.data());
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t tok = w.q_begin + r / group, head = w.kv_head * group + r % group;
        if (w.num_splits == 1) {
          const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
          T* dst = out + tok * a.out_stride_token + head * a.out_stride_head;
          for (int64_t d = 0; d < D; ++d) dst[d] = T(acc[r * D + d] * inv);
        } else {
          const int64_t p = (tok * a.num_heads + head) * max_splits + w.split;
          std::copy(acc.begin() + r * D, acc.begin() + (r + 1) * D, part_acc.begin() + p * D);
          part_ml[2 * p] = m[r];
          part_ml[2 * p + 1] = l[r];
        }
      }
    }
  });
  if (max_splits == 1) return;

  // Merge the splits of every (token, head) row that was split: rescale each to the global max.
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(D);
    for (int64_t wi = begin; wi < end; ++wi) {
      const WorkItem& w = items[wi];
      if (w.num_splits == 1 || w.split != 0) continue;
      for (int64_t tok = w.q_begin; tok < w.q_end; ++tok) {
        for (int64_t g = 0; g < group; ++g) {
          const int64_t head = w.kv_head * group + g;
          const int64_t p0 = (tok * a.num_heads + head) * max_splits;
          float m_all = kNegInf;
          for (int sp = 0; sp < w.num_splits; ++sp) m_all = std::max(m_all, part_ml[2 * (p0 + sp)]);
          std::fill(merged.begin(), merged.end(), 0.f);
          float l_all = 0.f;
          for (int sp = 0; sp < w.num_splits; ++sp) {
            const float ms = part_ml[2 * (p0 + sp)];
            if (ms == kNegInf) continue;  // this split saw no visible key
            const float wgt = std::exp(ms - m_all);
            l_all += wgt * part_ml[2 * (p0 + sp) + 1];
            const float* src = part_acc.data() + (p0 + sp) * D;
            for (int64_t d = 0; d < D; ++d) merged[d] += wgt * src[d];
          }
          const float inv = l_all > 0.f ? 1.f / l_all : 0.f;
          T* dst = out + tok * a.out_stride_token + head * a.out_stride_head;
          for (int64_t d = 0; d < D; ++d) dst[d] = T(merged[d] * inv);
        }
      }
    }
  });
}

// Dispatch on the element type; Ops is the instruction set's policy.
template <typename Ops>
void paged_attention_dispatch(const PagedAttentionArgs& a, c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float: return paged_attention_impl<float, Ops>(a);
    case c10::ScalarType::Half: return paged_attention_impl<c10::Half, Ops>(a);
    case c10::ScalarType::BFloat16: return paged_attention_impl<c10::BFloat16, Ops>(a);
    default: TORCH_CHECK(false, "paged_attention: unsupported dtype ", dtype);
  }
}

// Plain C++ loops: the fallback for any CPU, and the reference shape of what the vector ISAs do.
struct PortableOps {
  template <typename T>
  static void scores(const float* q, int64_t R, int64_t D, const T* k, int64_t k_stride, int64_t n, float* S,
                     int64_t S_stride) {
    for (int64_t t = 0; t < n; ++t) {
      const T* kt = k + t * k_stride;
      for (int64_t r = 0; r < R; ++r) {
        float sum = 0.f;
        for (int64_t d = 0; d < D; ++d) sum += q[r * D + d] * to_float(kt[d]);
        S[r * S_stride + t] = sum;
      }
    }
  }
  template <typename T>
  static void accumulate(const float* P, int64_t P_stride, int64_t R, int64_t D, const T* v, int64_t v_stride,
                         int64_t n, float* acc) {
    for (int64_t t = 0; t < n; ++t) {
      const T* vt = v + t * v_stride;
      for (int64_t r = 0; r < R; ++r) {
        const float p = P[r * P_stride + t];
        if (p == 0.f) continue;
        for (int64_t d = 0; d < D; ++d) acc[r * D + d] += p * to_float(vt[d]);
      }
    }
  }
  static float exp_sub_sum(float* x, int64_t n, float m) {
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - m));
    return sum;
  }
  static float max(const float* x, int64_t n) {
    float v = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) v = std::max(v, x[i]);
    return v;
  }
  static void scale(float* x, int64_t n, float s) {
    for (int64_t i = 0; i < n; ++i) x[i] *= s;
  }
};

}  // namespace fast_inference::cpu::FI_CPU_ISA
