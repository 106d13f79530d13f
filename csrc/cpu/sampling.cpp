// CPU sampling ops: sample, apply_penalties, apply_logit_bias, compute_logprobs (drivers + portable kernels).
//
// sample, per row and without sorting the vocabulary:
//   1. max and NaN/+inf check (one pass); temperature 0 -> first argmax.
//   2. top-k threshold tk = k-th largest logit: a streaming filter keeps the values above a running
//      threshold in a small buffer and re-selects (nth_element) when it fills. Ties at tk are kept.
//   3. e_i = exp((x_i - max) / T) for x_i >= tk (so the top token has e = 1), mass q_i = trunc(e_i 2^40).
//   4. top-p: the largest value t with mass{e >= t} >= top_p * mass(top-k set), found by bisection on
//      the bit pattern of t (monotone for non-negative floats) over a candidate set that shrinks every
//      step; min-p: e >= min_p (e is p / p_max).
//   5. draw: inverse CDF over the survivors in index order with one 64-bit Philox number keyed by
//      (seed, offset): exact fixed-point arithmetic, so the token depends only on the row itself.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks/sampling_checks.h"
#include "cpu/cpu_features.h"
#include "cpu/sampling_kernels.h"
#include "philox.h"
#include "sampling_math.h"

namespace fast_inference::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr uint32_t kOneBits = 0x3F800000u;  // bits of 1.0f, the largest e

// ---- portable primitives ----------------------------------------------------------------------

float row_max_portable(const float* x, int64_t n, bool* bad) {
  float m = kNegInf;
  bool b = false;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    b |= std::isnan(v) || v == std::numeric_limits<float>::infinity();
    m = v > m ? v : m;
  }
  *bad = b;
  return m;
}

int64_t row_argmax_portable(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (x[i] > x[best]) best = i;
  }
  return best;
}

int64_t filter_gt_portable(const float* x, int64_t n, float thr, float* out) {
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] > thr) out[cnt++] = x[i];
  }
  return cnt;
}

int64_t gather_ge_portable(const float* x, int64_t n, float thr, int32_t* idx, int64_t cap) {
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] >= thr) {
      if (cnt == cap) return -1;
      idx[cnt++] = static_cast<int32_t>(i);
    }
  }
  return cnt;
}

uint64_t exp_bits_portable(const float* x, int64_t n, float m, float inv_t, float lo, uint32_t* ebits) {
  uint64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float e = x[i] >= lo ? fi_exp((x[i] - m) * inv_t) : 0.0f;
    ebits[i] = fi_float_to_bits(e);
    total += fi_mass(ebits[i]);
  }
  return total;
}

uint64_t mass_ge_portable(const uint32_t* bits, int64_t n, uint32_t t) {
  uint64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (bits[i] >= t) total += fi_mass(bits[i]);
  }
  return total;
}

int64_t compact_portable(const uint32_t* bits, int64_t n, uint32_t t, bool keep_ge, uint32_t* out) {
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; ++i) {
    if ((bits[i] >= t) == keep_ge) out[cnt++] = bits[i];
  }
  return cnt;
}

int64_t draw_portable(const uint32_t* bits, int64_t n, uint32_t t, uint64_t r) {
  uint64_t acc = 0;
  int64_t last = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (bits[i] >= t) {
      acc += fi_mass(bits[i]);
      last = i;
      if (acc > r) return i;
    }
  }
  return last;  // unreachable when r < total; stay in range regardless
}

double sum_exp_portable(const float* x, int64_t n, float m) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += fi_exp(x[i] - m);
  return total;
}

const SamplingRowKernels kPortable{row_max_portable, row_argmax_portable, filter_gt_portable,
                                   gather_ge_portable, exp_bits_portable,   mass_ge_portable,
                                   compact_portable,   draw_portable,       sum_exp_portable};

// The AVX-512 row kernels where selected_isa() allows them (FI_CPU_ISA=portable forces the portable ones:
// the tests compare both paths), else the portable ones.
const SamplingRowKernels& row_kernels() {
  static const SamplingRowKernels* avx512 = avx512_sampling_kernels();
  if (avx512 != nullptr && selected_isa() == Isa::kAvx512) return *avx512;
  return kPortable;
}

