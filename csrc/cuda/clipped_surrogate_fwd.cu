// Kernel 2 forward on CUDA: elementwise clipped surrogate with the statistics reduced per block
// (CUB) and accumulated with one atomicAdd per block and statistic.
#include <cub/block/block_reduce.cuh>

#include "common.cuh"
#include "launch.h"

namespace popo {
namespace {

constexpr int kThreads = 256;

struct Stats4 {
  float v[4];
};
struct Add4 {
  __device__ __forceinline__ Stats4 operator()(const Stats4& a, const Stats4& b) const {
    return {{a.v[0] + b.v[0], a.v[1] + b.v[1], a.v[2] + b.v[2], a.v[3] + b.v[3]}};
  }
};

template <typename T, typename M>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const T* __restrict__ logp, const T* __restrict__ old,
                                                       const T* __restrict__ adv, const M* __restrict__ mask,
                                                       int64_t n, float lo, float hi, T* __restrict__ loss,
                                                       float* __restrict__ stats) {
  using Reduce = cub::BlockReduce<Stats4, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  Stats4 acc{{0.f, 0.f, 0.f, 0.f}};
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    float m = ld(mask + i), a = ld(adv + i);
    float rho = __expf(m != 0.f ? ld(logp + i) - ld(old + i) : 0.f);
    float u = rho * a, c = fminf(fmaxf(rho, lo), hi) * a;
    st(loss + i, -fminf(u, c) * m);
    acc.v[0] += (a < 0.f && rho < lo) ? m : 0.f;
    acc.v[1] += (a > 0.f && rho > hi) ? m : 0.f;
    acc.v[2] += rho * m;
    acc.v[3] += m;
  }
  Stats4 total = Reduce(tmp).Reduce(acc, Add4());
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) atomicAdd(stats + k, total.v[k]);
  }
}

template <typename T, typename M>
cudaError_t launch(const void* logp, const void* old, const void* adv, const void* mask, int64_t n, float el,
                   float eh, void* loss, float* stats, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(stats, 0, 4 * sizeof(float), stream);
  if (err != cudaSuccess || n == 0) return err;
  fwd_kernel<T, M><<<grid_for(n, kThreads, 4096), kThreads, 0, stream>>>(
      static_cast<const T*>(logp), static_cast<const T*>(old), static_cast<const T*>(adv),
      static_cast<const M*>(mask), n, 1.f - el, 1.f + eh, static_cast<T*>(loss), stats);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mask(const void* logp, const void* old, const void* adv, const void* mask, bool is_bool, int64_t n,
                        float el, float eh, void* loss, float* stats, cudaStream_t s) {
  if (is_bool) return launch<T, uint8_t>(logp, old, adv, mask, n, el, eh, loss, stats, s);
  return launch<T, float>(logp, old, adv, mask, n, el, eh, loss, stats, s);
}

}  // namespace

cudaError_t clipped_surrogate_fwd_cuda(const void* logp, const void* old_logp, const void* adv, const void* mask,
                                       bool mask_is_bool, DType dtype, int64_t n, float eps_low, float eps_high,
                                       void* loss, float* stats, cudaStream_t stream) {
  if (dtype == DType::F32)
    return launch_mask<float>(logp, old_logp, adv, mask, mask_is_bool, n, eps_low, eps_high, loss, stats, stream);
  return launch_mask<__nv_bfloat16>(logp, old_logp, adv, mask, mask_is_bool, n, eps_low, eps_high, loss, stats,
                                    stream);
}

}  // namespace popo
