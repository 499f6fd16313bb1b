// Kernel 3a forward on CPU: masked mean of packed hidden states per segment, fp32 accumulation.
#include <vector>

#include "common.h"

namespace popo {
namespace {

template <typename T, typename M>
POPO_CLONES static void segment(const T* hidden, int64_t t0, int64_t t1, int64_t hsize, const M* mask,
                                float* acc, T* out) {
  float count = 0.f;
  for (int64_t j = 0; j < hsize; ++j) acc[j] = 0.f;
  for (int64_t t = t0; t < t1; ++t) {
    float m = float(mask[t]);
    if (m == 0.f) continue;
    count += m;
    const T* h = hidden + t * hsize;
    for (int64_t j = 0; j < hsize; ++j) acc[j] += m * to_f32(h[j]);
  }
  float inv = count > 0.f ? 1.f / count : 0.f;
  for (int64_t j = 0; j < hsize; ++j) out[j] = from_f32<T>(count > 0.f ? acc[j] * inv : 0.f);
}

template <typename T, typename M>
void run(const T* hidden, int64_t hsize, const int64_t* cu, int64_t num_seqs, const M* mask, T* out, int nt) {
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> acc(hsize);
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < num_seqs; ++b)
      segment<T, M>(hidden, cu[b], cu[b + 1], hsize, mask, acc.data(), out + b * hsize);
  }
}

template <typename T>
void run_mask(const T* hidden, int64_t hsize, const int64_t* cu, int64_t b, const void* mask, bool is_bool,
              T* out, int nt) {
  if (is_bool)
    run(hidden, hsize, cu, b, static_cast<const uint8_t*>(mask), out, nt);
  else
    run(hidden, hsize, cu, b, static_cast<const float*>(mask), out, nt);
}

}  // namespace

void masked_mean_pool_fwd_cpu(const void* hidden, DType dtype, int64_t num_tokens, int64_t hidden_size,
                              const int64_t* cu_seqlens, int64_t num_seqs, const void* mask, bool mask_is_bool,
                              void* out, int num_threads) {
  (void)num_tokens;
  if (dtype == DType::F32)
    run_mask(static_cast<const float*>(hidden), hidden_size, cu_seqlens, num_seqs, mask, mask_is_bool,
             static_cast<float*>(out), num_threads);
  else
    run_mask(static_cast<const bf16_t*>(hidden), hidden_size, cu_seqlens, num_seqs, mask, mask_is_bool,
             static_cast<bf16_t*>(out), num_threads);
}

}  // namespace popo
