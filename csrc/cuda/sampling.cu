// CUDA sampling ops: sample, apply_penalties, apply_logit_bias, compute_logprobs (one CTA per row).
//
// sample follows the CPU algorithm (csrc/cpu/sampling.cpp) and draws the same tokens: the top-k
// threshold is a radix select on order-preserving float keys (4 passes of 8 bits), the top-p threshold
// a radix select on the bit patterns of e = exp((x - max) / T) weighted by fixed-point mass (4 passes),
// and the draw an inverse CDF over the survivors in index order with a block-wide integer scan. Every
// sum is an integer sum (order independent) and exp is sampling_math.h's fi_exp, so thresholds and
// tokens are bit-identical to the CPU. The kernels need no host synchronisation and allocate nothing
// beyond their outputs. The value checks of csrc/checks/sampling_checks.h (the CPU ops run the same
// ones) read host copies, so they are skipped while a CUDA graph is being captured; whatever the values,
// no kernel accesses memory out of bounds, and a row that cannot be sampled (NaN/+inf logits, all -inf)
// gets a negative status code instead of a token (kRowHasNaN, kRowAllNegInf), raised when not capturing.
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks/sampling_checks.h"
#include "cuda/cuda_utils.cuh"
#include "philox.h"
#include "sampling_math.h"

namespace fast_inference::cuda {
namespace {

constexpr int kSampleThreads = 512;
constexpr int kWarps = kSampleThreads / 32;
constexpr uint32_t kOneBits = 0x3F800000u;

template <typename T>
__device__ __forceinline__ float load_float(const T* p) {
  return static_cast<float>(*p);
}

// Order-preserving map of floats to unsigned keys (larger float -> larger key).
__device__ __forceinline__ uint32_t float_key(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// e = fi_exp((x - m) * inv_t) as bits, with IEEE-rounded arithmetic (no fast-math contraction).
__device__ __forceinline__ uint32_t e_bits(float x, float m, float inv_t) {
  return __float_as_uint(fi_exp(__fmul_rn(__fsub_rn(x, m), inv_t)));
}

struct SampleShared {
  unsigned long long hist[256];
  float fscratch[kWarps];
  unsigned long long uscratch[kWarps];
  int iscratch[kWarps];
  uint32_t digit;
  unsigned long long above;
  long long found;
};

// After a 256-bin histogram is complete: the largest digit d with above + (sum of bins >= d) >= need.
// Warp 0 searches (each lane owns 8 consecutive bins; suffix sums by shuffles); the result lands in
// sh.digit and sh.above (= above + the sum of the bins > d), visible to all threads on return.
__device__ void find_digit(SampleShared& sh, unsigned long long above, unsigned long long need) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    unsigned long long own = 0;
    for (int j = 0; j < 8; ++j) own += sh.hist[lane * 8 + j];
    unsigned long long suffix = own;  // sum over lanes >= lane
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long v = __shfl_down_sync(0xffffffffu, suffix, o);
      if (lane + o < 32) suffix += v;
    }
    if (lane == 0) {  // never used when the inputs hold their invariant (above < need <= above + total)
      sh.digit = 0;
      sh.above = above;
    }
    __syncwarp();
    const unsigned long long before = above + (suffix - own);
    if (before < need && before + own >= need) {
      unsigned long long cum = before;
      int d = lane * 8 + 7;
      for (; d > lane * 8; --d) {
        if (cum + sh.hist[d] >= need) break;
        cum += sh.hist[d];
      }
      sh.digit = static_cast<uint32_t>(d);
      sh.above = cum;
    }
  }
  __syncthreads();
}

// The k-th largest value of the row (1 <= k < V) by radix select on float keys.
template <typename scalar_t>
__device__ float kth_largest(const scalar_t* row, int64_t vocab, int k, SampleShared& sh) {
  uint32_t prefix = 0, mask = 0;
  unsigned long long remaining = static_cast<unsigned long long>(k);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const uint32_t key = float_key(load_float(row + i));
      if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], 1ull);
    }
    __syncthreads();
    find_digit(sh, 0, remaining);
    prefix |= sh.digit << shift;
    mask |= 255u << shift;
    remaining -= sh.above;
  }
  return key_float(prefix);
}

