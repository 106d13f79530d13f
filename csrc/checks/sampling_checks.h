// Argument validation of the sampling ops: one set of checks, called by the CPU and the CUDA implementations.
//
// Shape, dtype and device checks (TORCH_CHECK -> RuntimeError) read only metadata and run on every call.
// Value checks (TORCH_CHECK_VALUE -> ValueError, on both devices) read the tensors' contents: NaN logits,
// parameter ranges, ragged offsets, token ids. They read host copies (host_values), so on CUDA they
// synchronize with the device; the CUDA implementations therefore skip them while the current stream
// is capturing a CUDA graph, and their kernels never access memory out of bounds whatever the values.
#pragma once

#include <cmath>
#include <string>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "sampling_math.h"

namespace fast_inference::checks {

inline void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D [batch, vocab], got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "logits must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(logits.size(1) >= 1, "logits must have a non-empty vocabulary dimension");
  TORCH_CHECK(logits.size(1) < kMaxSamplingVocab, "logits vocabulary size ", logits.size(1),
              " exceeds the supported maximum ", kMaxSamplingVocab - 1);
  TORCH_CHECK(logits.size(0) == 0 || logits.stride(1) == 1,
              "logits must be contiguous along the vocabulary dimension (stride(1) == 1)");
}

// A per-row parameter: 1-D, `batch` entries, the given dtype, on the logits' device.
inline void check_row_param(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t batch,
                            const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, name, " must have shape [", batch,
              "] (one entry per logits row), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " like logits, got ", t.device());
}

// Ragged per-row lists: ids int64 [total] and cu_lens int32 [batch + 1].
inline void check_ragged(const at::Tensor& ids, const char* ids_name, const at::Tensor& cu_lens,
                         const char* cu_name, int64_t batch, const at::Device& device) {
  TORCH_CHECK(ids.dim() == 1, ids_name, " must be 1-D [total], got shape ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, ids_name, " must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.device() == device, ids_name, " must be on ", device, " like logits, got ", ids.device());
  TORCH_CHECK(cu_lens.dim() == 1 && cu_lens.size(0) == batch + 1, cu_name, " must have shape [",
              batch + 1, "] (batch + 1 prefix sums), got ", cu_lens.sizes());
  TORCH_CHECK(cu_lens.scalar_type() == at::kInt, cu_name, " must be int32, got ", cu_lens.scalar_type());
  TORCH_CHECK(cu_lens.device() == device, cu_name, " must be on ", device, " like logits, got ",
              cu_lens.device());
  TORCH_CHECK(ids.numel() <= INT32_MAX, ids_name, " is too long for int32 ", cu_name);
}

// The values of t readable on the host: t itself (contiguous) on the CPU, else a copy, which waits for
// the device: never called while a CUDA graph is being captured.
inline at::Tensor host_values(const at::Tensor& t) { return t.to(at::kCPU).contiguous(); }

// The error of a logits row that cannot be sampled; code is kRowHasNaN or kRowAllNegInf (sampling_math.h).
inline void raise_bad_logits_row(int64_t row, int64_t code) {
  TORCH_CHECK_VALUE(code != kRowHasNaN, "logits row ", row, " contains NaN or +inf");
  TORCH_CHECK_VALUE(false, "logits row ", row, " has no finite value (all -inf): nothing can be sampled");
}

// Every logits row has a finite maximum (no NaN or +inf, not all -inf): one reduction, then the host.
inline void check_logits_values(const at::Tensor& logits) {
  if (logits.size(0) == 0) return;
  const at::Tensor row_max = host_values(logits.amax(1).to(at::kFloat));  // NaN propagates through amax
  const float* m = row_max.data_ptr<float>();
  for (int64_t b = 0; b < row_max.numel(); ++b) {
    if (std::isnan(m[b]) || m[b] == INFINITY) raise_bad_logits_row(b, kRowHasNaN);
    if (m[b] == -INFINITY) raise_bad_logits_row(b, kRowAllNegInf);
  }
}

