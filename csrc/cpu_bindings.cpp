// CPU implementations of the popo_mega ops: the argument checks of checks.h (plus the cu_seqlens
// offsets, cheap to read here), then a call into the plain C++ kernels of csrc/cpu/ with torch's
// intra-op thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <tuple>
#include <torch/library.h>

#include "checks.h"

namespace popo {
namespace {

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// cu_seqlens offsets: 0 first, T last, non-decreasing (read on the host; free on CPU).
void check_offsets(const char* op, const at::Tensor& cu, int64_t num_tokens) {
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t B = cu.size(0) - 1;
  TORCH_CHECK(c[0] == 0 && c[B] == num_tokens, op, ": cu_seqlens must start at 0 and end at T=", num_tokens,
              ", got first=", c[0], " last=", c[B]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(c[b + 1] >= c[b], op, ": cu_seqlens must be non-decreasing (index ", b + 1, ")");
}

at::Tensor logprob_entropy_stats(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                                 int64_t vocab_size) {
  const char* op = "popo_mega::logprob_entropy_stats";
  check_cpu(logits, op, "logits");
  DType dt = check_logprob_args(op, logits, target);
  const int64_t valid = logprob_valid_cols(op, logits, vocab_start, vocab_size);
  auto stats = at::empty({4, logits.size(0)}, logits.options().dtype(at::kFloat));
  logprob_entropy_fwd_cpu(logits.data_ptr(), dt, logits.size(0), logits.size(1), valid, target.data_ptr<int64_t>(),
                          vocab_start, stats.data_ptr<float>(), at::get_num_threads());
  return stats;
}

at::Tensor logprob_entropy_grad(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                                int64_t vocab_size, const at::Tensor& logz, const at::Tensor& entropy,
                                const at::Tensor& grad_logp, const at::Tensor& grad_entropy) {
  const char* op = "popo_mega::logprob_entropy_grad";
  check_cpu(logits, op, "logits");
  DType dt = check_logprob_grad_args(op, logits, target, logz, entropy, grad_logp, grad_entropy);
  const int64_t valid = logprob_valid_cols(op, logits, vocab_start, vocab_size);
  auto grad = at::empty_like(logits);
  logprob_entropy_bwd_cpu(logits.data_ptr(), dt, logits.size(0), logits.size(1), valid, target.data_ptr<int64_t>(),
                          vocab_start, logz.data_ptr<float>(), entropy.data_ptr<float>(), grad_logp.data_ptr<float>(),
                          grad_entropy.data_ptr<float>(), grad.data_ptr(), at::get_num_threads());
  return grad;
}

std::tuple<at::Tensor, at::Tensor> clipped_surrogate(const at::Tensor& logp, const at::Tensor& old_logp,
                                                     const at::Tensor& adv, const at::Tensor& mask, double eps_low,
                                                     double eps_high) {
  const char* op = "popo_mega::clipped_surrogate";
  check_cpu(logp, op, "logp");
  bool bool_mask;
  DType dt = check_surrogate_args(op, logp, old_logp, adv, mask, eps_low, eps_high, &bool_mask);
  auto loss = at::empty_like(logp);
  auto stats = at::empty({4}, logp.options().dtype(at::kFloat));
  clipped_surrogate_fwd_cpu(logp.data_ptr(), old_logp.data_ptr(), adv.data_ptr(), mask.data_ptr(), bool_mask, dt,
                            logp.size(0), float(eps_low), float(eps_high), loss.data_ptr(), stats.data_ptr<float>(),
                            at::get_num_threads());
  return std::make_tuple(loss, stats);
}

at::Tensor clipped_surrogate_grad(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                  const at::Tensor& adv, const at::Tensor& mask, double eps_low, double eps_high) {
  const char* op = "popo_mega::clipped_surrogate_grad";
  check_cpu(logp, op, "logp");
  bool bool_mask;
  DType dt = check_surrogate_args(op, logp, old_logp, adv, mask, eps_low, eps_high, &bool_mask);
  check_surrogate_grad_loss(op, grad_loss, logp);
  auto grad = at::empty_like(logp);
  clipped_surrogate_bwd_cpu(grad_loss.data_ptr(), logp.data_ptr(), old_logp.data_ptr(), adv.data_ptr(),
                            mask.data_ptr(), bool_mask, dt, logp.size(0), float(eps_low), float(eps_high),
                            grad.data_ptr(), at::get_num_threads());
  return grad;
}

at::Tensor masked_mean_pool(const at::Tensor& hidden, const at::Tensor& cu, const at::Tensor& mask) {
  const char* op = "popo_mega::masked_mean_pool";
  check_cpu(hidden, op, "hidden");
  bool bool_mask;
  DType dt = check_pool_args(op, hidden, cu, mask, &bool_mask);
  check_offsets(op, cu, hidden.size(0));
  const int64_t B = cu.size(0) - 1;
  auto out = at::empty({B, hidden.size(1)}, hidden.options());
  masked_mean_pool_fwd_cpu(hidden.data_ptr(), dt, hidden.size(0), hidden.size(1), cu.data_ptr<int64_t>(), B,
                           mask.data_ptr(), bool_mask, out.data_ptr(), at::get_num_threads());
  return out;
}

at::Tensor masked_mean_pool_grad(const at::Tensor& grad_out, const at::Tensor& cu, const at::Tensor& mask) {
  const char* op = "popo_mega::masked_mean_pool_grad";
  check_cpu(grad_out, op, "grad_out");
  bool bool_mask;
  DType dt = check_pool_grad_args(op, grad_out, cu, mask, &bool_mask);
  const int64_t T = mask.size(0);
  check_offsets(op, cu, T);
  const int64_t B = cu.size(0) - 1;
  auto grad = at::empty({T, grad_out.size(1)}, grad_out.options());
  masked_mean_pool_bwd_cpu(grad_out.data_ptr(), dt, T, grad_out.size(1), cu.data_ptr<int64_t>(), B, mask.data_ptr(),
                           bool_mask, grad.data_ptr(), at::get_num_threads());
  return grad;
}

at::Tensor cosine_penalty(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weights,
                          const at::Tensor& normaliser) {
  const char* op = "popo_mega::cosine_penalty";
  check_cpu(pred, op, "pred");
  check_cosine_args(op, pred, target, weights, normaliser);
  auto loss = at::empty({}, pred.options().dtype(at::kFloat));
  cosine_penalty_fwd_cpu(pred.data_ptr(), float_dtype(pred, op, "pred"), target.data_ptr(),
                         float_dtype(target, op, "target"), weights.data_ptr<float>(), normaliser.item<float>(),
                         pred.size(0), pred.size(1), loss.data_ptr<float>(), at::get_num_threads());
  return loss;
}

at::Tensor cosine_penalty_grad(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& weights, const at::Tensor& normaliser) {
  const char* op = "popo_mega::cosine_penalty_grad";
  check_cpu(pred, op, "pred");
  check_cosine_args(op, pred, target, weights, normaliser);
  check_cosine_grad_loss(op, grad_loss, pred);
  auto grad = at::empty_like(pred);
  cosine_penalty_bwd_cpu(grad_loss.item<float>(), pred.data_ptr(), float_dtype(pred, op, "pred"), target.data_ptr(),
                         float_dtype(target, op, "target"), weights.data_ptr<float>(), normaliser.item<float>(),
                         pred.size(0), pred.size(1), grad.data_ptr(), at::get_num_threads());
  return grad;
}

}  // namespace
}  // namespace popo

TORCH_LIBRARY_IMPL(popo_mega, CPU, m) {
  m.impl("logprob_entropy_stats", &popo::logprob_entropy_stats);
  m.impl("logprob_entropy_grad", &popo::logprob_entropy_grad);
  m.impl("clipped_surrogate", &popo::clipped_surrogate);
  m.impl("clipped_surrogate_grad", &popo::clipped_surrogate_grad);
  m.impl("masked_mean_pool", &popo::masked_mean_pool);
  m.impl("masked_mean_pool_grad", &popo::masked_mean_pool_grad);
  m.impl("cosine_penalty", &popo::cosine_penalty);
  m.impl("cosine_penalty_grad", &popo::cosine_penalty_grad);
}
