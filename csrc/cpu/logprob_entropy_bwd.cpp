// Kernel 1 backward on CPU: d(logits) = g_lp*(onehot - p) - g_ent*p*(z - logZ + H), written
// straight into the gradient buffer (logits' dtype); no fp32 softmax of the shard is stored.
// Padding columns [valid, cols) get 0 and are not read.
#include "common.h"

namespace popo {
namespace {

template <typename T>
POPO_CLONES static void row_grad(const T* z, int64_t cols, float logz, float h, float glp, float gent, T* out) {
#pragma omp simd
  for (int64_t v = 0; v < cols; ++v) {
    float lp = to_f32(z[v]) - logz;
    float p = exp_approx(lp);
    out[v] = from_f32<T>(-(p * glp + (p * gent) * (lp + h)));  // p first: p = 0 stays 0 for any lp
  }
}

template <typename T>
void run(const T* logits, int64_t rows, int64_t cols, int64_t valid, const int64_t* target, int64_t vocab_start,
         const float* logz, const float* entropy, const float* g_lp, const float* g_ent, T* grad,
         int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t r = 0; r < rows; ++r) {
    const T* z = logits + r * cols;
    T* out = grad + r * cols;
    row_grad<T>(z, valid, logz[r], entropy[r], g_lp[r], g_ent[r], out);
    for (int64_t v = valid; v < cols; ++v) out[v] = from_f32<T>(0.f);
    int64_t local = target[r] - vocab_start;
    if (local >= 0 && local < valid) {  // recompute in fp32 so the one-hot term is rounded once
      float lp = to_f32(z[local]) - logz[r];
      float p = exp_approx(lp);
      out[local] = from_f32<T>(g_lp[r] * (1.f - p) - g_ent[r] * p * (lp + entropy[r]));
    }
  }
}

}  // namespace

void logprob_entropy_bwd_cpu(const void* logits, DType dtype, int64_t rows, int64_t cols, int64_t valid,
                             const int64_t* target, int64_t vocab_start, const float* logz,
                             const float* entropy, const float* grad_logp, const float* grad_entropy,
                             void* grad, int num_threads) {
  if (dtype == DType::F32)
    run(static_cast<const float*>(logits), rows, cols, valid, target, vocab_start, logz, entropy, grad_logp,
        grad_entropy, static_cast<float*>(grad), num_threads);
  else
    run(static_cast<const bf16_t*>(logits), rows, cols, valid, target, vocab_start, logz, entropy, grad_logp,
        grad_entropy, static_cast<bf16_t*>(grad), num_threads);
}

}  // namespace popo