// Tokens written by a sample kernel: a negative entry is a row status code; raises for the first such row.
inline void check_sampled_tokens(const at::Tensor& tokens) {
  const at::Tensor t = host_values(tokens);
  const int64_t* v = t.data_ptr<int64_t>();
  for (int64_t b = 0; b < t.numel(); ++b) {
    if (v[b] < 0) raise_bad_logits_row(b, v[b]);
  }
}

// Ragged lists: prefix sums from 0 to the list length, ids in [0, vocab).
inline void check_ragged_values(const at::Tensor& ids, const char* ids_name, const at::Tensor& cu_lens,
                                const char* cu_name, int64_t vocab) {
  const at::Tensor cu = host_values(cu_lens);
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t batch = cu.numel() - 1;
  TORCH_CHECK_VALUE(c[0] == 0, cu_name, "[0] must be 0, got ", c[0]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(c[b + 1] >= c[b], cu_name, " must be non-decreasing, but ", cu_name, "[", b + 1, "] = ",
                c[b + 1], " < ", cu_name, "[", b, "] = ", c[b]);
  }
  TORCH_CHECK_VALUE(c[batch] == ids.numel(), cu_name, "[-1] must equal the length of ", ids_name, " (",
              ids.numel(), "), got ", c[batch]);
  const at::Tensor idc = host_values(ids);
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < idc.numel(); ++i) {
    TORCH_CHECK_VALUE(id[i] >= 0 && id[i] < vocab, ids_name, " must hold token ids in [0, ", vocab, "), got ",
                id[i], " at position ", i);
  }
}

// Sampling parameters: finite non-negative temperature, top_p in (0, 1], min_p in [0, 1].
inline void check_sampling_values(const at::Tensor& temperature, const at::Tensor& top_p,
                                  const at::Tensor& min_p) {
  const int64_t batch = temperature.numel();
  const at::Tensor v = host_values(at::stack({temperature, top_p, min_p}));  // one copy from a device
  const float* tv = v.data_ptr<float>();
  const float* pv = tv + batch;
  const float* mv = tv + 2 * batch;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(std::isfinite(tv[b]) && tv[b] >= 0.0f, "temperature must be finite and >= 0, got ", tv[b],
                " in row ", b);
    TORCH_CHECK_VALUE(pv[b] > 0.0f && pv[b] <= 1.0f, "top_p must be in (0, 1], got ", pv[b], " in row ", b);
    TORCH_CHECK_VALUE(mv[b] >= 0.0f && mv[b] <= 1.0f, "min_p must be in [0, 1], got ", mv[b], " in row ", b);
  }
}

// The one validation of each op, called by its CPU and its CUDA implementation alike: metadata always,
// values only when check_values (false on CUDA while the stream captures a graph: see the top of this file).
inline void check_sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                         const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seeds,
                         const at::Tensor& offsets, bool check_values) {
  check_logits(logits);
  const int64_t batch = logits.size(0);
  const at::Device device = logits.device();
  check_row_param(temperature, "temperature", at::kFloat, batch, device);
  check_row_param(top_k, "top_k", at::kInt, batch, device);
  check_row_param(top_p, "top_p", at::kFloat, batch, device);
  check_row_param(min_p, "min_p", at::kFloat, batch, device);
  check_row_param(seeds, "seeds", at::kLong, batch, device);
  check_row_param(offsets, "offsets", at::kLong, batch, device);
  if (check_values) check_sampling_values(temperature, top_p, min_p);
}

inline void check_penalty_values(const at::Tensor& presence_penalty, const at::Tensor& frequency_penalty,
                                 const at::Tensor& repetition_penalty) {
  const int64_t batch = presence_penalty.numel();
  const at::Tensor v = host_values(at::stack({presence_penalty, frequency_penalty, repetition_penalty}));
  const float* pr = v.data_ptr<float>();
  const float* fr = pr + batch;
  const float* rp = pr + 2 * batch;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(std::isfinite(pr[b]), "presence_penalty must be finite, got ", pr[b], " in row ", b);
    TORCH_CHECK_VALUE(std::isfinite(fr[b]), "frequency_penalty must be finite, got ", fr[b], " in row ", b);
    TORCH_CHECK_VALUE(std::isfinite(rp[b]) && rp[b] > 0.0f, "repetition_penalty must be finite and > 0, got ",
                      rp[b], " in row ", b);
  }
}

