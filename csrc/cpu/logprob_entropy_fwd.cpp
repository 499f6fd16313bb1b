// Kernel 1 forward on CPU: per-row max, sum-exp, sum e*(z-m) and target logit of a vocab shard.
// Two sweeps over one row (max, then sums); the row stays in L1/L2 between them. Only the first
// `valid` columns are read: vocabulary padding is skipped, not masked with a huge negative value.
#include "common.h"

namespace popo {
namespace {

template <typename T>
POPO_CLONES static float row_max(const T* z, int64_t cols) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < cols; ++v) {
    float x = to_f32(z[v]);
    m = x > m ? x : m;
  }
  return m;
}

template <typename T>
POPO_CLONES static void row_sums(const T* z, int64_t cols, float m, float* s_out, float* q_out) {
  float s = 0.f, q = 0.f;
#pragma omp simd reduction(+ : s, q)
  for (int64_t v = 0; v < cols; ++v) {
    float d = to_f32(z[v]) - m;
    float e = exp_approx(d);
    s += e;
    q += e * d;
  }
  *s_out = s;
  *q_out = q;
}

template <typename T>
void run(const T* logits, int64_t rows, int64_t cols, int64_t valid, const int64_t* target, int64_t vocab_start,
         float* stats, int num_threads) {
  float* m_out = stats;
  float* s_out = stats + rows;
  float* q_out = stats + 2 * rows;
  float* zt_out = stats + 3 * rows;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t r = 0; r < rows; ++r) {
    const T* z = logits + r * cols;
    float m = row_max<T>(z, valid);
    row_sums<T>(z, valid, m, s_out + r, q_out + r);
    m_out[r] = m;
    int64_t local = target[r] - vocab_start;
    zt_out[r] = (local >= 0 && local < valid) ? to_f32(z[local]) : 0.f;
  }
}

}  // namespace

void logprob_entropy_fwd_cpu(const void* logits, DType dtype, int64_t rows, int64_t cols, int64_t valid,
                             const int64_t* target, int64_t vocab_start, float* stats, int num_threads) {
  if (dtype == DType::F32)
    run(static_cast<const float*>(logits), rows, cols, valid, target, vocab_start, stats, num_threads);
  else
    run(static_cast<const bf16_t*>(logits), rows, cols, valid, target, vocab_start, stats, num_threads);
}

}  // namespace popo
