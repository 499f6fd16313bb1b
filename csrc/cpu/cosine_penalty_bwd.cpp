// Kernel 3b backward on CPU: d loss / d pred_b = -(g w_b / D) (t_b / (|p||t|) - cos p_b / |p|^2);
// zero for pairs with a norm below 1e-8. The target and the weights get no gradient.
#include <cmath>

#include "common.h"

namespace popo {
namespace {

template <typename P, typename Q>
POPO_CLONES static void row(const P* p, const Q* t, int64_t cols, float coef, P* out) {
  float pt = 0.f, pp = 0.f, tt = 0.f;
#pragma omp simd reduction(+ : pt, pp, tt)
  for (int64_t j = 0; j < cols; ++j) {
    float a = to_f32(p[j]), b = to_f32(t[j]);
    pt += a * b;
    pp += a * a;
    tt += b * b;
  }
  float pn = std::sqrt(pp), tn = std::sqrt(tt);
  if (!(pn > 1e-8f && tn > 1e-8f)) {
    for (int64_t j = 0; j < cols; ++j) out[j] = from_f32<P>(0.f);
    return;
  }
  float inv = 1.f / (pn * tn);
  float cosv = pt * inv;
  float a_t = coef * inv, a_p = -coef * cosv / pp;
  for (int64_t j = 0; j < cols; ++j) out[j] = from_f32<P>(a_t * to_f32(t[j]) + a_p * to_f32(p[j]));
}

template <typename P, typename Q>
void run(float g, const P* pred, const Q* target, const float* w, float normaliser, int64_t rows, int64_t cols,
         P* grad, int nt) {
  float denom = normaliser > 1e-30f ? normaliser : 1e-30f;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t b = 0; b < rows; ++b)
    row<P, Q>(pred + b * cols, target + b * cols, cols, -g * w[b] / denom, grad + b * cols);
}

template <typename P>
void run_t(float g, const P* pred, const void* target, DType tdt, const float* w, float nz, int64_t r, int64_t c,
           P* grad, int nt) {
  if (tdt == DType::F32)
    run(g, pred, static_cast<const float*>(target), w, nz, r, c, grad, nt);
  else
    run(g, pred, static_cast<const bf16_t*>(target), w, nz, r, c, grad, nt);
}

}  // namespace

void cosine_penalty_bwd_cpu(float grad_loss, const void* pred, DType pred_dtype, const void* target,
                            DType target_dtype, const float* weights, float normaliser, int64_t rows,
                            int64_t cols, void* grad_pred, int num_threads) {
  if (pred_dtype == DType::F32)
    run_t(grad_loss, static_cast<const float*>(pred), target, target_dtype, weights, normaliser, rows, cols,
          static_cast<float*>(grad_pred), num_threads);
  else
    run_t(grad_loss, static_cast<const bf16_t*>(pred), target, target_dtype, weights, normaliser, rows, cols,
          static_cast<bf16_t*>(grad_pred), num_threads);
}

}  // namespace popo
