// CUDA implementations of the KV-cache ops: reshape_and_cache, copy_blocks (one kernel for all layers), swap_blocks.
//
// The kernels copy bytes, so they are dtype-agnostic: each is compiled for a few copy-unit widths
// (16, 8, 4, 2 bytes) and the widest unit that divides every size, stride and base address is used.
// Ids read on the device (slot_mapping, copy_blocks' block_mapping) cannot be checked on the host
// without a sync: a slot or block id out of range is skipped on the device (nothing is read or
// written out of bounds). swap_blocks reads its block_mapping on the host (it must be a CPU int64
// tensor, as in vLLM) and checks every id before copying.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks/cache_checks.h"

namespace fast_inference {

namespace {

// Widest copy unit (16, 8, 4 or 2 bytes; else 1) dividing every value.
int copy_unit(std::initializer_list<int64_t> values) {
  for (int unit : {16, 8, 4, 2}) {
    bool ok = true;
    for (int64_t v : values) ok = ok && v % unit == 0;
    if (ok) return unit;
  }
  return 1;
}

template <int N> struct Unit;
template <> struct Unit<16> { using type = uint4; };
template <> struct Unit<8> { using type = uint2; };
template <> struct Unit<4> { using type = uint32_t; };
template <> struct Unit<2> { using type = uint16_t; };
template <> struct Unit<1> { using type = uint8_t; };

// grid (num_tokens), block 128. Strides in bytes; row_bytes = head_size * element size.
template <typename U>
__global__ void reshape_and_cache_kernel(const char* __restrict__ key,      // [num_tokens, num_kv_heads, head_size]
                                         const char* __restrict__ value,    // [num_tokens, num_kv_heads, head_size]
                                         char* __restrict__ key_cache,      // [num_blocks, block_size, num_kv_heads, head_size]
                                         char* __restrict__ value_cache,    // same as key_cache
                                         const int64_t* __restrict__ slot_mapping,  // [num_tokens]
                                         int64_t key_tok_stride, int64_t key_head_stride,
                                         int64_t value_tok_stride, int64_t value_head_stride,
                                         int64_t num_slots, int num_kv_heads, int row_units) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;  // padding (negative) or out of range: nothing to write
  const int64_t slot_bytes = (int64_t)num_kv_heads * row_units * sizeof(U);
  U* kc = reinterpret_cast<U*>(key_cache + slot * slot_bytes);
  U* vc = reinterpret_cast<U*>(value_cache + slot * slot_bytes);
  for (int i = threadIdx.x; i < num_kv_heads * row_units; i += blockDim.x) {
    const int h = i / row_units, u = i - h * row_units;
    kc[i] = reinterpret_cast<const U*>(key + token * key_tok_stride + h * key_head_stride)[u];
    vc[i] = reinterpret_cast<const U*>(value + token * value_tok_stride + h * value_head_stride)[u];
  }
}

// grid (num_pairs, 2 * num_layers), block 256: one block copy of one cache.
template <typename U>
__global__ void copy_blocks_kernel(const int64_t* __restrict__ cache_ptrs,     // [2 * num_layers] addresses
                                   const int64_t* __restrict__ block_mapping,  // [num_pairs, 2]
                                   int64_t num_blocks, int64_t block_units) {
  const int64_t pair = blockIdx.x;
  const int64_t src = block_mapping[2 * pair], dst = block_mapping[2 * pair + 1];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;  // out of range: skipped
  U* cache = reinterpret_cast<U*>(cache_ptrs[blockIdx.y]);
  const U* from = cache + src * block_units;
  U* to = cache + dst * block_units;
  for (int64_t i = threadIdx.x; i < block_units; i += blockDim.x) to[i] = from[i];
}

template <int N>
void launch_reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                              at::Tensor& value_cache, const at::Tensor& slot_mapping, cudaStream_t stream) {
  const int64_t es = key.element_size();
  const int row_units = static_cast<int>(key.size(2) * es / N);
  reshape_and_cache_kernel<typename Unit<N>::type><<<key.size(0), 128, 0, stream>>>(
      static_cast<const char*>(key.data_ptr()), static_cast<const char*>(value.data_ptr()),
      static_cast<char*>(key_cache.data_ptr()), static_cast<char*>(value_cache.data_ptr()),
      slot_mapping.data_ptr<int64_t>(), key.stride(0) * es, key.stride(1) * es, value.stride(0) * es,
      value.stride(1) * es, key_cache.size(0) * key_cache.size(1), static_cast<int>(key.size(1)), row_units);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int N>
void launch_copy_blocks(const at::Tensor& ptrs, const at::Tensor& mapping, int64_t num_caches, int64_t num_blocks,
                        int64_t block_bytes, cudaStream_t stream) {
  const dim3 grid(mapping.size(0), num_caches);
  copy_blocks_kernel<typename Unit<N>::type><<<grid, 256, 0, stream>>>(
      ptrs.data_ptr<int64_t>(), mapping.data_ptr<int64_t>(), num_blocks, block_bytes / N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t address(const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())); }

}  // namespace

