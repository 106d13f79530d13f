// The CPU paged-attention driver: work items, online softmax, split-KV and its reduction.
//
// Included by each per-ISA translation unit with FI_CPU_ISA defined to a distinct namespace name, so
// every inline function and template here gets its own copy compiled with that file's ISA flags (the
// linker can never swap an AVX-512 copy into the portable path). The ISA supplies an `Ops<T>` class,
// one instance per thread, holding the work item's queries and float32 accumulators:
//
//   load_query(r, q_row)                   row r of the item's queries (D elements of T)
//   zero_acc(R), rescale_acc(r, alpha), read_acc(r, float dst[D])
//   scores(r0, R, k, k_stride, n, S, S_stride)  S[r][t] = dot(q[r], k[t]) for r0 <= r < r0+R, t < n (rows of T)
//   accumulate(P, P_stride, r0, R, v, v_stride, n)  acc[r] += sum_t P[r][t] * v[t] for r0 <= r < r0+R
//   exp_row(r, s, n, visible, scale, m) -> sum  P[r][t] = exp(s[t] * scale - m) for t < visible, 0 up to n,
//                                           stored where accumulate reads it, at the precision it uses
//   static max(x, n)
//   stream_next_block(k, v, bytes)         optional: prefetch these bytes of K and of V (the next block)
//                                           from inside scores/accumulate while they compute
//   attend(r0, R, k, v, stride, n, pos0, row_pos, scale, m, l)  optional, replaces scores, the softmax
//                                           step and accumulate for one kv head's rows of one block
//                                           (m, l: running max and sum per row), so an ISA can keep
//                                           the block's scores in its own layout
//
// Work item = (sequence, tile of query tokens, kv heads, KV split). All the query heads of a GQA group
// and all the tokens of the tile are the rows that share every K/V row read from the cache, so each
// cache row is read once per work item. Long contexts with few work items are split along the
// KV axis; each split writes (acc, max, sum) partials that a second pass merges.
#pragma once

#ifndef FI_CPU_ISA
#error "define FI_CPU_ISA (the namespace of this instruction set) before including paged_attention_kernel.h"
#endif

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/paged_attention.h"

namespace fast_inference::cpu::FI_CPU_ISA {

struct WorkItem {
  int32_t seq, q_begin, q_end;  // query tokens [q_begin, q_end) of sequence seq (global token indices)
  int32_t head_begin, head_end;  // kv heads [head_begin, head_end)
  int32_t kv_begin, kv_end;      // key positions [kv_begin, kv_end) this item reads
  int32_t split, num_splits;
};

// Rows per kv head of a work item: the tile's query tokens times the GQA group. 64 rows amortise every
// K/V row over many dot products while the f32 query, accumulator and score tiles stay in L2.
constexpr int kMaxRowsPerHead = 64;
// A work item takes several kv heads when each has few rows (decode): it then reads every cache block
// front to back, one contiguous run the hardware prefetcher streams, instead of short per-head rows.
constexpr int kMaxRowsPerItem = 64;
// Never split a sequence's keys into chunks shorter than this: the merge pass costs a full row each.
constexpr int kMinSplitTokens = 256;
// How far ahead (in blocks) the K/V rows of a work item with a subset of the kv heads are prefetched.
constexpr int64_t kPrefetchBlocks = 2;

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// Prefetch n rows of `bytes` bytes, `stride` bytes apart, into L2 (prefetcht1): the rows are consumed
// a few microseconds later, long enough for L1 to have evicted them.
inline void prefetch_rows(const char* rows, int64_t stride, int64_t n, int64_t bytes) {
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(rows + t * stride + b, 0, 2);
  }
}

// The next cache block's K and V, prefetched into L2 one line of each per step() from inside an Ops' compute
// loops (its stream_next_block hands the block over), so the fetch trickles out while the current block
// computes: bursts of prefetches are dropped once the miss queue is full (see the AVX-512 ops).
struct BlockPrefetch {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t pos = 0, end = 0;

  void start(const char* k_next, const char* v_next, int64_t bytes) {
    k = k_next;
    v = v_next;
    pos = 0;
    end = bytes;
  }
  void step() {
    if (pos < end) {
      __builtin_prefetch(k + pos, 0, 2);
      __builtin_prefetch(v + pos, 0, 2);
      pos += 64;
    }
  }
};

