// fast_inference.DecoderStack: a CPU forward of the Llama-family decoder layers in C++, one call per step.
//
// Why: a batch-1 decode step of a 30-layer model is ~450 op calls. From Python each costs 5-15 us of
// interpreter, argument parsing and module bookkeeping, which on a small model is as long as the kernels
// themselves (SmolLM2-135M Q4_1: ~4 ms of weight streaming, ~4 ms of Python per step). Here the same op
// sequence runs through the dispatcher from C++ (~0.5 us per call). The arithmetic is the Python model's
// (models/llama.py DecoderLayer.forward) op for op, so outputs are bit-identical to it; the tests compare
// the two on every path (bf16 fused kernels, f32 torch ops, quantized and dense projections, q/k norm, bias).
//
// CPU only: on CUDA the model's decode step is captured into a CUDA graph, which removes the same overhead.
// The classes hold references to the model's own tensors (no copies).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fast_inference::cpu {
namespace {

template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The ops a layer calls, looked up once (the registrations run at library load, before any stack exists).
using QuantLinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&);
using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);
using RmsNormFn = at::Tensor(const at::Tensor&, const at::Tensor&, double);
using AddRmsNormFn = at::Tensor(const at::Tensor&, at::Tensor&, const at::Tensor&, double);
using RotaryFn = void(at::Tensor&, const at::Tensor&, const at::Tensor&);
using SiluAndMulFn = at::Tensor(const at::Tensor&);
using CacheFn = void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&);
using AttentionFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, double, bool, at::Tensor&);

struct Ops {
  c10::TypedOperatorHandle<QuantLinearFn> quant_linear = find_op<QuantLinearFn>("fast_inference::quant_linear");
  c10::TypedOperatorHandle<LinearFn> linear = find_op<LinearFn>("fast_inference::linear");
  c10::TypedOperatorHandle<RmsNormFn> rms_norm = find_op<RmsNormFn>("fast_inference::rms_norm");
  c10::TypedOperatorHandle<AddRmsNormFn> add_rms_norm = find_op<AddRmsNormFn>("fast_inference::add_rms_norm");
  c10::TypedOperatorHandle<RotaryFn> rotary_embedding = find_op<RotaryFn>("fast_inference::rotary_embedding");
  c10::TypedOperatorHandle<SiluAndMulFn> silu_and_mul = find_op<SiluAndMulFn>("fast_inference::silu_and_mul");
  c10::TypedOperatorHandle<CacheFn> reshape_and_cache = find_op<CacheFn>("fast_inference::reshape_and_cache");
  c10::TypedOperatorHandle<AttentionFn> paged_attention = find_op<AttentionFn>("fast_inference::paged_attention");
};

const Ops& ops() {
  static const Ops instance;
  return instance;
}

// quant_linear's decode GEMV takes up to this many rows (its M <= 8 path).
constexpr int64_t kGemvRows = 8;

// y = x W^T (+ b) exactly as the Python module it stands for computes it: models/llama.py Linear (one dense
// part, op_rows) or models/quantized.py QuantizedLinear (row groups, each quantized or dense, whose
// outputs are concatenated, the bias added to the sum).
struct Projection : torch::CustomClassHolder {
  std::vector<at::Tensor> parts;  // quantized: uint8 [rows, row_bytes] or interleaved; dense: [rows, K]
  std::vector<int64_t> qtypes;    // ggml type id of each part; -1: dense
  std::optional<at::Tensor> bias;  // [N]
  int64_t op_rows;                 // dense: inputs of at most this many rows go through fast_inference::linear

  Projection(std::vector<at::Tensor> parts, std::vector<int64_t> qtypes, std::optional<at::Tensor> bias,
             int64_t op_rows)
      : parts(std::move(parts)), qtypes(std::move(qtypes)), bias(std::move(bias)), op_rows(op_rows) {
    TORCH_CHECK(!this->parts.empty() && this->parts.size() == this->qtypes.size(),
                "Projection: parts and qtypes must be non-empty and of equal length");
  }

  at::Tensor part(const at::Tensor& x, size_t i, const std::optional<at::Tensor>& b, int64_t gemv_rows) const {
    if (qtypes[i] >= 0) {
      const int64_t T = x.size(0);
      if (gemv_rows <= 0 || T <= kGemvRows) return ops().quant_linear.call(x, parts[i], qtypes[i], b);
      std::vector<at::Tensor> chunks;
      for (int64_t r = 0; r < gemv_rows; r += kGemvRows)
        chunks.push_back(ops().quant_linear.call(x.narrow(0, r, std::min(kGemvRows, gemv_rows - r)), parts[i],
                                                 qtypes[i], b));
      if (gemv_rows < T) chunks.push_back(ops().quant_linear.call(x.narrow(0, gemv_rows, T - gemv_rows), parts[i],
                                                                  qtypes[i], b));
      return at::cat(chunks);
    }
    if (x.size(0) <= op_rows) return ops().linear.call(x, parts[i], b);
    return at::linear(x, parts[i], b);
  }