// key, value: [num_tokens, num_kv_heads, head_size]; caches: [num_blocks, block_size, num_kv_heads, head_size]
// slot_mapping: int64 [num_tokens] on the caches' device.
void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  TORCH_CHECK(key_cache.is_cuda(), "key_cache must be a CUDA tensor, got ", key_cache.device());
  const int64_t num_tokens = key.size(0);
  if (num_tokens == 0 || key_cache.numel() == 0) return;
  TORCH_CHECK(key.size(1) * key.size(2) <= INT32_MAX, "key: num_kv_heads * head_size is too large");
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t es = key.element_size();
  const int unit = copy_unit({key.size(2) * es, key.stride(0) * es, key.stride(1) * es, value.stride(0) * es,
                              value.stride(1) * es, address(key), address(value), address(key_cache),
                              address(value_cache)});
  switch (unit) {
    case 16: launch_reshape_and_cache<16>(key, value, key_cache, value_cache, slot_mapping, stream); break;
    case 8: launch_reshape_and_cache<8>(key, value, key_cache, value_cache, slot_mapping, stream); break;
    case 4: launch_reshape_and_cache<4>(key, value, key_cache, value_cache, slot_mapping, stream); break;
    case 2: launch_reshape_and_cache<2>(key, value, key_cache, value_cache, slot_mapping, stream); break;
    default: launch_reshape_and_cache<1>(key, value, key_cache, value_cache, slot_mapping, stream); break;
  }
}

