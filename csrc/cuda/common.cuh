// Device helpers shared by the .cu files: fp32/bf16 loads and stores, 16-byte vector access.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace popo {

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float ld(const uint8_t* p) { return *p ? 1.f : 0.f; }
template <typename T> __device__ __forceinline__ void st(T* p, float v);
template <> __device__ __forceinline__ void st<float>(float* p, float v) { *p = v; }
template <> __device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// N = 16 bytes / sizeof(T) consecutive elements, loaded or stored as one 16-byte access.
template <typename T> struct Pack {
  static constexpr int N = 16 / sizeof(T);
  union { uint4 raw; T v[N]; };
};

template <typename T>
__device__ __forceinline__ void ld_pack(const T* p, float* out) {
  Pack<T> pk;
  pk.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < Pack<T>::N; ++i) out[i] = ld(&pk.v[i]);
}

template <typename T>
__device__ __forceinline__ void st_pack(T* p, const float* in) {
  Pack<T> pk;
#pragma unroll
  for (int i = 0; i < Pack<T>::N; ++i) st(&pk.v[i], in[i]);
  *reinterpret_cast<uint4*>(p) = pk.raw;
}

// True when every row of a [rows, cols] matrix starts on a 16-byte boundary.
template <typename T>
inline bool rows_vectorizable(const void* base, int64_t cols) {
  return (reinterpret_cast<uintptr_t>(base) % 16 == 0) && (cols % Pack<T>::N == 0);
}

inline unsigned grid_for(int64_t n, int threads, unsigned cap = 65535u * 8) {
  int64_t g = (n + threads - 1) / threads;
  if (g < 1) g = 1;
  return unsigned(g < int64_t(cap) ? g : int64_t(cap));
}

}  // namespace popo