// ---- the sample driver ------------------------------------------------------------------------

// Per-thread scratch, grown on demand and reused across calls (no allocation per row).
struct Workspace {
  std::vector<float> row;        // the row as float32 (half / bfloat16 logits)
  std::vector<float> topk;       // top-k filter buffer
  std::vector<int32_t> idx;      // small top-k path: candidate indices
  std::vector<uint32_t> cbits;   // small top-k path: candidate e bits
  std::vector<uint32_t> ebits;   // full path: e bits of the whole row
  std::vector<uint32_t> work;    // top-p bisection candidates

  template <typename T>
  static T* room(std::vector<T>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n + kVectorSlack) v.resize(n + kVectorSlack);
    return v.data();
  }
};

Workspace& thread_workspace() {
  thread_local Workspace ws;
  return ws;
}

// k-th largest value of x[0:n] for 1 <= k < n, -inf when fewer than k values exceed -inf.
float kth_largest(const SamplingRowKernels& K, const float* x, int64_t n, int64_t k, Workspace& ws) {
  const int64_t chunk = std::max<int64_t>(k, 4096);
  float* buf = Workspace::room(ws.topk, k + chunk);
  float thr = kNegInf;  // values equal to the running k-th largest cannot change it: keep only > thr
  int64_t cnt = 0;
  for (int64_t start = 0; start < n; start += chunk) {
    cnt += K.filter_gt(x + start, std::min(chunk, n - start), thr, buf + cnt);
    if (cnt > k) {
      std::nth_element(buf, buf + (k - 1), buf + cnt, std::greater<float>());
      thr = buf[k - 1];
      cnt = k;
    }
  }
  if (cnt < k) return kNegInf;
  return *std::min_element(buf, buf + k);
}

// Largest t with mass{bits >= t} >= target, by bisection over [0, bits(1.0)] (invariants: the answer
// lies in [lo, hi]; `cand` holds exactly the bits in [lo, hi]; `above` is the mass of bits > hi).
uint32_t top_p_threshold(const SamplingRowKernels& K, const uint32_t* bits, int64_t n, uint64_t target,
                         Workspace& ws) {
  uint32_t* work = Workspace::room(ws.work, n);
  const uint32_t* cand = bits;
  int64_t cnt = n;
  uint32_t lo = 0, hi = kOneBits;
  uint64_t above = 0;
  while (lo < hi && cnt > 1) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    const uint64_t mass = above + K.mass_ge(cand, cnt, mid);
    const bool keep_ge = mass >= target;
    cnt = K.compact(cand, cnt, mid, keep_ge, work);
    cand = work;
    if (keep_ge) {
      lo = mid;
    } else {
      hi = mid - 1;
      above = mass;
    }
  }
  // One candidate left: it is the answer (the mass stays below target for every larger t).
  return cnt == 1 && lo < hi ? cand[0] : lo;
}

// Applies top-p / min-p to the e bits of the kept tokens and draws one of them; returns a position in bits.
int64_t select_from_bits(const SamplingRowKernels& K, const uint32_t* bits, int64_t n, float top_p, float min_p,
                         uint64_t random64, Workspace& ws) {
  uint32_t t = min_p > 0.0f ? fi_float_to_bits(min_p) : 1u;  // 1: only e > 0 can be drawn
  if (top_p < 1.0f) {
    const uint64_t total = K.mass_ge(bits, n, 0);
    t = std::max(t, top_p_threshold(K, bits, n, fi_top_p_target(top_p, total), ws));
  }
  t = std::min(t, kOneBits);  // the top token (e = 1) always survives
  const uint64_t mass = K.mass_ge(bits, n, t);
  return K.draw(bits, n, t, fi_scale_random(random64, mass));
}

constexpr int64_t kSmallTopK = 1024;        // top-k rows up to this k work on gathered candidates
constexpr int64_t kSmallTopKCap = 8192;     // ... unless ties make the top-k set larger than this