// key_caches, value_caches: per layer [num_blocks, block_size, num_kv_heads, head_size] on one CUDA device;
// block_mapping: int64 [n, 2] on that device. The pairs are copied in parallel, so no pair's dst may be
// another pair's src (the block manager's copy-on-write never produces such chains).
// (C++ argument types must equal the CPU kernel's: the dispatcher rejects differing signatures.)
void copy_blocks_cuda(at::TensorList key_caches_list, at::TensorList value_caches_list,
                      const at::Tensor& block_mapping) {
  const std::vector<at::Tensor> key_caches(key_caches_list.begin(), key_caches_list.end());
  const std::vector<at::Tensor> value_caches(value_caches_list.begin(), value_caches_list.end());
  check_copy_blocks(key_caches, value_caches, block_mapping);
  if (key_caches.empty() || block_mapping.size(0) == 0) return;
  const at::Tensor& first = key_caches[0];
  TORCH_CHECK(first.is_cuda(), "key_caches must be CUDA tensors, got ", first.device());
  TORCH_CHECK(block_mapping.size(0) <= INT32_MAX && key_caches.size() <= 32767,
              "copy_blocks: too many pairs or layers for one launch");
  const c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t num_caches = 2 * static_cast<int64_t>(key_caches.size());
  const int64_t block_bytes = first.numel() / std::max<int64_t>(first.size(0), 1) * first.element_size();
  std::vector<int64_t> addresses;
  addresses.reserve(num_caches);
  for (const auto& t : key_caches) addresses.push_back(address(t));
  for (const auto& t : value_caches) addresses.push_back(address(t));
  std::vector<int64_t> divisible(addresses);
  divisible.push_back(block_bytes);
  int unit = 16;
  for (int64_t v : divisible) unit = std::min(unit, copy_unit({v}));
  // The address table goes to the device on the current stream. Its pageable source is consumed
  // (staged by the driver) before cudaMemcpyAsync returns, so `addresses` may die right after.
  const at::Tensor ptrs = at::from_blob(addresses.data(), {num_caches}, at::TensorOptions().dtype(at::kLong))
                              .to(first.device(), /*non_blocking=*/true);
  const int64_t num_blocks = first.size(0);
  switch (unit) {
    case 16: launch_copy_blocks<16>(ptrs, block_mapping, num_caches, num_blocks, block_bytes, stream); break;
    case 8: launch_copy_blocks<8>(ptrs, block_mapping, num_caches, num_blocks, block_bytes, stream); break;
    case 4: launch_copy_blocks<4>(ptrs, block_mapping, num_caches, num_blocks, block_bytes, stream); break;
    case 2: launch_copy_blocks<2>(ptrs, block_mapping, num_caches, num_blocks, block_bytes, stream); break;
    default: launch_copy_blocks<1>(ptrs, block_mapping, num_caches, num_blocks, block_bytes, stream); break;
  }
}

// src, dst: [num_blocks, ...] contiguous, on CUDA and/or CPU (pinned host memory makes the copies
// asynchronous); block_mapping: int64 [n, 2] on the CPU. One cudaMemcpyAsync per pair on the
// current stream of the CUDA side.
void swap_blocks_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping) {
  check_swap_blocks(src, dst, block_mapping);  // also checks every id against both sizes
  TORCH_CHECK(src.is_cuda() || dst.is_cuda(), "swap_blocks: src or dst must be a CUDA tensor");
  TORCH_CHECK(src.is_cuda() || src.is_cpu(), "src must be on the CPU or a CUDA device, got ", src.device());
  TORCH_CHECK(dst.is_cuda() || dst.is_cpu(), "dst must be on the CPU or a CUDA device, got ", dst.device());
  const int64_t n = block_mapping.size(0);
  if (n == 0) return;
  const at::Device device = src.is_cuda() ? src.device() : dst.device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t block_bytes = src.numel() / std::max<int64_t>(src.size(0), 1) * src.element_size();
  const char* from = static_cast<const char*>(src.data_ptr());
  char* to = static_cast<char*>(dst.data_ptr());
  const int64_t* pairs = block_mapping.data_ptr<int64_t>();
  const bool peer = src.is_cuda() && dst.is_cuda() && src.device() != dst.device();
  const cudaMemcpyKind kind = src.is_cuda() ? (dst.is_cuda() ? cudaMemcpyDeviceToDevice : cudaMemcpyDeviceToHost)
                                            : cudaMemcpyHostToDevice;
  for (int64_t i = 0; i < n; ++i) {
    const char* s = from + pairs[2 * i] * block_bytes;
    char* d = to + pairs[2 * i + 1] * block_bytes;
    if (peer) {
      C10_CUDA_CHECK(cudaMemcpyPeerAsync(d, dst.device().index(), s, src.device().index(), block_bytes, stream));
    } else {
      C10_CUDA_CHECK(cudaMemcpyAsync(d, s, block_bytes, kind, stream));
    }
  }
}

TORCH_LIBRARY_IMPL(fast_inference, CUDA, m) {
  m.impl("reshape_and_cache", &reshape_and_cache_cuda);
  m.impl("copy_blocks", &copy_blocks_cuda);
  m.impl("swap_blocks", &swap_blocks_cuda);
}

}  // namespace fast_inference
