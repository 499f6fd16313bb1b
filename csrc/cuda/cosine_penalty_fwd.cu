// Kernel 3b forward on CUDA: one block per row reduces <p,t>, |p|^2, |t|^2 (CUB) and adds
// -w cos / D to the scalar loss with one atomicAdd.
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
__global__ void __launch_bounds__(kThreads) fwd_kernel(const P* __restrict__ pred, const Q* __restrict__ target,
                                                       const float* __restrict__ w, const float* __restrict__ norm,
                                                       int64_t cols, float* __restrict__ loss) {
  using Reduce = cub::BlockReduce<Dots, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t b = blockIdx.x;
  Dots d{0.f, 0.f, 0.f};
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    float a = ld(pred + b * cols + j), c = ld(target + b * cols + j);
    d.pt += a * c;
    d.pp += a * a;
    d.tt += c * c;
  }
  Dots s = Reduce(tmp).Reduce(d, AddDots());
  if (threadIdx.x == 0) {
    float pn = sqrtf(s.pp), tn = sqrtf(s.tt);
    if (pn > 1e-8f && tn > 1e-8f) atomicAdd(loss, -w[b] * (s.pt / (pn * tn)) / fmaxf(*norm, 1e-30f));
  }
}

template <typename P, typename Q>
cudaError_t launch(const void* pred, const void* target, const float* w, const float* norm, int64_t rows,
                   int64_t cols, float* loss, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(loss, 0, sizeof(float), stream);
  if (err != cudaSuccess || rows == 0) return err;
  fwd_kernel<P, Q><<<unsigned(rows), kThreads, 0, stream>>>(static_cast<const P*>(pred),
                                                            static_cast<const Q*>(target), w, norm, cols, loss);
  return cudaGetLastError();
}

template <typename P>
cudaError_t launch_t(const void* pred, const void* target, DType tdt, const float* w, const float* norm, int64_t r,
                     int64_t c, float* loss, cudaStream_t s) {
  if (tdt == DType::F32) return launch<P, float>(pred, target, w, norm, r, c, loss, s);
  return launch<P, __nv_bfloat16>(pred, target, w, norm, r, c, loss, s);
}

}  // namespace

cudaError_t cosine_penalty_fwd_cuda(const void* pred, DType pred_dtype, const void* target, DType target_dtype,
                                    const float* weights, const float* normaliser, int64_t rows, int64_t cols,
                                    float* loss, cudaStream_t stream) {
  if (pred_dtype == DType::F32)
    return launch_t<float>(pred, target, target_dtype, weights, normaliser, rows, cols, loss, stream);
  return launch_t<__nv_bfloat16>(pred, target, target_dtype, weights, normaliser, rows, cols, loss, stream);
}

}  // namespace popo