  // x [T, K] -> [T, N] in x's dtype. The first gemv_rows rows (a step's decode rows) of quantized parts run
  // kGemvRows rows at a time, so each takes the decode GEMV (int8 activation blocks, as a batch-1 step does)
  // whatever the batch: a decode row is computed the same in a batch of 32, or next to a prompt chunk, as alone,
  // at a fraction of the dequantized slabs' cost. The other rows (prompt chunks) go through quant_linear as one
  // call: above kGemvRows its exact slabs (quant.cpp: int8 activations there corrupt the attention sink's K/V).
  at::Tensor forward(const at::Tensor& x, int64_t gemv_rows) const {
    if (parts.size() == 1) return part(x, 0, bias, gemv_rows);
    std::vector<at::Tensor> outs;
    outs.reserve(parts.size());
    for (size_t i = 0; i < parts.size(); ++i) outs.push_back(part(x, i, std::nullopt, gemv_rows));
    at::Tensor y = at::cat(outs, -1);
    return bias.has_value() ? y + *bias : y;
  }
};

struct Layer {
  at::Tensor input_norm, post_norm;             // [hidden]
  std::optional<at::Tensor> q_norm, k_norm;     // [head_dim] (Qwen3)
  c10::intrusive_ptr<Projection> qkv, o, gate_up, down;
  at::Tensor key_cache, value_cache;            // [num_blocks, block_size, num_kv_heads, head_dim]
};

// x * cos + roll(x, D/2) * sin: models/llama.py _rotate, the same three torch ops.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return x * cos + at::roll(x, {x.size(-1) / 2}, {-1}) * sin;
}

struct DecoderStack : torch::CustomClassHolder {
  int64_t num_heads, num_kv_heads, head_dim, intermediate;
  double eps, scale;
  std::vector<Layer> layers;

