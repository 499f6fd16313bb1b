// Kernel 3a forward on CUDA: grid (segment, column tile); each thread owns one hidden column and
// walks the segment's rows (coalesced across the threads), accumulating in fp32.
#include "common.cuh"
#include "launch.h"

namespace popo {
namespace {

constexpr int kThreads = 256;

template <typename T, typename M>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const T* __restrict__ hidden, int64_t hsize,
                                                       const int64_t* __restrict__ cu, const M* __restrict__ mask,
                                                       T* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const int64_t j = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t t0 = cu[b], t1 = cu[b + 1];
  float acc = 0.f, count = 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    float m = ld(mask + t);
    count += m;
    if (m != 0.f && j < hsize) acc += m * ld(hidden + t * hsize + j);
  }
  if (j < hsize) st(out + b * hsize + j, count > 0.f ? acc / count : 0.f);
}

template <typename T, typename M>
cudaError_t launch(const void* hidden, int64_t hsize, const int64_t* cu, int64_t b, const void* mask, void* out,
                   cudaStream_t stream) {
  if (b == 0 || hsize == 0) return cudaSuccess;
  dim3 grid(unsigned(b), unsigned((hsize + kThreads - 1) / kThreads));
  fwd_kernel<T, M><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(hidden), hsize, cu,
                                                  static_cast<const M*>(mask), static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mask(const void* hidden, int64_t hsize, const int64_t* cu, int64_t b, const void* mask,
                        bool is_bool, void* out, cudaStream_t s) {
  if (is_bool) return launch<T, uint8_t>(hidden, hsize, cu, b, mask, out, s);
  return launch<T, float>(hidden, hsize, cu, b, mask, out, s);
}

}  // namespace

cudaError_t masked_mean_pool_fwd_cuda(const void* hidden, DType dtype, int64_t num_tokens, int64_t hidden_size,
                                      const int64_t* cu_seqlens, int64_t num_seqs, const void* mask,
                                      bool mask_is_bool, void* out, cudaStream_t stream) {
  (void)num_tokens;
  if (dtype == DType::F32)
    return launch_mask<float>(hidden, hidden_size, cu_seqlens, num_seqs, mask, mask_is_bool, out, stream);
  return launch_mask<__nv_bfloat16>(hidden, hidden_size, cu_seqlens, num_seqs, mask, mask_is_bool, out, stream);
}

}  // namespace popo