int64_t sample_row(const SamplingRowKernels& K, const float* x, int64_t n, float temperature, int32_t top_k,
                   float top_p, float min_p, int64_t seed, int64_t offset, Workspace& ws) {
  bool bad = false;
  const float m = K.row_max(x, n, &bad);
  if (bad) return kRowHasNaN;
  if (m == kNegInf) return kRowAllNegInf;
  const float inv_t = temperature > 0.0f ? 1.0f / temperature : 0.0f;
  if (temperature <= 0.0f || !std::isfinite(inv_t)) return K.row_argmax(x, n);

  const bool use_top_k = top_k > 0 && top_k < n;
  const float tk = use_top_k ? kth_largest(K, x, n, top_k, ws) : kNegInf;
  const uint64_t random64 = philox_random64(seed, offset);
  if (use_top_k && top_k <= kSmallTopK) {
    int32_t* idx = Workspace::room(ws.idx, kSmallTopKCap);
    const int64_t cnt = K.gather_ge(x, n, tk, idx, kSmallTopKCap);
    if (cnt > 0) {
      uint32_t* cbits = Workspace::room(ws.cbits, cnt);
      for (int64_t j = 0; j < cnt; ++j) cbits[j] = fi_float_to_bits(fi_exp((x[idx[j]] - m) * inv_t));
      return idx[select_from_bits(K, cbits, cnt, top_p, min_p, random64, ws)];
    }
  }
  uint32_t* ebits = Workspace::room(ws.ebits, n);
  K.exp_bits(x, n, m, inv_t, tk, ebits);
  return select_from_bits(K, ebits, n, top_p, min_p, random64, ws);
}

// The row as contiguous float32: itself, or converted into the workspace.
template <typename scalar_t>
const float* row_as_float(const scalar_t* row, int64_t n, Workspace& ws) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    float* buf = Workspace::room(ws.row, n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[i]);
    return buf;
  }
}

// Records the first failing row across threads, then raises it on the calling thread.
struct RowError {
  std::atomic<int64_t> row{std::numeric_limits<int64_t>::max()};
  std::atomic<int64_t> code{0};
  void set(int64_t r, int64_t c) {
    int64_t cur = row.load();
    while (r < cur && !row.compare_exchange_weak(cur, r)) {
    }
    if (row.load() == r) code.store(c);
  }
  void raise_if_set() const {
    if (row.load() != std::numeric_limits<int64_t>::max()) checks::raise_bad_logits_row(row.load(), code.load());
  }
};

at::Tensor sample_cpu(const at::Tensor& logits,       // float [B, V]
                      const at::Tensor& temperature,  // f32 [B]
                      const at::Tensor& top_k,        // int32 [B]
                      const at::Tensor& top_p,        // f32 [B]
                      const at::Tensor& min_p,        // f32 [B]
                      const at::Tensor& seeds,        // int64 [B]
                      const at::Tensor& offsets) {    // int64 [B]
  checks::check_sample(logits, temperature, top_k, top_p, min_p, seeds, offsets, /*check_values=*/true);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({batch}, logits.options().dtype(at::kLong));
  const at::Tensor t = temperature.contiguous(), k = top_k.contiguous(), p = top_p.contiguous();
  const at::Tensor mp = min_p.contiguous(), s = seeds.contiguous(), o = offsets.contiguous();
  const float* tv = t.data_ptr<float>();
  const int32_t* kv = k.data_ptr<int32_t>();
  const float* pv = p.data_ptr<float>();
  const float* mv = mp.data_ptr<float>();
  const int64_t* sv = s.data_ptr<int64_t>();
  const int64_t* ov = o.data_ptr<int64_t>();
  int64_t* result = out.data_ptr<int64_t>();
  const SamplingRowKernels& K = row_kernels();
  RowError error;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    const int64_t row_stride = logits.stride(0);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      Workspace& ws = thread_workspace();
      for (int64_t b = begin; b < end; ++b) {
        const float* x = row_as_float(base + b * row_stride, vocab, ws);
        const int64_t token = sample_row(K, x, vocab, tv[b], kv[b], pv[b], mv[b], sv[b], ov[b], ws);
        if (token < 0) error.set(b, token);
        result[b] = token;
      }
    });
  });
  error.raise_if_set();
  return out;
}

