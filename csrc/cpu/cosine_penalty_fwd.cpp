// Kernel 3b forward on CPU: -(sum_b w_b cos(pred_b, target_b)) / normaliser, fp32 per row,
// fp64 across rows. A pair whose norm is below 1e-8 counts as cos = 0.
#include <cmath>

#include "common.h"

namespace popo {
namespace {

template <typename P, typename Q>
POPO_CLONES static void row_dots(const P* p, const Q* t, int64_t cols, float* out3) {
  float pt = 0.f, pp = 0.f, tt = 0.f;
#pragma omp simd reduction(+ : pt, pp, tt)
  for (int64_t j = 0; j < cols; ++j) {
    float a = to_f32(p[j]), b = to_f32(t[j]);
    pt += a * b;
    pp += a * a;
    tt += b * b;
  }
  out3[0] = pt;
  out3[1] = pp;
  out3[2] = tt;
}

template <typename P, typename Q>
void run(const P* pred, const Q* target, const float* w, float normaliser, int64_t rows, int64_t cols,
         float* loss, int nt) {
  double num = 0.0;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(+ : num)
  for (int64_t b = 0; b < rows; ++b) {
    float d[3];
    row_dots<P, Q>(pred + b * cols, target + b * cols, cols, d);
    float pn = std::sqrt(d[1]), tn = std::sqrt(d[2]);
    if (pn > 1e-8f && tn > 1e-8f) num += double(w[b]) * double(d[0] / (pn * tn));
  }
  double denom = normaliser > 1e-30f ? double(normaliser) : 1e-30;
  *loss = float(-num / denom);
}

template <typename P>
void run_t(const P* pred, const void* target, DType tdt, const float* w, float nz, int64_t r, int64_t c, float* loss,
           int nt) {
  if (tdt == DType::F32)
    run(pred, static_cast<const float*>(target), w, nz, r, c, loss, nt);
  else
    run(pred, static_cast<const bf16_t*>(target), w, nz, r, c, loss, nt);
}

}  // namespace

void cosine_penalty_fwd_cpu(const void* pred, DType pred_dtype, const void* target, DType target_dtype,
                            const float* weights, float normaliser, int64_t rows, int64_t cols, float* loss,
                            int num_threads) {
  if (pred_dtype == DType::F32)
    run_t(static_cast<const float*>(pred), target, target_dtype, weights, normaliser, rows, cols, loss, num_threads);
  else
    run_t(static_cast<const bf16_t*>(pred), target, target_dtype, weights, normaliser, rows, cols, loss,
          num_threads);
}

}  // namespace popo