inline void check_penalties(const at::Tensor& logits, const at::Tensor& prompt_token_ids,
                            const at::Tensor& prompt_cu_lens, const at::Tensor& output_token_ids,
                            const at::Tensor& output_cu_lens, const at::Tensor& presence_penalty,
                            const at::Tensor& frequency_penalty, const at::Tensor& repetition_penalty,
                            bool check_values) {
  check_logits(logits);
  const int64_t batch = logits.size(0);
  const at::Device device = logits.device();
  check_ragged(prompt_token_ids, "prompt_token_ids", prompt_cu_lens, "prompt_cu_lens", batch, device);
  check_ragged(output_token_ids, "output_token_ids", output_cu_lens, "output_cu_lens", batch, device);
  check_row_param(presence_penalty, "presence_penalty", at::kFloat, batch, device);
  check_row_param(frequency_penalty, "frequency_penalty", at::kFloat, batch, device);
  check_row_param(repetition_penalty, "repetition_penalty", at::kFloat, batch, device);
  if (!check_values) return;
  const int64_t vocab = logits.size(1);
  check_ragged_values(prompt_token_ids, "prompt_token_ids", prompt_cu_lens, "prompt_cu_lens", vocab);
  check_ragged_values(output_token_ids, "output_token_ids", output_cu_lens, "output_cu_lens", vocab);
  check_penalty_values(presence_penalty, frequency_penalty, repetition_penalty);
}

inline void check_logit_bias(const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& biases,
                             const at::Tensor& cu_lens, bool check_values) {
  check_logits(logits);
  check_ragged(token_ids, "token_ids", cu_lens, "cu_lens", logits.size(0), logits.device());
  TORCH_CHECK(biases.dim() == 1 && biases.size(0) == token_ids.size(0), "biases must have shape [",
              token_ids.size(0), "] like token_ids, got ", biases.sizes());
  TORCH_CHECK(biases.scalar_type() == at::kFloat, "biases must be float32, got ", biases.scalar_type());
  TORCH_CHECK(biases.device() == logits.device(), "biases must be on ", logits.device(), " like logits, got ",
              biases.device());
  if (check_values) check_ragged_values(token_ids, "token_ids", cu_lens, "cu_lens", logits.size(1));
}

// The most top logprobs one row can ask for (OpenAI's limit), exported to Python as _C.MAX_LOGPROBS.
constexpr int64_t kMaxLogprobs = 20;

inline void check_token_id_values(const at::Tensor& token_ids, int64_t vocab) {
  const at::Tensor t = host_values(token_ids);
  const int64_t* id = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_VALUE(id[i] >= 0 && id[i] < vocab, "token_ids must be in [0, ", vocab, "), got ", id[i], " in row ", i);
  }
}

// The CUDA implementation also checks the logits' values (check_logits_values); the CPU one finds a bad row
// in its own pass over the logits.
inline void check_logprobs(const at::Tensor& logits, const at::Tensor& token_ids, int64_t num_top,
                           bool check_values) {
  check_logits(logits);
  check_row_param(token_ids, "token_ids", at::kLong, logits.size(0), logits.device());
  TORCH_CHECK_VALUE(num_top >= 0 && num_top <= kMaxLogprobs, "num_top must be in [0, ", kMaxLogprobs, "], got ",
              num_top);
  TORCH_CHECK_VALUE(num_top <= logits.size(1), "num_top (", num_top, ") must not exceed the vocabulary size (",
              logits.size(1), ")");
  if (check_values) check_token_id_values(token_ids, logits.size(1));
}

}  // namespace fast_inference::checks