// ---- penalties and logit bias ---------------------------------------------------------------

template <typename scalar_t>
void penalize_row(scalar_t* row, const int64_t* prompt, int64_t prompt_len, const int64_t* output,
                  int64_t output_len, float presence, float frequency, float repetition,
                  std::vector<int64_t>& ids) {
  // Repetition penalty (Hugging Face): each distinct prompt or generated token once.
  if (repetition != 1.0f && prompt_len + output_len > 0) {
    ids.assign(prompt, prompt + prompt_len);
    ids.insert(ids.end(), output, output + output_len);
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    for (const int64_t id : ids) {
      const float v = static_cast<float>(row[id]);
      row[id] = static_cast<scalar_t>(v > 0.0f ? v / repetition : v * repetition);
    }
  }
  // Presence and frequency penalties (OpenAI): over generated tokens, by occurrence count.
  if ((presence != 0.0f || frequency != 0.0f) && output_len > 0) {
    ids.assign(output, output + output_len);
    std::sort(ids.begin(), ids.end());
    for (size_t i = 0; i < ids.size();) {
      size_t j = i;
      while (j < ids.size() && ids[j] == ids[i]) ++j;
      const float count = static_cast<float>(j - i);
      const float v = static_cast<float>(row[ids[i]]);
      row[ids[i]] = static_cast<scalar_t>(v - (presence + frequency * count));
      i = j;
    }
  }
}

void apply_penalties_cpu(const at::Tensor& logits,              // float [B, V], in place
                         const at::Tensor& prompt_token_ids,    // int64 [total_prompt]
                         const at::Tensor& prompt_cu_lens,      // int32 [B + 1]
                         const at::Tensor& output_token_ids,    // int64 [total_output]
                         const at::Tensor& output_cu_lens,      // int32 [B + 1]
                         const at::Tensor& presence_penalty,    // f32 [B]
                         const at::Tensor& frequency_penalty,   // f32 [B]
                         const at::Tensor& repetition_penalty) {  // f32 [B]
  checks::check_penalties(logits, prompt_token_ids, prompt_cu_lens, output_token_ids, output_cu_lens,
                          presence_penalty, frequency_penalty, repetition_penalty, /*check_values=*/true);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const at::Tensor pid = prompt_token_ids.contiguous(), pcu = prompt_cu_lens.contiguous();
  const at::Tensor oid = output_token_ids.contiguous(), ocu = output_cu_lens.contiguous();
  const at::Tensor pres = presence_penalty.contiguous(), freq = frequency_penalty.contiguous();
  const at::Tensor rep = repetition_penalty.contiguous();
  const int64_t* pi = pid.data_ptr<int64_t>();
  const int64_t* oi = oid.data_ptr<int64_t>();
  const int32_t* pc = pcu.data_ptr<int32_t>();
  const int32_t* oc = ocu.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apply_penalties_cpu", [&] {
    scalar_t* base = logits.data_ptr<scalar_t>();
    const int64_t row_stride = logits.stride(0);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> ids;
      for (int64_t b = begin; b < end; ++b) {
        penalize_row(base + b * row_stride, pi + pc[b], pc[b + 1] - pc[b], oi + oc[b], oc[b + 1] - oc[b],
                     pres.data_ptr<float>()[b], freq.data_ptr<float>()[b], rep.data_ptr<float>()[b], ids);
      }
    });
  });
}

void apply_logit_bias_cpu(const at::Tensor& logits,     // float [B, V], in place
                          const at::Tensor& token_ids,  // int64 [total]
                          const at::Tensor& biases,     // f32 [total]
                          const at::Tensor& cu_lens) {  // int32 [B + 1]
  checks::check_logit_bias(logits, token_ids, biases, cu_lens, /*check_values=*/true);
  const at::Tensor ids = token_ids.contiguous(), bias = biases.contiguous(), cu = cu_lens.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* bv = bias.data_ptr<float>();
  const int32_t* c = cu.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apply_logit_bias_cpu", [&] {
    scalar_t* base = logits.data_ptr<scalar_t>();
    for (int64_t b = 0; b < logits.size(0); ++b) {
      scalar_t* row = base + b * logits.stride(0);
      // In list order, so duplicate ids add up exactly as on CUDA.
      for (int32_t i = c[b]; i < c[b + 1]; ++i) row[id[i]] = static_cast<scalar_t>(static_cast<float>(row[id[i]]) + bv[i]);
    }
  });
}