inline std::vector<WorkItem> make_work_items(const PagedAttentionArgs& a, int q_tile, int heads_per_item) {
  std::vector<WorkItem> base;
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const int32_t q0 = a.cu_query_lens[s], q1 = a.cu_query_lens[s + 1], seq_len = a.seq_lens[s];
    for (int32_t t = q0; t < q1; t += q_tile) {
      const int32_t t1 = std::min<int32_t>(t + q_tile, q1);
      // The last key any row of the tile may see: its last token's position (causal) or the whole context.
      const int32_t kv_end = a.causal ? seq_len - (q1 - q0) + (t1 - q0) : seq_len;
      base.push_back({int32_t(s), t, t1, 0, 0, 0, kv_end, 0, 1});
    }
  }
  const int64_t head_groups = (a.num_kv_heads + heads_per_item - 1) / heads_per_item;
  // Split the KV axis when there are too few items to keep every thread busy through the tail.
  const int64_t threads = at::get_num_threads();
  const int64_t base_count = int64_t(base.size()) * head_groups;
  int64_t want_splits = 1;
  if (base_count > 0 && base_count < 4 * threads) want_splits = (4 * threads + base_count - 1) / base_count;
  std::vector<WorkItem> items;
  items.reserve(base.size() * head_groups * want_splits);
  for (const WorkItem& b : base) {
    const int64_t blocks = (b.kv_end + a.block_size - 1) / a.block_size;
    const int64_t min_blocks = std::max<int64_t>(1, kMinSplitTokens / a.block_size);
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want_splits, blocks / min_blocks));
    for (int64_t hg = 0; hg < head_groups; ++hg) {
      for (int64_t sp = 0; sp < splits; ++sp) {
        WorkItem w = b;
        w.head_begin = int32_t(hg * heads_per_item);
        w.head_end = int32_t(std::min<int64_t>(a.num_kv_heads, (hg + 1) * heads_per_item));
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

template <typename T, template <typename> class Ops>
void paged_attention_impl(const PagedAttentionArgs& a) {
  const int64_t D = a.head_size, bs = a.block_size;
  const int64_t group = a.num_heads / a.num_kv_heads;
  const int q_tile = int(std::max<int64_t>(1, kMaxRowsPerHead / group));
  // Decode-like batches (every sequence has few query tokens) group kv heads into one item.
  int32_t max_q_len = 0;
  for (int64_t s = 0; s < a.num_seqs; ++s) max_q_len = std::max(max_q_len, a.cu_query_lens[s + 1] - a.cu_query_lens[s]);
  const int64_t rows_per_head = std::min<int64_t>(q_tile, std::max<int32_t>(max_q_len, 1)) * group;
  const int heads_per_item = int(std::clamp<int64_t>(kMaxRowsPerItem / rows_per_head, 1, a.num_kv_heads));
  const int64_t max_rows = rows_per_head * heads_per_item;
  const std::vector<WorkItem> items = make_work_items(a, q_tile, heads_per_item);
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

  // Merge the splits of a split item's (token, head) rows: rescale each split to the global max.
  // Run by whichever thread finishes the group's last split, so there is no second parallel pass.
  auto merge_group = [&](const WorkItem& w, std::vector<float>& merged) {
    for (int64_t tok = w.q_begin; tok < w.q_end; ++tok) {
      for (int64_t head = w.head_begin * group; head < w.head_end * group; ++head) {
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
  };
  // Splits of one group are consecutive items; the counter lives at the group's first item.
  std::vector<std::atomic<int32_t>> splits_left(max_splits > 1 ? items.size() : 0);
  for (size_t i = 0; i < splits_left.size(); ++i) splits_left[i].store(items[i].split == 0 ? items[i].num_splits : 0);

  // Threads take items from a shared counter rather than fixed ranges: items differ in cost (causal
  // tiles, ragged lengths) and on a shared machine one descheduled thread must not hold the rest.
  std::atomic<int64_t> next_item{0};
  const int64_t num_items = int64_t(items.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_items), 1, [&](int64_t, int64_t) {
    Ops<T> ops(max_rows, D, bs);  // per-thread scratch: queries, accumulators
    std::vector<float> S(max_rows * bs), m(max_rows), l(max_rows), row(D);
    std::vector<int32_t> row_pos(max_rows), row_tok(max_rows), row_head(max_rows);
    for (int64_t wi = next_item++; wi < num_items; wi = next_item++) {
      const WorkItem& w = items[wi];
      const int64_t q_len = a.cu_query_lens[w.seq + 1] - a.cu_query_lens[w.seq];
      const int64_t first_pos = a.seq_lens[w.seq] - q_len - a.cu_query_lens[w.seq];  // + token index
      const int64_t heads = w.head_end - w.head_begin;
      const int64_t RH = (w.q_end - w.q_begin) * group;  // rows per kv head
      const int64_t R = RH * heads;
      // Row r = (kv head head_begin + r / RH, token q_begin + (r % RH) / group, query head of the group r % group).
      for (int64_t r = 0; r < R; ++r) {
        const int64_t kvh = w.head_begin + r / RH, tok = w.q_begin + (r % RH) / group;
        const int64_t head = kvh * group + r % group;
        row_tok[r] = int32_t(tok);
        row_head[r] = int32_t(head);
        ops.load_query(r, query + tok * a.q_stride_token + head * a.q_stride_head);
        row_pos[r] = a.causal ? int32_t(first_pos + tok) : std::numeric_limits<int32_t>::max();
        m[r] = kNegInf;
        l[r] = 0.f;
      }
      ops.zero_acc(R);
      uint8_t touch = 0;  // the early loads' bytes, kept so the compiler keeps the loads
      const int32_t* table = a.block_tables + int64_t(w.seq) * a.block_tables_stride;
      const int64_t head_offset = w.head_begin * D;
      for (int64_t pos0 = w.kv_begin; pos0 < w.kv_end; pos0 += bs) {
        const int64_t n = std::min<int64_t>(bs, w.kv_end - pos0);
        const int64_t block_offset = table[pos0 / bs] * cache_stride_block + head_offset;
        // Bring the next block in early. An item that covers every kv head reads whole contiguous
        // blocks (decode). An ISA with stream_next_block prefetches the next one from inside its
        // compute loops, a few lines at a time (see the AVX-512 bf16 ops: bursts of prefetches are
        // dropped on Zen 4); the others read one byte per cache line of it up front, in address
        // order, which the hardware streamer follows (per-head row prefetches reached about half the
        // streaming bandwidth). An item with a subset of the heads prefetches its own rows
        // kPrefetchBlocks ahead instead, in small bursts per head.
        const bool whole_blocks = heads == a.num_kv_heads;
        const int64_t stride_bytes = cache_stride_token * int64_t(sizeof(T)), row_bytes = D * int64_t(sizeof(T));
        const bool has_next = whole_blocks && pos0 + bs < w.kv_end;
        const int64_t next = has_next ? table[pos0 / bs + 1] * cache_stride_block : 0;
        const char* k_next = reinterpret_cast<const char*>(key_cache + next);
        const char* v_next = reinterpret_cast<const char*>(value_cache + next);
        const int64_t next_bytes = has_next ? std::min<int64_t>(bs, w.kv_end - pos0 - bs) * stride_bytes : 0;
        if constexpr (requires { ops.stream_next_block(k_next, v_next, next_bytes); }) {
          ops.stream_next_block(k_next, v_next, next_bytes);  // 0 bytes: nothing to prefetch
        } else {
          for (int64_t b = 0; b < next_bytes; b += 64) touch ^= uint8_t(k_next[b] ^ v_next[b]);
        }
        const bool prefetch = !whole_blocks && pos0 + kPrefetchBlocks * bs < w.kv_end;
        const int64_t ahead = prefetch ? table[pos0 / bs + kPrefetchBlocks] * cache_stride_block + head_offset : 0;
        const char* k_ahead = reinterpret_cast<const char*>(key_cache + ahead);
        const char* v_ahead = reinterpret_cast<const char*>(value_cache + ahead);
        for (int64_t hh = 0; hh < heads; ++hh) {
          const int64_t r0 = hh * RH, offset = block_offset + hh * D;
          if (prefetch) prefetch_rows(k_ahead + hh * row_bytes, stride_bytes, bs, row_bytes);
          if constexpr (requires { ops.attend(r0, RH, key_cache, value_cache, 0, n, pos0, row_pos.data(), a.scale,
                                              m.data(), l.data()); }) {
            if (prefetch) prefetch_rows(v_ahead + hh * row_bytes, stride_bytes, bs, row_bytes);
            ops.attend(r0, RH, key_cache + offset, value_cache + offset, cache_stride_token, n, pos0, row_pos.data(),
                       a.scale, m.data(), l.data());
          } else {
            ops.scores(r0, RH, key_cache + offset, cache_stride_token, n, S.data(), bs);
            for (int64_t r = r0; r < r0 + RH; ++r) {
              float* s = S.data() + r * bs;
              // Causal: keys past this row's position are masked; rows with nothing visible add nothing.
              const int64_t visible = std::clamp<int64_t>(row_pos[r] - pos0 + 1, 0, n);
              // scale > 0, so the scaled maximum is the maximum scaled
              const float block_max = visible > 0 ? Ops<T>::max(s, visible) * a.scale : kNegInf;
              if (block_max > m[r]) {
                const float alpha = std::exp(m[r] - block_max);  // 0 on the first visible block
                ops.rescale_acc(r, alpha);
                l[r] *= alpha;
                m[r] = block_max;
              }
              l[r] += ops.exp_row(r, s, n, visible, a.scale, m[r]);
            }
            if (prefetch) prefetch_rows(v_ahead + hh * row_bytes, stride_bytes, bs, row_bytes);
            ops.accumulate(S.data(), bs, r0, RH, value_cache + offset, cache_stride_token, n);
          }
        }
      }
      asm volatile("" : : "r"(touch));  // the early loads have a use, so they stay
      for (int64_t r = 0; r < R; ++r) {
        const int64_t tok = row_tok[r], head = row_head[r];
        if (w.num_splits == 1) {
          ops.read_acc(r, row.data());
          const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
          T* dst = out + tok * a.out_stride_token + head * a.out_stride_head;
          for (int64_t d = 0; d < D; ++d) dst[d] = T(row[d] * inv);
        } else {
          const int64_t p = (tok * a.num_heads + head) * max_splits + w.split;
          ops.read_acc(r, part_acc.data() + p * D);
          part_ml[2 * p] = m[r];
          part_ml[2 * p + 1] = l[r];
        }
      }
      // acq_rel: the last finisher sees every other split's partials before merging them.
      if (w.num_splits > 1 && splits_left[wi - w.split].fetch_sub(1, std::memory_order_acq_rel) == 1) {
        merge_group(items[wi - w.split], row);
      }
    }
  });
}

// Dispatch on the element type; Ops is the instruction set's policy.
template <template <typename> class Ops>
void paged_attention_dispatch(const PagedAttentionArgs& a, c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float: return paged_attention_impl<float, Ops>(a);
    case c10::ScalarType::Half: return paged_attention_impl<c10::Half, Ops>(a);
    case c10::ScalarType::BFloat16: return paged_attention_impl<c10::BFloat16, Ops>(a);
    default: TORCH_CHECK(false, "paged_attention: unsupported dtype ", dtype);
  }
}

// Plain C++ loops: the fallback for any CPU, and the reference shape of what the vector ISAs do.
// Scratch per thread: the work item's queries and accumulators as float32 rows [R][D].
template <typename T>
class PortableOps {
 public:
  PortableOps(int64_t max_rows, int64_t D, int64_t /*block_size*/) : D_(D), q_(max_rows * D), acc_(max_rows * D) {}

  void load_query(int64_t r, const T* src) {
    for (int64_t d = 0; d < D_; ++d) q_[r * D_ + d] = to_float(src[d]);
  }
  void zero_acc(int64_t R) { std::fill(acc_.begin(), acc_.begin() + R * D_, 0.f); }
  void rescale_acc(int64_t r, float alpha) { scale(acc_.data() + r * D_, D_, alpha); }
  void read_acc(int64_t r, float* dst) const { std::copy_n(acc_.data() + r * D_, D_, dst); }

  // k: n rows of D elements, k_stride apart. S[r][t] = dot(q[r], k[t]).
  void scores(int64_t r0, int64_t R, const T* k, int64_t k_stride, int64_t n, float* S, int64_t S_stride) const {
    for (int64_t t = 0; t < n; ++t) {
      const T* kt = k + t * k_stride;
      for (int64_t r = r0; r < r0 + R; ++r) {
        float sum = 0.f;
        for (int64_t d = 0; d < D_; ++d) sum += q_[r * D_ + d] * to_float(kt[d]);
        S[r * S_stride + t] = sum;
      }
    }
  }
  // v: n rows of D elements, v_stride apart. acc[r] += sum_t P[r][t] * v[t].
  void accumulate(const float* P, int64_t P_stride, int64_t r0, int64_t R, const T* v, int64_t v_stride, int64_t n) {
    for (int64_t t = 0; t < n; ++t) {
      const T* vt = v + t * v_stride;
      for (int64_t r = r0; r < r0 + R; ++r) {
        const float p = P[r * P_stride + t];
        if (p == 0.f) continue;
        for (int64_t d = 0; d < D_; ++d) acc_[r * D_ + d] += p * to_float(vt[d]);
      }
    }
  }

  float exp_row(int64_t /*r*/, float* s, int64_t n, int64_t visible, float scale, float m) const {
    float sum = 0.f;
    for (int64_t t = 0; t < visible; ++t) sum += (s[t] = std::exp(s[t] * scale - m));
    std::fill(s + visible, s + n, 0.f);
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

 private:
  int64_t D_;
  std::vector<float> q_, acc_;
};

}  // namespace fast_inference::cpu::FI_CPU_ISA
