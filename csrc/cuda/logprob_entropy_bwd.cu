// Kernel 1 backward on CUDA: one block per token row writes d(logits) = g_lp*(onehot - p)
// - g_ent*p*(z - logZ + H) in the logits' dtype, 16 bytes at a time; nothing else is stored.
// Columns from `valid` on are vocabulary padding: they get 0 (packs wholly in it are not read).
// p*(g_lp + g_ent*(lp + H)) is computed as p*g_lp + (p*g_ent)*(lp + H): p = 0 then gives 0 even
// where g_ent*(lp + H) would overflow (lp ~ -1.7e38 for bf16 padding at finfo.min/2).
#include "common.cuh"
#include "launch.h"

namespace popo {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float grad_of(float x, float lz, float h, float glp, float gent, bool is_target) {
  float lp = x - lz, p = __expf(lp);
  return (is_target ? glp : 0.f) - (p * glp + (p * gent) * (lp + h));
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const T* __restrict__ logits, int64_t cols, int64_t valid,
                                                       const int64_t* __restrict__ target, int64_t vocab_start,
                                                       const float* __restrict__ logz, const float* __restrict__ ent,
                                                       const float* __restrict__ g_lp, const float* __restrict__ g_ent,
                                                       T* __restrict__ grad) {
  const int64_t r = blockIdx.x;
  const T* z = logits + r * cols;
  T* out = grad + r * cols;
  const float lz = logz[r], h = ent[r], glp = g_lp[r], gent = g_ent[r];
  const int64_t local = target[r] - vocab_start;
  if (kVec) {
    constexpr int N = Pack<T>::N;
    for (int64_t v = int64_t(threadIdx.x) * N; v < cols; v += int64_t(kThreads) * N) {
      float x[N];
      if (v < valid) {
        ld_pack(z + v, x);
#pragma unroll
        for (int i = 0; i < N; ++i) x[i] = v + i < valid ? grad_of(x[i], lz, h, glp, gent, v + i == local) : 0.f;
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) x[i] = 0.f;
      }
      st_pack(out + v, x);
    }
  } else {
    for (int64_t v = threadIdx.x; v < cols; v += kThreads)
      st(out + v, v < valid ? grad_of(ld(z + v), lz, h, glp, gent, v == local) : 0.f);
  }
}

template <typename T>
cudaError_t launch(const void* logits, int64_t rows, int64_t cols, int64_t valid, const int64_t* target,
                   int64_t vocab_start, const float* logz, const float* ent, const float* g_lp, const float* g_ent,
                   void* grad, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const T* z = static_cast<const T*>(logits);
  T* g = static_cast<T*>(grad);
  if (rows_vectorizable<T>(logits, cols) && rows_vectorizable<T>(grad, cols))
    bwd_kernel<T, true><<<unsigned(rows), kThreads, 0, stream>>>(z, cols, valid, target, vocab_start, logz, ent,
                                                                 g_lp, g_ent, g);
  else
    bwd_kernel<T, false><<<unsigned(rows), kThreads, 0, stream>>>(z, cols, valid, target, vocab_start, logz, ent,
                                                                  g_lp, g_ent, g);
  return cudaGetLastError();
}

}  // namespace

cudaError_t logprob_entropy_bwd_cuda(const void* logits, DType dtype, int64_t rows, int64_t cols, int64_t valid,
                                     const int64_t* target, int64_t vocab_start, const float* logz,
                                     const float* entropy, const float* grad_logp, const float* grad_entropy,
                                     void* grad, cudaStream_t stream) {
  if (dtype == DType::F32)
    return launch<float>(logits, rows, cols, valid, target, vocab_start, logz, entropy, grad_logp, grad_entropy, grad,
                         stream);
  return launch<__nv_bfloat16>(logits, rows, cols, valid, target, vocab_start, logz, entropy, grad_logp, grad_entropy,
                               grad, stream);
}

}  // namespace popo