// Largest t with mass{e >= t among x >= tk} >= target, by radix select on e bits weighted by mass.
template <typename scalar_t>
__device__ uint32_t top_p_threshold(const scalar_t* row, int64_t vocab, float m, float inv_t, float tk,
                                    unsigned long long target, SampleShared& sh) {
  uint32_t prefix = 0, mask = 0;
  unsigned long long above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float x = load_float(row + i);
      if (!(x >= tk)) continue;
      const uint32_t bits = e_bits(x, m, inv_t);
      if ((bits & mask) == prefix) {
        const unsigned long long q = fi_mass(bits);
        if (q != 0) atomicAdd(&sh.hist[(bits >> shift) & 255u], q);
      }
    }
    __syncthreads();
    find_digit(sh, above, target);
    prefix |= sh.digit << shift;
    mask |= 255u << shift;
    above = sh.above;
  }
  return prefix;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kSampleThreads) sample_kernel(
    const scalar_t* __restrict__ logits,  // [B, V], row stride row_stride
    int64_t row_stride, int64_t vocab,
    const float* __restrict__ temperature, const int32_t* __restrict__ top_k,  // [B]
    const float* __restrict__ top_p, const float* __restrict__ min_p,          // [B]
    const int64_t* __restrict__ seeds, const int64_t* __restrict__ offsets,    // [B]
    int64_t* __restrict__ out) {                                               // [B]
  __shared__ SampleShared sh;
  const int64_t b = blockIdx.x;
  const scalar_t* row = logits + b * row_stride;

  // 1. max, and whether the row can be sampled at all
  float m = -INFINITY;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float x = load_float(row + i);
    bad |= isnan(x) || x == INFINITY;
    m = fmaxf(m, x);
  }
  bad = __syncthreads_or(bad);
  m = block_reduce<kWarps>(m, MaxOp{}, sh.fscratch);
  if (bad || m == -INFINITY) {
    if (threadIdx.x == 0) out[b] = bad ? kRowHasNaN : kRowAllNegInf;
    return;
  }

  const float temp = temperature[b];
  const float inv_t = temp > 0.0f ? __frcp_rn(temp) : 0.0f;
  if (!(temp > 0.0f) || isinf(inv_t) || isnan(temp)) {  // greedy: first index of the max
    int best = INT_MAX;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      if (load_float(row + i) == m) {
        best = static_cast<int>(i);
        break;
      }
    }
    best = block_reduce<kWarps>(best, MinOp{}, sh.iscratch);
    if (threadIdx.x == 0) out[b] = best;
    return;
  }

  // 2. top-k threshold (ties kept)
  const int k = top_k[b];
  const float tk = (k > 0 && k < vocab) ? kth_largest(row, vocab, k, sh) : -INFINITY;

  // 3. thresholds on e: min-p, then top-p over the top-k mass
  const float mp = fminf(fmaxf(min_p[b], 0.0f), 1.0f);
  uint32_t t = mp > 0.0f ? __float_as_uint(mp) : 1u;
  const float tp = top_p[b];
  if (tp < 1.0f) {
    unsigned long long total = 0;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float x = load_float(row + i);
      if (x >= tk) total += fi_mass(e_bits(x, m, inv_t));
    }
    total = block_reduce<kWarps>(total, SumOp{}, sh.uscratch);
    t = max(t, top_p_threshold(row, vocab, m, inv_t, tk, fi_top_p_target(tp, total), sh));
  }
  t = min(t, kOneBits);

  // 4. inverse-CDF draw over the survivors (x >= tk and e >= t) in index order
  unsigned long long mass = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float x = load_float(row + i);
    if (x >= tk) {
      const uint32_t bits = e_bits(x, m, inv_t);
      if (bits >= t) mass += fi_mass(bits);
    }
  }
  mass = block_reduce<kWarps>(mass, SumOp{}, sh.uscratch);
  const unsigned long long r = fi_scale_random(philox_random64(seeds[b], offsets[b]), mass);

  constexpr int kItems = 4;  // consecutive elements per thread, so thread order is index order
  if (threadIdx.x == 0) sh.found = -1;
  unsigned long long before = 0;  // survivor mass of all earlier tiles
  for (int64_t tile = 0; tile < vocab; tile += static_cast<int64_t>(kSampleThreads) * kItems) {
    const int64_t first = tile + static_cast<int64_t>(threadIdx.x) * kItems;
    unsigned long long q[kItems];
    unsigned long long own = 0;
    for (int j = 0; j < kItems; ++j) {
      q[j] = 0;
      const int64_t i = first + j;
      if (i < vocab) {
        const float x = load_float(row + i);
        if (x >= tk) {
          const uint32_t bits = e_bits(x, m, inv_t);
          if (bits >= t) q[j] = fi_mass(bits);
        }
      }
      own += q[j];
    }
    // exclusive scan of `own` across the block: warp scan, then warp totals
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned long long incl = own;
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    __syncthreads();
    if (lane == 31) sh.uscratch[warp] = incl;
    __syncthreads();
    unsigned long long warp_before = 0, tile_total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) warp_before += sh.uscratch[w];
      tile_total += sh.uscratch[w];
    }
    const unsigned long long start = before + warp_before + incl - own;
    if (own != 0 && start <= r && r < start + own) {
      unsigned long long acc = start;
      for (int j = 0; j < kItems; ++j) {
        acc += q[j];
        if (q[j] != 0 && acc > r) {
          sh.found = first + j;
          break;
        }
      }
    }
    before += tile_total;
    if (before > r) break;  // uniform across the block
  }
  __syncthreads();
  if (threadIdx.x == 0) out[b] = sh.found;
}

