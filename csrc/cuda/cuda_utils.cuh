// Helpers shared by the CUDA kernels: f32/f16/bf16 <-> float, 16-byte vector loads, warp/block reductions, capture test.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fast_inference::cuda {

// Host side: whether the current stream is capturing a CUDA graph. Value checks read tensors on the host
// (a synchronisation, which a graph cannot contain), so the ops run them only when this is false.
inline bool current_stream_is_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// at:: element types -> the CUDA types the kernels compute with.
template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<c10::Half> { using type = __half; };
template <> struct CudaType<c10::BFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements of T in one 16-byte vector.
template <typename T> inline constexpr int kVec = 16 / sizeof(T);

// Read-only 16-byte load (the KV cache is not written while attention reads it).
__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// 16 bytes of T -> kVec<T> floats (the last argument only picks T).
__device__ __forceinline__ void unpack16(const uint4& raw, float* out, float) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ void unpack16(const uint4& raw, float* out, __half) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h2;
    memcpy(&h2, &words[i], 4);
    const float2 f = __half22float2(h2);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void unpack16(const uint4& raw, float* out, __nv_bfloat16) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // bf16 is the high half of an f32: widening is a shift, exact.
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// A quiet NaN: the value written for output rows whose inputs were out of range.
__device__ __forceinline__ float fault_nan() { return __int_as_float(0x7fc00000); }

// Reduction operators for warp_reduce / block_reduce.
struct MaxOp {  // fmaxf for floats: a NaN operand loses, as in the kernels' running maxima
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinOp {
  template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};
struct SumOp {
  template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// Reduces v across the 32 lanes of a full warp; every lane gets the result.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, MaxOp{}); }
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp{}); }

// Block-wide reduction for blocks of NUM_WARPS full warps; `scratch` holds NUM_WARPS values in shared
// memory. Every thread gets the result, combined in warp order (the same order on every run). Ends with
// a barrier so `scratch` can be reused right away.
template <int NUM_WARPS, typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
  v = warp_reduce(v, op);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  T r = scratch[0];
#pragma unroll
  for (int w = 1; w < NUM_WARPS; ++w) r = op(r, scratch[w]);
  __syncthreads();
  return r;
}
template <int NUM_WARPS>
__device__ __forceinline__ float block_max(float v, float* scratch) {
  return block_reduce<NUM_WARPS>(v, MaxOp{}, scratch);
}
template <int NUM_WARPS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  return block_reduce<NUM_WARPS>(v, SumOp{}, scratch);
}

}  // namespace fast_inference::cuda
