// Kernel 2 backward on CPU: d loss / d logp = -A*rho*mask where the unclipped branch is active
// (or tied), 0 where the clipped branch is the strict minimum or the token is masked.
#include "common.h"

namespace popo {
namespace {

constexpr int64_t kBlock = 4096;

template <typename T, typename M>
POPO_CLONES static void block(const T* g, const T* logp, const T* old, const T* adv, const M* mask, int64_t n,
                              float lo, float hi, T* grad) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float m = float(mask[i]);
    float a = to_f32(adv[i]);
    float d = to_f32(logp[i]) - to_f32(old[i]);  // loaded unconditionally so the loop vectorises
    float rho = exp_approx(m != 0.f ? d : 0.f);
    float gi = -to_f32(g[i]) * a * rho * m;
    gi = (a > 0.f && rho > hi) ? 0.f : gi;  // clipped branch is the strict minimum: no gradient
    gi = (a < 0.f && rho < lo) ? 0.f : gi;
    grad[i] = from_f32<T>(gi);
  }
}

template <typename T, typename M>
void run(const T* g, const T* logp, const T* old, const T* adv, const M* mask, int64_t n, float eps_low,
         float eps_high, T* grad, int num_threads) {
  const float lo = 1.f - eps_low, hi = 1.f + eps_high;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t i0 = b * kBlock, len = (n - i0) < kBlock ? (n - i0) : kBlock;
    block<T, M>(g + i0, logp + i0, old + i0, adv + i0, mask + i0, len, lo, hi, grad + i0);
  }
}

template <typename T>
void run_mask(const T* g, const T* logp, const T* old, const T* adv, const void* mask, bool mask_is_bool,
              int64_t n, float el, float eh, T* grad, int nt) {
  if (mask_is_bool)
    run(g, logp, old, adv, static_cast<const uint8_t*>(mask), n, el, eh, grad, nt);
  else
    run(g, logp, old, adv, static_cast<const float*>(mask), n, el, eh, grad, nt);
}

}  // namespace

void clipped_surrogate_bwd_cpu(const void* grad_loss, const void* logp, const void* old_logp, const void* adv,
                               const void* mask, bool mask_is_bool, DType dtype, int64_t n, float eps_low,
                               float eps_high, void* grad_logp, int num_threads) {
  if (dtype == DType::F32)
    run_mask(static_cast<const float*>(grad_loss), static_cast<const float*>(logp),
             static_cast<const float*>(old_logp), static_cast<const float*>(adv), mask, mask_is_bool, n,
             eps_low, eps_high, static_cast<float*>(grad_logp), num_threads);
  else
    run_mask(static_cast<const bf16_t*>(grad_loss), static_cast<const bf16_t*>(logp),
             static_cast<const bf16_t*>(old_logp), static_cast<const bf16_t*>(adv), mask, mask_is_bool, n,
             eps_low, eps_high, static_cast<bf16_t*>(grad_logp), num_threads);
}

}  // namespace popo
