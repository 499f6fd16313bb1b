// CUDA implementations of the popo_mega ops (compiled only in CUDA builds): the argument checks of
// ../checks.h, the device guard and current stream, then a call into the plain launch functions of
// launch.h.
// cu_seqlens contents are validated in Python (popo_mega.ops.masked_mean_pool) to avoid a sync.
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "launch.h"

namespace popo {
namespace {

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor logprob_entropy_stats(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                                 int64_t vocab_size) {
  const char* op = "popo_mega::logprob_entropy_stats";
  check_cuda(logits, op, "logits");
  DType dt = check_logprob_args(op, logits, target);
  const int64_t valid = logprob_valid_cols(op, logits, vocab_start, vocab_size);
  c10::cuda::CUDAGuard guard(logits.device());
  auto stats = at::empty({4, logits.size(0)}, logits.options().dtype(at::kFloat));
  check_launch(logprob_entropy_fwd_cuda(logits.data_ptr(), dt, logits.size(0), logits.size(1), valid,
                                        target.data_ptr<int64_t>(), vocab_start, stats.data_ptr<float>(), stream()),
               op);
  return stats;
}

at::Tensor logprob_entropy_grad(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                                int64_t vocab_size, const at::Tensor& logz, const at::Tensor& entropy,
                                const at::Tensor& grad_logp, const at::Tensor& grad_entropy) {
  const char* op = "popo_mega::logprob_entropy_grad";
  check_cuda(logits, op, "logits");
  DType dt = check_logprob_grad_args(op, logits, target, logz, entropy, grad_logp, grad_entropy);
  const int64_t valid = logprob_valid_cols(op, logits, vocab_start, vocab_size);
  c10::cuda::CUDAGuard guard(logits.device());
  auto grad = at::empty_like(logits);
  check_launch(logprob_entropy_bwd_cuda(logits.data_ptr(), dt, logits.size(0), logits.size(1), valid,
                                        target.data_ptr<int64_t>(), vocab_start, logz.data_ptr<float>(),
                                        entropy.data_ptr<float>(), grad_logp.data_ptr<float>(),
                                        grad_entropy.data_ptr<float>(), grad.data_ptr(), stream()),
               op);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> clipped_surrogate(const at::Tensor& logp, const at::Tensor& old_logp,
                                                     const at::Tensor& adv, const at::Tensor& mask, double eps_low,
                                                     double eps_high) {
  const char* op = "popo_mega::clipped_surrogate";
  check_cuda(logp, op, "logp");
  bool bool_mask;
  DType dt = check_surrogate_args(op, logp, old_logp, adv, mask, eps_low, eps_high, &bool_mask);
  c10::cuda::CUDAGuard guard(logp.device());
  auto loss = at::empty_like(logp);
  auto stats = at::empty({4}, logp.options().dtype(at::kFloat));
  check_launch(clipped_surrogate_fwd_cuda(logp.data_ptr(), old_logp.data_ptr(), adv.data_ptr(), mask.data_ptr(),
                                          bool_mask, dt, logp.size(0), float(eps_low), float(eps_high),
                                          loss.data_ptr(), stats.data_ptr<float>(), stream()),
               op);
  return std::make_tuple(loss, stats);
}

at::Tensor clipped_surrogate_grad(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                  const at::Tensor& adv, const at::Tensor& mask, double eps_low, double eps_high) {
  const char* op = "popo_mega::clipped_surrogate_grad";
  check_cuda(logp, op, "logp");
  bool bool_mask;
  DType dt = check_surrogate_args(op, logp, old_logp, adv, mask, eps_low, eps_high, &bool_mask);
  check_surrogate_grad_loss(op, grad_loss, logp);
  c10::cuda::CUDAGuard guard(logp.device());
  auto grad = at::empty_like(logp);
  check_launch(clipped_surrogate_bwd_cuda(grad_loss.data_ptr(), logp.data_ptr(), old_logp.data_ptr(), adv.data_ptr(),
                                          mask.data_ptr(), bool_mask, dt, logp.size(0), float(eps_low),
                                          float(eps_high), grad.data_ptr(), stream()),
               op);
  return grad;
}

at::Tensor masked_mean_pool(const at::Tensor& hidden, const at::Tensor& cu, const at::Tensor& mask) {
  const char* op = "popo_mega::masked_mean_pool";
  check_cuda(hidden, op, "hidden");
  bool bool_mask;
  DType dt = check_pool_args(op, hidden, cu, mask, &bool_mask);
  const int64_t B = cu.size(0) - 1;
  c10::cuda::CUDAGuard guard(hidden.device());
  auto out = at::empty({B, hidden.size(1)}, hidden.options());
  check_launch(masked_mean_pool_fwd_cuda(hidden.data_ptr(), dt, hidden.size(0), hidden.size(1),
                                         cu.data_ptr<int64_t>(), B, mask.data_ptr(), bool_mask, out.data_ptr(),
                                         stream()),
               op);
  return out;
}

at::Tensor masked_mean_pool_grad(const at::Tensor& grad_out, const at::Tensor& cu, const at::Tensor& mask) {
  const char* op = "popo_mega::masked_mean_pool_grad";
  check_cuda(grad_out, op, "grad_out");
  bool bool_mask;
  DType dt = check_pool_grad_args(op, grad_out, cu, mask, &bool_mask);
  const int64_t T = mask.size(0);
  const int64_t B = cu.size(0) - 1;
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto grad = at::empty({T, grad_out.size(1)}, grad_out.options());
  check_launch(masked_mean_pool_bwd_cuda(grad_out.data_ptr(), dt, T, grad_out.size(1), cu.data_ptr<int64_t>(), B,
                                         mask.data_ptr(), bool_mask, grad.data_ptr(), stream()),
               op);
  return grad;
}

at::Tensor cosine_penalty(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weights,
                          const at::Tensor& normaliser) {
  const char* op = "popo_mega::cosine_penalty";
  check_cuda(pred, op, "pred");
  check_cosine_args(op, pred, target, weights, normaliser);
  c10::cuda::CUDAGuard guard(pred.device());
  auto loss = at::empty({}, pred.options().dtype(at::kFloat));
  check_launch(cosine_penalty_fwd_cuda(pred.data_ptr(), float_dtype(pred, op, "pred"), target.data_ptr(),
                                       float_dtype(target, op, "target"), weights.data_ptr<float>(),
                                       normaliser.data_ptr<float>(), pred.size(0), pred.size(1),
                                       loss.data_ptr<float>(), stream()),
               op);
  return loss;
}

at::Tensor cosine_penalty_grad(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& weights, const at::Tensor& normaliser) {
  const char* op = "popo_mega::cosine_penalty_grad";
  check_cuda(pred, op, "pred");
  check_cosine_args(op, pred, target, weights, normaliser);
  check_cosine_grad_loss(op, grad_loss, pred);
  c10::cuda::CUDAGuard guard(pred.device());
  auto grad = at::empty_like(pred);
  check_launch(cosine_penalty_bwd_cuda(grad_loss.data_ptr<float>(), pred.data_ptr(), float_dtype(pred, op, "pred"),
                                       target.data_ptr(), float_dtype(target, op, "target"), weights.data_ptr<float>(),
                                       normaliser.data_ptr<float>(), pred.size(0), pred.size(1), grad.data_ptr(),
                                       stream()),
               op);
  return grad;
}

}  // namespace
}  // namespace popo

TORCH_LIBRARY_IMPL(popo_mega, CUDA, m) {
  m.impl("logprob_entropy_stats", &popo::logprob_entropy_stats);
  m.impl("logprob_entropy_grad", &popo::logprob_entropy_grad);
  m.impl("clipped_surrogate", &popo::clipped_surrogate);
  m.impl("clipped_surrogate_grad", &popo::clipped_surrogate_grad);
  m.impl("masked_mean_pool", &popo::masked_mean_pool);
  m.impl("masked_mean_pool_grad", &popo::masked_mean_pool_grad);
  m.impl("cosine_penalty", &popo::cosine_penalty);
  m.impl("cosine_penalty_grad", &popo::cosine_penalty_grad);
}
