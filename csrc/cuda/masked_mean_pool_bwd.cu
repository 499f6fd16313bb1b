// Kernel 3a backward on CUDA: grid (segment, column tile); grad_hidden[t, j] = m_t / sum_seg(m)
// * grad_out[b, j] for the segment's rows (0 for an empty or fully masked segment).
#include "common.cuh"
#include "launch.h"

namespace popo {
namespace {

constexpr int kThreads = 256;

template <typename T, typename M>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const T* __restrict__ g, int64_t hsize,
                                                       const int64_t* __restrict__ cu, const M* __restrict__ mask,
                                                       T* __restrict__ grad) {
  const int64_t b = blockIdx.x;
  const int64_t j = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t t0 = cu[b], t1 = cu[b + 1];
  float count = 0.f;
  for (int64_t t = t0; t < t1; ++t) count += ld(mask + t);
  if (j >= hsize) return;
  const float gj = ld(g + b * hsize + j) * (count > 0.f ? 1.f / count : 0.f);
  for (int64_t t = t0; t < t1; ++t) st(grad + t * hsize + j, ld(mask + t) * gj);
}

template <typename T, typename M>
cudaError_t launch(const void* g, int64_t hsize, const int64_t* cu, int64_t b, const void* mask, void* grad,
                   cudaStream_t stream) {
  if (b == 0 || hsize == 0) return cudaSuccess;
  dim3 grid(unsigned(b), unsigned((hsize + kThreads - 1) / kThreads));
  bwd_kernel<T, M><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(g), hsize, cu, static_cast<const M*>(mask),
                                                  static_cast<T*>(grad));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mask(const void* g, int64_t hsize, const int64_t* cu, int64_t b, const void* mask, bool is_bool,
                        void* grad, cudaStream_t s) {
  if (is_bool) return launch<T, uint8_t>(g, hsize, cu, b, mask, grad, s);
  return launch<T, float>(g, hsize, cu, b, mask, grad, s);
}

}  // namespace

cudaError_t masked_mean_pool_bwd_cuda(const void* grad_out, DType dtype, int64_t num_tokens, int64_t hidden_size,
                                      const int64_t* cu_seqlens, int64_t num_seqs, const void* mask,
                                      bool mask_is_bool, void* grad_hidden, cudaStream_t stream) {
  (void)num_tokens;
  if (dtype == DType::F32)
    return launch_mask<float>(grad_out, hidden_size, cu_seqlens, num_seqs, mask, mask_is_bool, grad_hidden, stream);
  return launch_mask<__nv_bfloat16>(grad_out, hidden_size, cu_seqlens, num_seqs, mask, mask_is_bool, grad_hidden,
                                    stream);
}

}  // namespace popo