at::Tensor sample_cuda(const at::Tensor& logits,       // float [B, V]
                       const at::Tensor& temperature,  // f32 [B]
                       const at::Tensor& top_k,        // int32 [B]
                       const at::Tensor& top_p,        // f32 [B]
                       const at::Tensor& min_p,        // f32 [B]
                       const at::Tensor& seeds,        // int64 [B]
                       const at::Tensor& offsets) {    // int64 [B]
  const c10::cuda::CUDAGuard guard(logits.device());
  const bool check_values = !current_stream_is_capturing();
  checks::check_sample(logits, temperature, top_k, top_p, min_p, seeds, offsets, check_values);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({batch}, logits.options().dtype(at::kLong));
  if (batch == 0) return out;
  const at::Tensor t = temperature.contiguous(), k = top_k.contiguous(), p = top_p.contiguous();
  const at::Tensor mp = min_p.contiguous(), s = seeds.contiguous(), o = offsets.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_cuda", [&] {
    sample_kernel<scalar_t><<<batch, kSampleThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), vocab, t.data_ptr<float>(), k.data_ptr<int32_t>(),
        p.data_ptr<float>(), mp.data_ptr<float>(), s.data_ptr<int64_t>(), o.data_ptr<int64_t>(),
        out.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (check_values) checks::check_sampled_tokens(out);  // rows that could not be sampled hold a status code
  return out;
}

// ---- penalties ----------------------------------------------------------------------------------

constexpr int kPenaltyThreads = 256;

// One CTA per row. A shared bitmask over the vocabulary marks tokens already handled, so each distinct
// token is penalized once by the thread that claimed it (deterministic: the update is the same
// whichever thread claims it). Out-of-range ids are skipped (the value checks report them when not capturing).
template <typename scalar_t>
__global__ void __launch_bounds__(kPenaltyThreads) penalties_kernel(
    scalar_t* __restrict__ logits, int64_t row_stride, int64_t vocab,  // [B, V]
    const int64_t* __restrict__ prompt_ids, const int32_t* __restrict__ prompt_cu,  // [Tp], [B + 1]
    const int64_t* __restrict__ output_ids, const int32_t* __restrict__ output_cu,  // [To], [B + 1]
    const float* __restrict__ presence, const float* __restrict__ frequency,
    const float* __restrict__ repetition) {  // [B]
  extern __shared__ uint32_t seen[];
  const int64_t b = blockIdx.x;
  scalar_t* row = logits + b * row_stride;
  const int words = static_cast<int>((vocab + 31) / 32);
  const int p0 = prompt_cu[b], p1 = prompt_cu[b + 1], o0 = output_cu[b], o1 = output_cu[b + 1];
  const int plen = max(p1 - p0, 0), olen = max(o1 - o0, 0);
  const float rep = repetition[b], pres = presence[b], freq = frequency[b];

  if (rep != 1.0f) {
    for (int w = threadIdx.x; w < words; w += blockDim.x) seen[w] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < plen + olen; j += blockDim.x) {
      const int64_t tok = j < plen ? prompt_ids[p0 + j] : output_ids[o0 + j - plen];
      if (tok < 0 || tok >= vocab) continue;
      const uint32_t bit = 1u << (tok & 31);
      if (atomicOr(&seen[tok >> 5], bit) & bit) continue;
      const float v = static_cast<float>(row[tok]);
      row[tok] = static_cast<scalar_t>(v > 0.0f ? __fdiv_rn(v, rep) : __fmul_rn(v, rep));
    }
    __syncthreads();
  }
  if ((pres != 0.0f || freq != 0.0f) && olen > 0) {
    for (int w = threadIdx.x; w < words; w += blockDim.x) seen[w] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < olen; j += blockDim.x) {
      const int64_t tok = output_ids[o0 + j];
      if (tok < 0 || tok >= vocab) continue;
      const uint32_t bit = 1u << (tok & 31);
      if (atomicOr(&seen[tok >> 5], bit) & bit) continue;
      int count = 0;
      for (int i = 0; i < olen; ++i) count += output_ids[o0 + i] == tok;
      const float v = static_cast<float>(row[tok]);
      row[tok] = static_cast<scalar_t>(__fsub_rn(v, __fadd_rn(pres, __fmul_rn(freq, static_cast<float>(count)))));
    }
  }
}

