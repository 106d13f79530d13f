// Argument validation of the KV-cache ops, shared by the CPU and CUDA implementations.
//
// Only metadata (dtype, shape, device, strides) is checked here, which never touches device memory.
// Value checks that need the data (slot or block id in range) are done by each implementation where
// they are cheap: on the host for CPU tensors; block_mapping of swap_blocks always lives on the host.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <utility>
#include <vector>

namespace fast_inference {

inline bool is_kv_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A paged cache: [num_blocks, block_size, num_kv_heads, head_size], contiguous, f32/f16/bf16.
inline void check_kv_cache(const at::Tensor& cache, const char* name) {
  TORCH_CHECK(cache.dim() == 4, name, " must be 4-D [num_blocks, block_size, num_kv_heads, head_size], got ",
              cache.dim(), "-D");
  TORCH_CHECK(is_kv_dtype(cache.scalar_type()), name, " must be float32, float16 or bfloat16, got ",
              cache.scalar_type());
  TORCH_CHECK(cache.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(cache.size(1) > 0 && cache.size(2) > 0 && cache.size(3) > 0, name,
              " must have non-zero block_size, num_kv_heads and head_size, got shape ", cache.sizes());
}

// block_mapping: int64 [n, 2] of (src, dst) block ids.
inline void check_block_mapping(const at::Tensor& block_mapping) {
  TORCH_CHECK(block_mapping.scalar_type() == at::kLong, "block_mapping must be int64, got ",
              block_mapping.scalar_type());
  TORCH_CHECK(block_mapping.dim() == 2 && block_mapping.size(1) == 2, "block_mapping must be [n, 2], got shape ",
              block_mapping.sizes());
  TORCH_CHECK(block_mapping.is_contiguous(), "block_mapping must be contiguous");
}

// key, value: [num_tokens, num_kv_heads, head_size] (any token/head strides, unit stride along head_size)
// key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size]; slot_mapping: int64 [num_tokens]
inline void check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                    const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_kv_cache(key_cache, "key_cache");
  check_kv_cache(value_cache, "value_cache");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache shape ", value_cache.sizes(),
              " must equal key_cache shape ", key_cache.sizes());
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), "value_cache dtype ",
              value_cache.scalar_type(), " must equal key_cache dtype ", key_cache.scalar_type());
  const auto num_kv_heads = key_cache.size(2), head_size = key_cache.size(3);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{key, "key"}, {value, "value"}}) {
    TORCH_CHECK(t.dim() == 3, name, " must be 3-D [num_tokens, num_kv_heads, head_size], got ", t.dim(), "-D");
    TORCH_CHECK(t.size(1) == num_kv_heads && t.size(2) == head_size, name, " shape ", t.sizes(),
                " does not match the cache's num_kv_heads=", num_kv_heads, " head_size=", head_size);
    TORCH_CHECK(t.scalar_type() == key_cache.scalar_type(), name, " dtype ", t.scalar_type(),
                " must equal the cache dtype ", key_cache.scalar_type());
    TORCH_CHECK(t.stride(2) == 1, name, " must have unit stride along head_size, got strides ", t.strides());
    TORCH_CHECK(t.device() == key_cache.device(), name, " is on ", t.device(), " but key_cache is on ",
                key_cache.device());
  }
  TORCH_CHECK(value.size(0) == key.size(0), "value has ", value.size(0), " tokens but key has ", key.size(0));
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64, got ", slot_mapping.scalar_type());
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0), "slot_mapping must be [num_tokens=",
              key.size(0), "], got shape ", slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.is_contiguous(), "slot_mapping must be contiguous");
  TORCH_CHECK(value_cache.device() == key_cache.device(), "value_cache is on ", value_cache.device(),
              " but key_cache is on ", key_cache.device());
  TORCH_CHECK(slot_mapping.device() == key_cache.device(), "slot_mapping is on ", slot_mapping.device(),
              " but key_cache is on ", key_cache.device());
}

// key_caches, value_caches: one cache per layer, all with the same shape, dtype and device;
// block_mapping: int64 [n, 2] on the caches' device.
inline void check_copy_blocks(const std::vector<at::Tensor>& key_caches, const std::vector<at::Tensor>& value_caches,
                              const at::Tensor& block_mapping) {
  TORCH_CHECK(key_caches.size() == value_caches.size(), "key_caches has ", key_caches.size(),
              " layers but value_caches has ", value_caches.size());
  check_block_mapping(block_mapping);
  if (key_caches.empty()) return;
  const at::Tensor& first = key_caches[0];
  check_kv_cache(first, "key_caches[0]");
  for (size_t i = 0; i < key_caches.size(); ++i) {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{key_caches[i], "key_caches"},
                                  {value_caches[i], "value_caches"}}) {
      TORCH_CHECK(t.dim() == 4 && t.sizes() == first.sizes(), name, "[", i, "] shape ", t.sizes(),
                  " must equal key_caches[0] shape ", first.sizes());
      TORCH_CHECK(t.scalar_type() == first.scalar_type(), name, "[", i, "] dtype ", t.scalar_type(),
                  " must equal key_caches[0] dtype ", first.scalar_type());
      TORCH_CHECK(t.is_contiguous(), name, "[", i, "] must be contiguous");
      TORCH_CHECK(t.device() == first.device(), name, "[", i, "] is on ", t.device(), " but key_caches[0] is on ",
                  first.device());
    }
  }
  TORCH_CHECK(block_mapping.device() == first.device(), "block_mapping is on ", block_mapping.device(),
              " but the caches are on ", first.device());
}

// src, dst: [num_blocks, ...] with the same per-block shape and dtype, contiguous, on any devices;
// block_mapping: int64 [n, 2] on the host (the copy loop reads it), ids checked here against both sizes.
inline void check_swap_blocks(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& block_mapping) {
  TORCH_CHECK(src.dim() >= 1, "src must be at least 1-D [num_blocks, ...]");
  TORCH_CHECK(dst.dim() == src.dim() && src.sizes().slice(1) == dst.sizes().slice(1), "dst shape ", dst.sizes(),
              " must match src shape ", src.sizes(), " except along num_blocks");
  TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "dst dtype ", dst.scalar_type(), " must equal src dtype ",
              src.scalar_type());
  TORCH_CHECK(src.is_contiguous(), "src must be contiguous");
  TORCH_CHECK(dst.is_contiguous(), "dst must be contiguous");
  check_block_mapping(block_mapping);
  TORCH_CHECK(block_mapping.device().is_cpu(), "block_mapping must be on the CPU, got ", block_mapping.device());
  const int64_t* pairs = block_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < block_mapping.size(0); ++i) {
    TORCH_CHECK_VALUE(pairs[2 * i] >= 0 && pairs[2 * i] < src.size(0), "block_mapping[", i, ", 0] = ", pairs[2 * i],
                " is out of range for src with ", src.size(0), " blocks");
    TORCH_CHECK_VALUE(pairs[2 * i + 1] >= 0 && pairs[2 * i + 1] < dst.size(0), "block_mapping[", i,
                ", 1] = ", pairs[2 * i + 1], " is out of range for dst with ", dst.size(0), " blocks");
  }
}

}  // namespace fast_inference
