// CPU implementations of the KV-cache ops: reshape_and_cache, copy_blocks, swap_blocks.
//
// All three are memory copies of whole head rows or whole blocks, so they are written as memcpy
// over contiguous runs, parallel with at::parallel_for. Slot and block ids are range-checked on the
// host before any byte is written, so a bad id raises instead of corrupting memory.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "checks/cache_checks.h"

namespace fast_inference {
namespace {

void check_block_ids(const at::Tensor& block_mapping, int64_t num_blocks, const char* cache_name) {
  const int64_t* pairs = block_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < block_mapping.size(0); ++i) {
    for (int j = 0; j < 2; ++j) {
      TORCH_CHECK_VALUE(pairs[2 * i + j] >= 0 && pairs[2 * i + j] < num_blocks, "block_mapping[", i, ", ", j, "] = ",
                  pairs[2 * i + j], " is out of range for ", cache_name, " with ", num_blocks, " blocks");
    }
  }
}

}  // namespace

// key, value: [num_tokens, num_kv_heads, head_size]; caches: [num_blocks, block_size, num_kv_heads, head_size]
// slot_mapping: int64 [num_tokens]
void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  const int64_t num_tokens = key.size(0);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_tokens; ++i) {
    TORCH_CHECK_VALUE(slots[i] < num_slots, "slot_mapping[", i, "] = ", slots[i], " is out of range for a cache of ",
                num_slots, " slots");
  }
  const int64_t num_kv_heads = key_cache.size(2);
  const int64_t elem = key_cache.element_size();
  const int64_t row_bytes = key_cache.size(3) * elem;   // one head of one token
  const int64_t slot_bytes = num_kv_heads * row_bytes;  // all heads of one token (cache is contiguous)
  char* kc = static_cast<char*>(key_cache.data_ptr());
  char* vc = static_cast<char*>(value_cache.data_ptr());
  const char* k = static_cast<const char*>(key.data_ptr());
  const char* v = static_cast<const char*>(value.data_ptr());
  const int64_t ks0 = key.stride(0) * elem, ks1 = key.stride(1) * elem;
  const int64_t vs0 = value.stride(0) * elem, vs1 = value.stride(1) * elem;
  at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (slots[i] < 0) continue;  // padding token
      char* kdst = kc + slots[i] * slot_bytes;
      char* vdst = vc + slots[i] * slot_bytes;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        std::memcpy(kdst + h * row_bytes, k + i * ks0 + h * ks1, row_bytes);
        std::memcpy(vdst + h * row_bytes, v + i * vs0 + h * vs1, row_bytes);
      }
    }
  });
}

// key_caches, value_caches: per layer [num_blocks, block_size, num_kv_heads, head_size]; block_mapping: int64 [n, 2]
void copy_blocks_cpu(at::TensorList key_caches_list, at::TensorList value_caches_list,
                     const at::Tensor& block_mapping) {
  std::vector<at::Tensor> key_caches(key_caches_list.begin(), key_caches_list.end());
  std::vector<at::Tensor> value_caches(value_caches_list.begin(), value_caches_list.end());
  check_copy_blocks(key_caches, value_caches, block_mapping);
  if (key_caches.empty() || block_mapping.size(0) == 0) return;
  check_block_ids(block_mapping, key_caches[0].size(0), "key_caches");
  const int64_t num_layers = key_caches.size();
  const int64_t num_pairs = block_mapping.size(0);
  const int64_t block_bytes = key_caches[0].stride(0) * key_caches[0].element_size();
  const int64_t* pairs = block_mapping.data_ptr<int64_t>();
  // One work item per (layer, pair, key|value): each is a block_bytes memcpy.
  at::parallel_for(0, num_layers * num_pairs * 2, 16, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t layer = w / (2 * num_pairs), pair = (w / 2) % num_pairs;
      char* base = static_cast<char*>((w % 2 == 0 ? key_caches : value_caches)[layer].data_ptr());
      std::memcpy(base + pairs[2 * pair + 1] * block_bytes, base + pairs[2 * pair] * block_bytes, block_bytes);
    }
  });
}

// src, dst: [num_blocks, ...] on the CPU; block_mapping: int64 [n, 2] on the CPU
void swap_blocks_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping) {
  check_swap_blocks(src, dst, block_mapping);
  TORCH_CHECK(src.device().is_cpu() && dst.device().is_cpu(), "swap_blocks on the CPU needs src and dst on the CPU, got ",
              src.device(), " and ", dst.device());
  const int64_t num_pairs = block_mapping.size(0);
  if (num_pairs == 0 || src.numel() == 0) return;
  const int64_t block_bytes = src.stride(0) * src.element_size();
  const int64_t* pairs = block_mapping.data_ptr<int64_t>();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, num_pairs, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(d + pairs[2 * i + 1] * block_bytes, s + pairs[2 * i] * block_bytes, block_bytes);
    }
  });
}

TORCH_LIBRARY_IMPL(fast_inference, CPU, m) {
  m.impl("reshape_and_cache", &reshape_and_cache_cpu);
  m.impl("copy_blocks", &copy_blocks_cpu);
  m.impl("swap_blocks", &swap_blocks_cpu);
}

}  // namespace fast_inference
