// Kernel 3b backward on CUDA: one block per row reduces the dots, then writes
// d loss / d pred = -(g w / D) (t / (|p||t|) - cos p / |p|^2), or 0 for a degenerate pair.
#include <cub/block/block_reduce.cuh>

#include "common.cuh"
#include "launch.h"

namespace popo {
namespace {

constexpr int kThreads = 256;

struct Dots {
  float pt, pp, tt;
};
struct AddDots {
  __device__ __forceinline__ Dots operator()(const Dots& a, const Dots& b) const {
    return {a.pt + b.pt, a.pp + b.pp, a.tt + b.tt};
  }
};

template <typename P, typename Q>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const float* __restrict__ g, const P* __restrict__ pred,
                                                       const Q* __restrict__ target, const float* __restrict__ w,
                                                       const float* __restrict__ norm, int64_t cols,
                                                       P* __restrict__ grad) {
  using Reduce = cub::BlockReduce<Dots, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float coef_t, coef_p;
  const int64_t b = blockIdx.x;
  const P* p = pred + b * cols;
  const Q* t = target + b * cols;
  Dots d{0.f, 0.f, 0.f};
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    float a = ld(p + j), c = ld(t + j);
    d.pt += a * c;
    d.pp += a * a;
    d.tt += c * c;
  }
  Dots s = Reduce(tmp).Reduce(d, AddDots());
  if (threadIdx.x == 0) {
    float pn = sqrtf(s.pp), tn = sqrtf(s.tt);
    if (pn > 1e-8f && tn > 1e-8f) {
      float coef = -(*g) * w[b] / fmaxf(*norm, 1e-30f);
      float inv = 1.f / (pn * tn);
      coef_t = coef * inv;
      coef_p = -coef * (s.pt * inv) / s.pp;
    } else {
      coef_t = 0.f;
      coef_p = 0.f;
    }
  }
  __syncthreads();
  const float ct = coef_t, cp = coef_p;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) st(grad + b * cols + j, ct * ld(t + j) + cp * ld(p + j));
}

template <typename P, typename Q>
cudaError_t launch(const float* g, const void* pred, const void* target, const float* w, const float* norm,
                   int64_t rows, int64_t cols, void* grad, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  bwd_kernel<P, Q><<<unsigned(rows), kThreads, 0, stream>>>(g, static_cast<const P*>(pred),
                                                            static_cast<const Q*>(target), w, norm, cols,
                                                            static_cast<P*>(grad));
  return cudaGetLastError();
}

template <typename P>
cudaError_t launch_t(const float* g, const void* pred, const void* target, DType tdt, const float* w,
                     const float* norm, int64_t r, int64_t c, void* grad, cudaStream_t s) {
  if (tdt == DType::F32) return launch<P, float>(g, pred, target, w, norm, r, c, grad, s);
  return launch<P, __nv_bfloat16>(g, pred, target, w, norm, r, c, grad, s);
}

}  // namespace

cudaError_t cosine_penalty_bwd_cuda(const float* grad_loss, const void* pred, DType pred_dtype, const void* target,
                                    DType target_dtype, const float* weights, const float* normaliser, int64_t rows,
                                    int64_t cols, void* grad_pred, cudaStream_t stream) {
  if (pred_dtype == DType::F32)
    return launch_t<float>(grad_loss, pred, target, target_dtype, weights, normaliser, rows, cols, grad_pred, stream);
  return launch_t<__nv_bfloat16>(grad_loss, pred, target, target_dtype, weights, normaliser, rows, cols, grad_pred,
                                 stream);
}

}  // namespace popo
