// Kernel 3a backward on CPU: each token's gradient is its segment's output gradient times
// m_t / sum_seg(m); tokens of empty segments (and masked tokens) get 0.
#include "common.h"

namespace popo {
namespace {

template <typename T, typename M>
POPO_CLONES static void segment(const T* g, int64_t t0, int64_t t1, int64_t hsize, const M* mask, T* grad) {
  float count = 0.f;
#pragma omp simd reduction(+ : count)
  for (int64_t t = t0; t < t1; ++t) count += float(mask[t]);
  float inv = count > 0.f ? 1.f / count : 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    float scale = float(mask[t]) * inv;
    T* out = grad + t * hsize;
    for (int64_t j = 0; j < hsize; ++j) out[j] = from_f32<T>(scale * to_f32(g[j]));
  }
}

template <typename T, typename M>
void run(const T* g, int64_t hsize, const int64_t* cu, int64_t num_seqs, const M* mask, T* grad, int nt) {
#pragma omp parallel for schedule(dynamic, 4) num_threads(nt)
  for (int64_t b = 0; b < num_seqs; ++b) segment<T, M>(g + b * hsize, cu[b], cu[b + 1], hsize, mask, grad);
}

template <typename T>
void run_mask(const T* g, int64_t hsize, const int64_t* cu, int64_t b, const void* mask, bool is_bool, T* grad,
              int nt) {
  if (is_bool)
    run(g, hsize, cu, b, static_cast<const uint8_t*>(mask), grad, nt);
  else
    run(g, hsize, cu, b, static_cast<const float*>(mask), grad, nt);
}

}  // namespace

void masked_mean_pool_bwd_cpu(const void* grad_out, DType dtype, int64_t num_tokens, int64_t hidden_size,
                              const int64_t* cu_seqlens, int64_t num_seqs, const void* mask, bool mask_is_bool,
                              void* grad_hidden, int num_threads) {
  (void)num_tokens;  // cu_seqlens[num_seqs] == num_tokens is checked by the binding
  if (dtype == DType::F32)
    run_mask(static_cast<const float*>(grad_out), hidden_size, cu_seqlens, num_seqs, mask, mask_is_bool,
             static_cast<float*>(grad_hidden), num_threads);
  else
    run_mask(static_cast<const bf16_t*>(grad_out), hidden_size, cu_seqlens, num_seqs, mask, mask_is_bool,
             static_cast<bf16_t*>(grad_hidden), num_threads);
}

}  // namespace popo
