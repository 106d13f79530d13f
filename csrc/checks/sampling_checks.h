// Argument validation of the sampling ops, shared by the CPU and CUDA implementations.
//
// Shape, dtype and device checks run everywhere. Checks that read tensor values (NaN logits,
// parameter ranges, ragged offsets, token ids) run in C++ for CPU tensors only: on CUDA they would
// need a host synchronisation, which a CUDA graph cannot contain. For CUDA tensors the Python
// wrappers run the value checks when the stream is not capturing (fast_inference/ops/sampling.py),
// and the kernels never read or write out of bounds whatever the values.
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

// Value checks of ragged lists (CPU tensors): prefix sums from 0 to the list length, ids in [0, vocab).
inline void check_ragged_values(const at::Tensor& ids, const char* ids_name, const at::Tensor& cu_lens,
                                const char* cu_name, int64_t vocab) {
  const at::Tensor cu = cu_lens.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t batch = cu.numel() - 1;
  TORCH_CHECK(c[0] == 0, cu_name, "[0] must be 0, got ", c[0]);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(c[b + 1] >= c[b], cu_name, " must be non-decreasing, but ", cu_name, "[", b + 1, "] = ",
                c[b + 1], " < ", cu_name, "[", b, "] = ", c[b]);
  }
  TORCH_CHECK(c[batch] == ids.numel(), cu_name, "[-1] must equal the length of ", ids_name, " (",
              ids.numel(), "), got ", c[batch]);
  const at::Tensor idc = ids.contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < idc.numel(); ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < vocab, ids_name, " must hold token ids in [0, ", vocab, "), got ",
                id[i], " at position ", i);
  }
}

// Sampling parameters (CPU tensors): finite non-negative temperature, top_p in (0, 1], min_p in [0, 1].
inline void check_sampling_values(const at::Tensor& temperature, const at::Tensor& top_p,
                                  const at::Tensor& min_p) {
  const at::Tensor t = temperature.contiguous(), p = top_p.contiguous(), mp = min_p.contiguous();
  const float* tv = t.data_ptr<float>();
  const float* pv = p.data_ptr<float>();
  const float* mv = mp.data_ptr<float>();
  for (int64_t b = 0; b < t.numel(); ++b) {
    TORCH_CHECK(std::isfinite(tv[b]) && tv[b] >= 0.0f, "temperature must be finite and >= 0, got ", tv[b],
                " in row ", b);
    TORCH_CHECK(pv[b] > 0.0f && pv[b] <= 1.0f, "top_p must be in (0, 1], got ", pv[b], " in row ", b);
    TORCH_CHECK(mv[b] >= 0.0f && mv[b] <= 1.0f, "min_p must be in [0, 1], got ", mv[b], " in row ", b);
  }
}

inline void check_sample_args(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                              const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seeds,
                              const at::Tensor& offsets) {
  check_logits(logits);
  const int64_t batch = logits.size(0);
  const at::Device device = logits.device();
  check_row_param(temperature, "temperature", at::kFloat, batch, device);
  check_row_param(top_k, "top_k", at::kInt, batch, device);
  check_row_param(top_p, "top_p", at::kFloat, batch, device);
  check_row_param(min_p, "min_p", at::kFloat, batch, device);
  check_row_param(seeds, "seeds", at::kLong, batch, device);
  check_row_param(offsets, "offsets", at::kLong, batch, device);
}

inline void check_penalties_args(const at::Tensor& logits, const at::Tensor& prompt_token_ids,
                                 const at::Tensor& prompt_cu_lens, const at::Tensor& output_token_ids,
                                 const at::Tensor& output_cu_lens, const at::Tensor& presence_penalty,
                                 const at::Tensor& frequency_penalty, const at::Tensor& repetition_penalty) {
  check_logits(logits);
  const int64_t batch = logits.size(0);
  const at::Device device = logits.device();
  check_ragged(prompt_token_ids, "prompt_token_ids", prompt_cu_lens, "prompt_cu_lens", batch, device);
  check_ragged(output_token_ids, "output_token_ids", output_cu_lens, "output_cu_lens", batch, device);
  check_row_param(presence_penalty, "presence_penalty", at::kFloat, batch, device);
  check_row_param(frequency_penalty, "frequency_penalty", at::kFloat, batch, device);
  check_row_param(repetition_penalty, "repetition_penalty", at::kFloat, batch, device);
}

inline void check_penalty_values(const at::Tensor& presence_penalty, const at::Tensor& frequency_penalty,
                                 const at::Tensor& repetition_penalty) {
  const at::Tensor pr = presence_penalty.contiguous(), fr = frequency_penalty.contiguous();
  const at::Tensor rp = repetition_penalty.contiguous();
  for (int64_t b = 0; b < pr.numel(); ++b) {
    TORCH_CHECK(std::isfinite(pr.data_ptr<float>()[b]), "presence_penalty must be finite, got ",
                pr.data_ptr<float>()[b], " in row ", b);
    TORCH_CHECK(std::isfinite(fr.data_ptr<float>()[b]), "frequency_penalty must be finite, got ",
                fr.data_ptr<float>()[b], " in row ", b);
    const float r = rp.data_ptr<float>()[b];
    TORCH_CHECK(std::isfinite(r) && r > 0.0f, "repetition_penalty must be finite and > 0, got ", r, " in row ", b);
  }
}

inline void check_logit_bias_args(const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& biases,
                                  const at::Tensor& cu_lens) {
  check_logits(logits);
  check_ragged(token_ids, "token_ids", cu_lens, "cu_lens", logits.size(0), logits.device());
  TORCH_CHECK(biases.dim() == 1 && biases.size(0) == token_ids.size(0), "biases must have shape [",
              token_ids.size(0), "] like token_ids, got ", biases.sizes());
  TORCH_CHECK(biases.scalar_type() == at::kFloat, "biases must be float32, got ", biases.scalar_type());
  TORCH_CHECK(biases.device() == logits.device(), "biases must be on ", logits.device(), " like logits, got ",
              biases.device());
}

constexpr int64_t kMaxLogprobsTop = 20;

inline void check_logprobs_args(const at::Tensor& logits, const at::Tensor& token_ids, int64_t num_top) {
  check_logits(logits);
  check_row_param(token_ids, "token_ids", at::kLong, logits.size(0), logits.device());
  TORCH_CHECK(num_top >= 0 && num_top <= kMaxLogprobsTop, "num_top must be in [0, ", kMaxLogprobsTop, "], got ",
              num_top);
  TORCH_CHECK(num_top <= logits.size(1), "num_top (", num_top, ") must not exceed the vocabulary size (",
              logits.size(1), ")");
}

inline void check_token_id_values(const at::Tensor& token_ids, int64_t vocab) {
  const at::Tensor t = token_ids.contiguous();
  const int64_t* id = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < vocab, "token_ids must be in [0, ", vocab, "), got ", id[i], " in row ", i);
  }
}

}  // namespace fast_inference::checks