void apply_penalties_cuda(const at::Tensor& logits,              // float [B, V], in place
                          const at::Tensor& prompt_token_ids,    // int64 [total_prompt]
                          const at::Tensor& prompt_cu_lens,      // int32 [B + 1]
                          const at::Tensor& output_token_ids,    // int64 [total_output]
                          const at::Tensor& output_cu_lens,      // int32 [B + 1]
                          const at::Tensor& presence_penalty,    // f32 [B]
                          const at::Tensor& frequency_penalty,   // f32 [B]
                          const at::Tensor& repetition_penalty) {  // f32 [B]
  const c10::cuda::CUDAGuard guard(logits.device());
  checks::check_penalties(logits, prompt_token_ids, prompt_cu_lens, output_token_ids, output_cu_lens,
                          presence_penalty, frequency_penalty, repetition_penalty, !current_stream_is_capturing());
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  if (batch == 0) return;
  const size_t smem = static_cast<size_t>((vocab + 31) / 32) * sizeof(uint32_t);
  int max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, logits.get_device()));
  TORCH_CHECK(smem <= static_cast<size_t>(max_smem), "apply_penalties: vocabulary size ", vocab,
              " needs more shared memory than this GPU has");
  const at::Tensor pid = prompt_token_ids.contiguous(), pcu = prompt_cu_lens.contiguous();
  const at::Tensor oid = output_token_ids.contiguous(), ocu = output_cu_lens.contiguous();
  const at::Tensor pres = presence_penalty.contiguous(), freq = frequency_penalty.contiguous();
  const at::Tensor rep = repetition_penalty.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apply_penalties_cuda", [&] {
    auto kernel = penalties_kernel<scalar_t>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<batch, kPenaltyThreads, smem, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), vocab, pid.data_ptr<int64_t>(), pcu.data_ptr<int32_t>(),
        oid.data_ptr<int64_t>(), ocu.data_ptr<int32_t>(), pres.data_ptr<float>(), freq.data_ptr<float>(),
        rep.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- logit bias ---------------------------------------------------------------------------------

// One thread per row, entries in list order: duplicates add up in the same order as on CPU.
template <typename scalar_t>
__global__ void logit_bias_kernel(scalar_t* __restrict__ logits, int64_t row_stride, int64_t vocab,
                                  int64_t batch, const int64_t* __restrict__ ids,       // [total]
                                  const float* __restrict__ biases,                      // [total]
                                  const int32_t* __restrict__ cu) {                      // [B + 1]
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  scalar_t* row = logits + b * row_stride;
  for (int32_t i = cu[b]; i < cu[b + 1]; ++i) {
    const int64_t tok = ids[i];
    if (tok < 0 || tok >= vocab) continue;
    row[tok] = static_cast<scalar_t>(__fadd_rn(static_cast<float>(row[tok]), biases[i]));
  }
}