// ---- log-probabilities --------------------------------------------------------------------------

struct Scored {
  float value;
  int64_t index;
};

// The num_top largest values of x in descending order, ties by lower index, in one pass: blocks whose
// max cannot enter the current list are skipped with one vectorized max.
void top_n(const SamplingRowKernels& K, const float* x, int64_t n, int64_t num_top, std::vector<Scored>& best) {
  best.clear();
  if (num_top == 0) return;
  constexpr int64_t kBlock = 256;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    if (static_cast<int64_t>(best.size()) == num_top) {
      bool bad = false;
      if (!(K.row_max(x + start, len, &bad) > best.back().value)) continue;
    }
    for (int64_t i = start; i < start + len; ++i) {
      if (static_cast<int64_t>(best.size()) == num_top && !(x[i] > best.back().value)) continue;
      auto pos = std::upper_bound(best.begin(), best.end(), x[i],
                                  [](float v, const Scored& s) { return v > s.value; });
      best.insert(pos, Scored{x[i], i});
      if (static_cast<int64_t>(best.size()) > num_top) best.pop_back();
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compute_logprobs_cpu(const at::Tensor& logits,     // float [B, V]
                                                                    const at::Tensor& token_ids,  // int64 [B]
                                                                    int64_t num_top) {
  checks::check_logprobs(logits, token_ids, num_top, /*check_values=*/true);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  at::Tensor token_lp = at::empty({batch}, logits.options().dtype(at::kFloat));
  at::Tensor top_ids = at::empty({batch, num_top}, logits.options().dtype(at::kLong));
  at::Tensor top_lp = at::empty({batch, num_top}, logits.options().dtype(at::kFloat));
  const at::Tensor tok = token_ids.contiguous();
  const int64_t* tv = tok.data_ptr<int64_t>();
  float* out_lp = token_lp.data_ptr<float>();
  int64_t* out_ids = top_ids.data_ptr<int64_t>();
  float* out_top = top_lp.data_ptr<float>();
  const SamplingRowKernels& K = row_kernels();
  RowError error;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "compute_logprobs_cpu", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      Workspace& ws = thread_workspace();
      std::vector<Scored> best;
      for (int64_t b = begin; b < end; ++b) {
        const float* x = row_as_float(base + b * logits.stride(0), vocab, ws);
        bool bad = false;
        const float m = K.row_max(x, vocab, &bad);
        if (bad || m == -std::numeric_limits<float>::infinity()) {
          error.set(b, bad ? kRowHasNaN : kRowAllNegInf);
          continue;
        }
        const float lse = m + static_cast<float>(std::log(K.sum_exp(x, vocab, m)));
        out_lp[b] = x[tv[b]] - lse;
        top_n(K, x, vocab, num_top, best);
        for (int64_t j = 0; j < num_top; ++j) {
          out_ids[b * num_top + j] = best[j].index;
          out_top[b * num_top + j] = best[j].value - lse;
        }
      }
    });
  });
  error.raise_if_set();
  return {token_lp, top_ids, top_lp};
}

}  // namespace

const SamplingRowKernels& portable_sampling_kernels() { return kPortable; }

}  // namespace fast_inference::cpu

TORCH_LIBRARY_IMPL(fast_inference, CPU, m) {
  m.impl("sample", &fast_inference::cpu::sample_cpu);
  m.impl("apply_penalties", &fast_inference::cpu::apply_penalties_cpu);
  m.impl("apply_logit_bias", &fast_inference::cpu::apply_logit_bias_cpu);
  m.impl("compute_logprobs", &fast_inference::cpu::compute_logprobs_cpu);
}