  // scale: the attention's softmax scale as the Python model computes it (head_dim ** -0.5, bit for bit)
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate, double eps,
               double scale)
      : num_heads(num_heads), num_kv_heads(num_kv_heads), head_dim(head_dim), intermediate(intermediate), eps(eps),
        scale(scale) {}

  void add_layer(at::Tensor input_norm, at::Tensor post_norm, std::optional<at::Tensor> q_norm,
                 std::optional<at::Tensor> k_norm, c10::intrusive_ptr<Projection> qkv, c10::intrusive_ptr<Projection> o,
                 c10::intrusive_ptr<Projection> gate_up, c10::intrusive_ptr<Projection> down) {
    layers.push_back(Layer{std::move(input_norm), std::move(post_norm), std::move(q_norm), std::move(k_norm),
                           std::move(qkv), std::move(o), std::move(gate_up), std::move(down), at::Tensor(),
                           at::Tensor()});
  }

  void bind_kv_cache(std::vector<at::Tensor> key_caches, std::vector<at::Tensor> value_caches) {
    TORCH_CHECK(key_caches.size() == layers.size() && value_caches.size() == layers.size(),
                "bind_kv_cache: one key and one value cache per layer (", layers.size(), "), got ", key_caches.size(),
                " and ", value_caches.size());
    for (size_t i = 0; i < layers.size(); ++i) {
      layers[i].key_cache = key_caches[i];
      layers[i].value_cache = value_caches[i];
    }
  }

  // models/llama.py RMSNorm.forward on CPU: bf16/fp16 rows run the fused ops, float32 (and 3-D inputs, the
  // q/k norms) the transformers arithmetic in torch ops.
  at::Tensor norm(const at::Tensor& x, const at::Tensor& weight) const {
    if (x.scalar_type() != at::kFloat && x.dim() == 2) return ops().rms_norm.call(x, weight, eps);
    if (x.scalar_type() != at::kFloat) return at::rms_norm(x, {weight.size(0)}, weight, eps);
    return weight * (x * at::rsqrt(x.pow(2).mean(-1, true) + eps));
  }

  // residual += x, then the norm of the sum (the sum written into residual).
  at::Tensor add_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight) const {
    if (x.scalar_type() != at::kFloat) return ops().add_rms_norm.call(x, residual, weight, eps);
    residual = residual + x;
    return norm(residual, weight);
  }

  at::Tensor attention(const Layer& layer, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                       const at::Tensor& cu_query_lens, bool causal, int64_t decode_rows) const {
    const int64_t T = x.size(0), H = num_heads, KV = num_kv_heads, D = head_dim;
    const int64_t q_size = H * D, kv_size = KV * D;
    at::Tensor qkv = layer.qkv->forward(x, decode_rows);
    at::Tensor q, k, v;
    if (x.scalar_type() != at::kFloat && !layer.q_norm.has_value()) {
      // One in-place RoPE over the q and k heads of the fused projection; q, k, v stay views of it.
      at::Tensor heads = qkv.view({T, H + 2 * KV, D});
      at::Tensor qk = heads.narrow(1, 0, H + KV);
      ops().rotary_embedding.call(qk, cos, sin);
      q = heads.narrow(1, 0, H);
      k = heads.narrow(1, H, KV);
      v = heads.narrow(1, H + KV, KV);
    } else {
      const at::Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);  // broadcast over heads
      if (!layer.q_norm.has_value()) {
        at::Tensor qk = rotate(qkv.narrow(1, 0, q_size + kv_size).view({T, H + KV, D}), c, s);
        q = qk.narrow(1, 0, H);
        k = qk.narrow(1, H, KV);
      } else {
        q = rotate(norm(qkv.narrow(1, 0, q_size).view({T, H, D}), *layer.q_norm), c, s);
        k = rotate(norm(qkv.narrow(1, q_size, kv_size).view({T, KV, D}), *layer.k_norm), c, s);
      }
      v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, KV, D});
    }
    at::Tensor key_cache = layer.key_cache, value_cache = layer.value_cache;
    ops().reshape_and_cache.call(k, v, key_cache, value_cache, slot_mapping);
    at::Tensor out = at::empty(q.sizes(), q.options());
    ops().paged_attention.call(q, key_cache, value_cache, block_tables, seq_lens, cu_query_lens, scale, causal, out);
    return layer.o->forward(out.reshape({T, q_size}), decode_rows);
  }

  at::Tensor mlp(const Layer& layer, const at::Tensor& x, int64_t decode_rows) const {
    at::Tensor gate_up = layer.gate_up->forward(x, decode_rows);
    if (x.scalar_type() != at::kFloat) return layer.down->forward(ops().silu_and_mul.call(gate_up), decode_rows);
    return layer.down->forward(
        at::silu(gate_up.narrow(1, 0, intermediate)) * gate_up.narrow(1, intermediate, intermediate), decode_rows);
  }

  // h: the token embeddings [T, hidden]; cos, sin: [T, head_dim] in h's dtype (RotaryEmbedding.forward);
  // the rest is the step's AttentionMetadata. Returns (h, residual) after the last layer, whose sum the
  // model's final norm takes (DecoderLayer.forward's convention: each residual add fused into the next norm).
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& embeddings, const at::Tensor& cos, const at::Tensor& sin,
                                             const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                             const at::Tensor& seq_lens, const at::Tensor& cu_query_lens,
                                             bool causal) const {
    TORCH_CHECK(!layers.empty() && layers[0].key_cache.defined(), "DecoderStack: call bind_kv_cache first");
    // The step's decode rows: the leading sequences with one new token each (the scheduler puts decodes first).
    TORCH_CHECK(cu_query_lens.device().is_cpu() && cu_query_lens.scalar_type() == at::kInt &&
                    cu_query_lens.is_contiguous(),
                "DecoderStack: cu_query_lens must be a contiguous int32 CPU tensor");
    const int32_t* cu = cu_query_lens.data_ptr<int32_t>();
    int64_t decode_rows = 0;
    while (decode_rows < cu_query_lens.size(0) - 1 && cu[decode_rows + 1] - cu[decode_rows] == 1) ++decode_rows;
    at::Tensor residual = embeddings.clone();  // updated in place by the fused norms
    at::Tensor h = norm(embeddings, layers[0].input_norm);
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& layer = layers[i];
      if (i > 0) h = add_norm(h, residual, layer.input_norm);
      h = attention(layer, h, cos, sin, slot_mapping, block_tables, seq_lens, cu_query_lens, causal, decode_rows);
      h = add_norm(h, residual, layer.post_norm);
      h = mlp(layer, h, decode_rows);
    }
    return {h, residual};
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(fast_inference, m) {
  m.class_<Projection>("Projection")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::optional<at::Tensor>, int64_t>())
      .def("forward", &Projection::forward);
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &DecoderStack::add_layer)
      .def("bind_kv_cache", &DecoderStack::bind_kv_cache)
      .def("forward", &DecoderStack::forward);
}

}  // namespace fast_inference::cpu
