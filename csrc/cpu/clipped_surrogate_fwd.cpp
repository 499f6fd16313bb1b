// Kernel 2 forward on CPU: the clipped importance-weighted surrogate per token and its statistics
// (clip counts, sum of rho, token count) in the same pass. Math in fp32.
#include <cmath>

#include "common.h"

namespace popo {
namespace {

constexpr int64_t kBlock = 4096;

template <typename T>
POPO_CLONES static void block(const T* logp, const T* old, const T* adv, const float* mask, int64_t n, float lo,
                              float hi, T* loss, double* acc) {
  float clip_low = 0.f, clip_high = 0.f, rho_sum = 0.f, count = 0.f;
#pragma omp simd reduction(+ : clip_low, clip_high, rho_sum, count)
  for (int64_t i = 0; i < n; ++i) {
    float m = mask[i];
    float a = to_f32(adv[i]);
    float d = to_f32(logp[i]) - to_f32(old[i]);  // loaded unconditionally so the loop vectorises
    float rho = exp_approx(m != 0.f ? d : 0.f);  // masked tokens: log-ratio 0 (padding may be NaN)
    float rc = rho < lo ? lo : (rho > hi ? hi : rho);
    float u = rho * a, c = rc * a;
    loss[i] = from_f32<T>(-(u < c ? u : c) * m);
    float high = rho > hi ? m : 0.f;   // counted where A > 0 (the clipped branch is then the min)
    float low = rho < lo ? m : 0.f;    // counted where A < 0
    high = a > 0.f ? high : 0.f;
    low = a < 0.f ? low : 0.f;
    clip_high += high;
    clip_low += low;
    rho_sum += rho * m;
    count += m;
  }
  acc[0] += clip_low;
  acc[1] += clip_high;
  acc[2] += rho_sum;
  acc[3] += count;
}

// A bool mask is widened to fp32 one block at a time (GCC does not vectorise the reductions
// below over mixed byte/float lanes).
inline const float* mask_as_float(const float* m, int64_t, float*) { return m; }
inline const float* mask_as_float(const uint8_t* m, int64_t n, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = m[i] ? 1.f : 0.f;
  return buf;
}

template <typename T, typename M>
void run(const T* logp, const T* old, const T* adv, const M* mask, int64_t n, float eps_low, float eps_high,
         T* loss, float* stats, int num_threads) {
  const float lo = 1.f - eps_low, hi = 1.f + eps_high;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;  // per-block fp32 partials, summed in fp64
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(+ : s0, s1, s2, s3)
  for (int64_t b = 0; b < blocks; ++b) {
    float mbuf[kBlock];
    int64_t i0 = b * kBlock, len = (n - i0) < kBlock ? (n - i0) : kBlock;
    double acc[4] = {0, 0, 0, 0};
    const float* m = mask_as_float(mask + i0, len, mbuf);
    block<T>(logp + i0, old + i0, adv + i0, m, len, lo, hi, loss + i0, acc);
    s0 += acc[0];
    s1 += acc[1];
    s2 += acc[2];
    s3 += acc[3];
  }
  stats[0] = float(s0);
  stats[1] = float(s1);
  stats[2] = float(s2);
  stats[3] = float(s3);
}

template <typename T>
void run_mask(const T* logp, const T* old, const T* adv, const void* mask, bool mask_is_bool, int64_t n,
              float el, float eh, T* loss, float* stats, int nt) {
  if (mask_is_bool)
    run(logp, old, adv, static_cast<const uint8_t*>(mask), n, el, eh, loss, stats, nt);
  else
    run(logp, old, adv, static_cast<const float*>(mask), n, el, eh, loss, stats, nt);
}

}  // namespace

void clipped_surrogate_fwd_cpu(const void* logp, const void* old_logp, const void* adv, const void* mask,
                               bool mask_is_bool, DType dtype, int64_t n, float eps_low, float eps_high,
                               void* loss, float* stats, int num_threads) {
  if (dtype == DType::F32)
    run_mask(static_cast<const float*>(logp), static_cast<const float*>(old_logp), static_cast<const float*>(adv),
             mask, mask_is_bool, n, eps_low, eps_high, static_cast<float*>(loss), stats, num_threads);
  else
    run_mask(static_cast<const bf16_t*>(logp), static_cast<const bf16_t*>(old_logp),
             static_cast<const bf16_t*>(adv), mask, mask_is_bool, n, eps_low, eps_high,
             static_cast<bf16_t*>(loss), stats, num_threads);
}

}  // namespace popo
