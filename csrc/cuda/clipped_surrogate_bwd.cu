// Kernel 2 backward on CUDA: d loss / d logp = -g*A*rho*mask unless the clipped branch is the
// strict minimum (then 0). Elementwise, grid-stride.
#include "common.cuh"
#include "launch.h"

namespace popo {
namespace {

constexpr int kThreads = 256;

template <typename T, typename M>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const T* __restrict__ g, const T* __restrict__ logp,
                                                       const T* __restrict__ old, const T* __restrict__ adv,
                                                       const M* __restrict__ mask, int64_t n, float lo, float hi,
                                                       T* __restrict__ grad) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    float m = ld(mask + i), a = ld(adv + i);
    float rho = __expf(m != 0.f ? ld(logp + i) - ld(old + i) : 0.f);
    bool clipped = (a > 0.f && rho > hi) || (a < 0.f && rho < lo);
    st(grad + i, clipped ? 0.f : -ld(g + i) * a * rho * m);
  }
}

template <typename T, typename M>
cudaError_t launch(const void* g, const void* logp, const void* old, const void* adv, const void* mask, int64_t n,
                   float el, float eh, void* grad, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  bwd_kernel<T, M><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(g), static_cast<const T*>(logp), static_cast<const T*>(old), static_cast<const T*>(adv),
      static_cast<const M*>(mask), n, 1.f - el, 1.f + eh, static_cast<T*>(grad));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mask(const void* g, const void* logp, const void* old, const void* adv, const void* mask,
                        bool is_bool, int64_t n, float el, float eh, void* grad, cudaStream_t s) {
  if (is_bool) return launch<T, uint8_t>(g, logp, old, adv, mask, n, el, eh, grad, s);
  return launch<T, float>(g, logp, old, adv, mask, n, el, eh, grad, s);
}

}  // namespace

cudaError_t clipped_surrogate_bwd_cuda(const void* grad_loss, const void* logp, const void* old_logp,
                                       const void* adv, const void* mask, bool mask_is_bool, DType dtype, int64_t n,
                                       float eps_low, float eps_high, void* grad_logp, cudaStream_t stream) {
  if (dtype == DType::F32)
    return launch_mask<float>(grad_loss, logp, old_logp, adv, mask, mask_is_bool, n, eps_low, eps_high, grad_logp,
                              stream);
  return launch_mask<__nv_bfloat16>(grad_loss, logp, old_logp, adv, mask, mask_is_bool, n, eps_low, eps_high,
                                    grad_logp, stream);
}

}  // namespace popo
