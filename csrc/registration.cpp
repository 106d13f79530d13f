// The op schemas of fast_inference, all in one place, and the Python module that loads them.
//
// Each schema has a CPU implementation (csrc/cpu/) and, unless kCpuOnlyOps names it, a CUDA
// implementation (csrc/cuda/), registered with TORCH_LIBRARY_IMPL next to the kernel. Python wrappers
// with shapes and docstrings live in fast_inference/ops/, fake (meta) kernels in ops/_fake.py.
#include <Python.h>
#include <torch/library.h>

#include <iterator>

#include "checks/sampling_checks.h"
#include "cpu/cpu_features.h"

TORCH_LIBRARY(fast_inference, m) {
  // ---- KV cache ---------------------------------------------------------------------------
  // key, value: [num_tokens, num_kv_heads, head_size]
  // key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size]
  // slot_mapping: int64 [num_tokens], slot = block_id * block_size + offset; negative = padding
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slot_mapping) -> ()");
  // block_mapping: int64 [n, 2] of (src, dst) block ids, applied to every layer's caches
  m.def("copy_blocks(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, Tensor block_mapping) -> ()");
  // src, dst: [num_blocks, ...] on any devices; block_mapping: int64 [n, 2] (src, dst)
  m.def("swap_blocks(Tensor src, Tensor(a!) dst, Tensor block_mapping) -> ()");

  // ---- attention --------------------------------------------------------------------------
  // query: [num_query_tokens, num_heads, head_size]; block_tables: int32 [num_seqs, max_blocks]
  // seq_lens: int32 [num_seqs]; cu_query_lens: int32 [num_seqs + 1]
  // out: [num_query_tokens, num_heads, head_size], written in place
  m.def("paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor seq_lens, Tensor cu_query_lens, float scale, bool causal, Tensor(a!) out) -> ()");

  // ---- sampling ---------------------------------------------------------------------------
  // logits: float [B, V]; temperature f32 [B]; top_k int32 [B]; top_p f32 [B]; min_p f32 [B];
  // seeds, offsets: int64 [B]. Returns int64 [B] token ids.
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
        "Tensor seeds, Tensor offsets) -> Tensor");
  // In place on logits [B, V]. Ragged token lists: row b owns ids[cu_lens[b]:cu_lens[b+1]].
  // prompt_token_ids/output_token_ids: int64 [total]; *_cu_lens: int32 [B + 1];
  // presence_penalty, frequency_penalty, repetition_penalty: f32 [B]
  m.def("apply_penalties(Tensor(a!) logits, Tensor prompt_token_ids, Tensor prompt_cu_lens, "
        "Tensor output_token_ids, Tensor output_cu_lens, Tensor presence_penalty, "
        "Tensor frequency_penalty, Tensor repetition_penalty) -> ()");
  // In place on logits [B, V]: logits[b, token_ids[i]] += biases[i] for i in row b's range.
  // token_ids int64 [total]; biases f32 [total] (-inf masks a token: min_tokens uses this);
  // cu_lens int32 [B + 1]
  m.def("apply_logit_bias(Tensor(a!) logits, Tensor token_ids, Tensor biases, Tensor cu_lens) -> ()");
  // logits [B, V] raw (before temperature / filtering); token_ids int64 [B];
  // returns (token_logprobs f32 [B], top_ids int64 [B, num_top], top_logprobs f32 [B, num_top])
  m.def("compute_logprobs(Tensor logits, Tensor token_ids, int num_top) -> (Tensor, Tensor, Tensor)");
  // In place on logits [B, V]: logits[b, v] = -inf where bit v % 32 of bitmask[b, v / 32] is 0
  // (grammar-constrained decoding). bitmask int32 [B, ceil(V / 32)]; indices int32 [K]: the rows to
  // mask (None: all rows)
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor bitmask, Tensor? indices=None) -> ()");

  // ---- quantized weights (ggml block formats, csrc/quant_formats.h; qtype = ggml type id) --------
  // weight: float [N, K] -> uint8 [N, row_bytes]: rows of ceil(K / block) blocks, K zero-padded (Q4_0, Q4_1, Q8_0)
  m.def("quantize(Tensor weight, int qtype) -> Tensor");
  // qweight: uint8 [N, row_bytes] (or interleaved) -> [N, in_features] in dtype (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)
  m.def("dequantize(Tensor qweight, int qtype, int in_features, ScalarType dtype) -> Tensor");
  // x: [M, K] float; qweight: uint8 [N, row_bytes(qtype, K)] (or interleaved); bias: [N] or None -> [M, N] in x's dtype
  m.def("quant_linear(Tensor x, Tensor qweight, int qtype, Tensor? bias) -> Tensor");
  // qweight: plain uint8 [N, row_bytes], N % 16 == 0 -> interleaved [N / 16, nb, 16 * block_bytes]: the same bytes
  // in tiles of 16 rows x 1 block (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), which every quantized op also accepts (the CPU decode
  // GEMV's layout: one vector load covers 16 rows)
  m.def("interleave_rows(Tensor qweight, int qtype) -> Tensor");

  // ---- CPU-only ops (kCpuOnlyOps): on CUDA the model calls torch's own ops (cuBLAS, and CUDA graphs
  // remove the launch overhead these fused CPU kernels exist to avoid) --------------------------

  // ---- dense ------------------------------------------------------------------------------
  // x: [M, K]; weight: [N, K] (or bf16 VNNI tiles [N / 16, K / 32, 512], ops.vnni_tiles); bias: [N] or None;
  // returns [M, N] = x W^T + b (CPU: weight-streaming bf16 / f32 kernels for M <= 8, AMX for tiles)
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");

  // ---- norm and fused elementwise ---------------------------------------------------------
  // x: [T, H] (unit stride along H); weight: [H]; returns weight * (x / rms(x)), f32 statistics
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // residual: [T, H] contiguous, updated in place to residual + x; returns rms_norm(residual)
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  // x: [T, H, D] rotated in place (neox halves); cos, sin: [T, D] full width [c, c] and [-s, s], x's dtype
  m.def("rotary_embedding(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  // x: [T, 2 * I] = [gate | up]; returns [T, I] = silu(gate) * up
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

// The ops above with a CPU kernel only; every other op has a CUDA kernel too (.ci/run checks both ways).
constexpr const char* kCpuOnlyOps[] = {"linear", "rms_norm", "add_rms_norm", "rotary_embedding", "silu_and_mul"};

// `import fast_inference._C` loads this library, which runs the registrations above. The module has
// cpu_isa(), naming the instruction set the CPU kernels run now (benchmarks and the engine log print it),
// cpu_amx() (whether the AMX tile path is on),
// MAX_LOGPROBS (the most top logprobs per token compute_logprobs returns: the one definition Python
// reads) and CPU_ONLY_OPS (kCpuOnlyOps as a tuple of op names).
static PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fast_inference::cpu::isa_name(fast_inference::cpu::selected_isa()));
}

static PyObject* cpu_amx(PyObject*, PyObject*) { return PyBool_FromLong(fast_inference::cpu::amx_selected()); }

static PyMethodDef fast_inference_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The CPU kernels' instruction set now: avx512, avx2 or portable."},
    {"cpu_amx", cpu_amx, METH_NOARGS, "Whether the bf16 projections on VNNI tiles run on AMX now."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef fast_inference_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fast_inference_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fast_inference_module);
  if (module == nullptr) return nullptr;
  PyObject* cpu_only = PyTuple_New(std::size(kCpuOnlyOps));
  for (size_t i = 0; cpu_only != nullptr && i < std::size(kCpuOnlyOps); ++i) {
    PyTuple_SET_ITEM(cpu_only, i, PyUnicode_FromString(kCpuOnlyOps[i]));
  }
  // PyModule_AddObjectRef does not steal the reference: drop ours whatever happened.
  const bool ok = cpu_only != nullptr && PyModule_AddObjectRef(module, "CPU_ONLY_OPS", cpu_only) == 0 &&
                  PyModule_AddIntConstant(module, "MAX_LOGPROBS", fast_inference::checks::kMaxLogprobs) == 0;
  Py_XDECREF(cpu_only);
  if (!ok) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