void apply_logit_bias_cuda(const at::Tensor& logits,     // float [B, V], in place
                           const at::Tensor& token_ids,  // int64 [total]
                           const at::Tensor& biases,     // f32 [total]
                           const at::Tensor& cu_lens) {  // int32 [B + 1]
  const c10::cuda::CUDAGuard guard(logits.device());
  checks::check_logit_bias(logits, token_ids, biases, cu_lens, !current_stream_is_capturing());
  const int64_t batch = logits.size(0);
  if (batch == 0) return;
  const at::Tensor ids = token_ids.contiguous(), bias = biases.contiguous(), cu = cu_lens.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 128;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apply_logit_bias_cuda", [&] {
    logit_bias_kernel<scalar_t><<<(batch + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), logits.size(1), batch, ids.data_ptr<int64_t>(),
        bias.data_ptr<float>(), cu.data_ptr<int32_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- log-probabilities --------------------------------------------------------------------------

constexpr int kLogprobThreads = 256;
constexpr int kLogprobWarps = kLogprobThreads / 32;

struct Cand {
  float v;
  int i;
};
// Total order of the top list: larger value first, then lower index.
__device__ __forceinline__ bool better(Cand a, Cand b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }

// One CTA per row: max, sum of exp, and a per-thread top list merged by num_top block-wide argmax rounds.
template <typename scalar_t>
__global__ void __launch_bounds__(kLogprobThreads) logprobs_kernel(
    const scalar_t* __restrict__ logits, int64_t row_stride, int64_t vocab,  // [B, V]
    const int64_t* __restrict__ token_ids, int num_top,                     // [B]
    float* __restrict__ token_lp, int64_t* __restrict__ top_ids, float* __restrict__ top_lp) {
  __shared__ float fscratch[kLogprobWarps];
  __shared__ Cand cscratch[kLogprobWarps];
  const int64_t b = blockIdx.x;
  const scalar_t* row = logits + b * row_stride;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  Cand mine[checks::kMaxLogprobs];
  int count = 0;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float x = load_float(row + i);
    m = fmaxf(m, x);
    if (num_top == 0 || (count == num_top && !(x > mine[num_top - 1].v))) continue;
    int pos = count < num_top ? count++ : num_top - 1;
    while (pos > 0 && x > mine[pos - 1].v) {  // indices rise along the loop: equal values stay behind
      mine[pos] = mine[pos - 1];
      --pos;
    }
    mine[pos] = Cand{x, static_cast<int>(i)};
  }
  m = block_max<kLogprobWarps>(m, fscratch);
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) s += fi_exp(load_float(row + i) - m);
  s = block_sum<kLogprobWarps>(s, fscratch);
  const float lse = m + logf(s);
  if (threadIdx.x == 0) {
    const int64_t tok = token_ids[b];
    token_lp[b] = (tok >= 0 && tok < vocab) ? load_float(row + tok) - lse : NAN;
  }
  // merge the per-thread lists: num_top rounds of block argmax over the list heads
  int head = 0;
  for (int r = 0; r < num_top; ++r) {
    Cand c = head < count ? mine[head] : Cand{-INFINITY, INT_MAX};
    for (int o = 16; o > 0; o >>= 1) {
      Cand other{__shfl_xor_sync(0xffffffffu, c.v, o), __shfl_xor_sync(0xffffffffu, c.i, o)};
      if (better(other, c)) c = other;
    }
    __syncthreads();
    if (lane == 0) cscratch[warp] = c;
    __syncthreads();
    Cand best = cscratch[0];
    for (int w = 1; w < kLogprobWarps; ++w) {
      if (better(cscratch[w], best)) best = cscratch[w];
    }
    if (head < count && mine[head].i == best.i) ++head;
    if (threadIdx.x == 0) {
      top_ids[b * num_top + r] = best.i;
      top_lp[b * num_top + r] = best.v - lse;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compute_logprobs_cuda(const at::Tensor& logits,     // float [B, V]
                                                                     const at::Tensor& token_ids,  // int64 [B]
                                                                     int64_t num_top) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const bool check_values = !current_stream_is_capturing();
  checks::check_logprobs(logits, token_ids, num_top, check_values);
  if (check_values) checks::check_logits_values(logits);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  at::Tensor token_lp = at::empty({batch}, logits.options().dtype(at::kFloat));
  at::Tensor top_ids = at::empty({batch, num_top}, logits.options().dtype(at::kLong));
  at::Tensor top_lp = at::empty({batch, num_top}, logits.options().dtype(at::kFloat));
  if (batch == 0) return {token_lp, top_ids, top_lp};
  const at::Tensor tok = token_ids.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "compute_logprobs_cuda", [&] {
    logprobs_kernel<scalar_t><<<batch, kLogprobThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), vocab, tok.data_ptr<int64_t>(), static_cast<int>(num_top),
        token_lp.data_ptr<float>(), top_ids.data_ptr<int64_t>(), top_lp.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {token_lp, top_ids, top_lp};
}

}  // namespace
}  // namespace fast_inference::cuda

TORCH_LIBRARY_IMPL(fast_inference, CUDA, m) {
  m.impl("sample", &fast_inference::cuda::sample_cuda);
  m.impl("apply_penalties", &fast_inference::cuda::apply_penalties_cuda);
  m.impl("apply_logit_bias", &fast_inference::cuda::apply_logit_bias_cuda);
  m.impl("compute_logprobs", &fast_inference::cuda::compute_logprobs_cuda);
}
