// CUDA implementations of the popo_mega ops (compiled only in CUDA builds): TORCH_CHECKs, the
// device guard and current stream, then a call into the plain launch functions of launch.h.
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

at::Tensor logprob_entropy_stats(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start) {
  const char* op = "popo_mega::logprob_entropy_stats";
  check_cuda(logits, op, "logits");
  check_2d(logits, op, "logits");
  DType dt = float_dtype(logits, op, "logits");
  check_1d(target, logits.size(0), op, "target");
  check_dtype(target, at::kLong, op, "target");
  check_device(target, logits, op, "target");
  c10::cuda::CUDAGuard guard(logits.device());
  auto stats = at::empty({4, logits.size(0)}, logits.options().dtype(at::kFloat));
  check_launch(logprob_entropy_fwd_cuda(logits.data_ptr(), dt, logits.size(0), logits.size(1),
                                        target.data_ptr<int64_t>(), vocab_start, stats.data_ptr<float>(), stream()),
               op);
  return stats;
}

at::Tensor logprob_entropy_grad(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                                const at::Tensor& logz, const at::Tensor& entropy, const at::Tensor& grad_logp,
                                const at::Tensor& grad_entropy) {
  const char* op = "popo_mega::logprob_entropy_grad";
  check_cuda(logits, op, "logits");
  check_2d(logits, op, "logits");
  DType dt = float_dtype(logits, op, "logits");
  const int64_t T = logits.size(0);
  check_1d(target, T, op, "target");
  check_dtype(target, at::kLong, op, "target");
  check_device(target, logits, op, "target");
  const at::Tensor* vecs[] = {&logz, &entropy, &grad_logp, &grad_entropy};
  const char* names[] = {"logz", "entropy", "grad_logp", "grad_entropy"};
  for (int i = 0; i < 4; ++i) {
    check_1d(*vecs[i], T, op, names[i]);
    check_dtype(*vecs[i], at::kFloat, op, names[i]);
    check_device(*vecs[i], logits, op, names[i]);
  }
  c10::cuda::CUDAGuard guard(logits.device());
  auto grad = at::empty_like(logits);
  check_launch(logprob_entropy_bwd_cuda(logits.data_ptr(), dt, T, logits.size(1), target.data_ptr<int64_t>(),
                                        vocab_start, logz.data_ptr<float>(), entropy.data_ptr<float>(),
                                        grad_logp.data_ptr<float>(), grad_entropy.data_ptr<float>(), grad.data_ptr(),
                                        stream()),
               op);
  return grad;
}

void check_surrogate(const char* op, const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& adv,
                     const at::Tensor& mask, double eps_low, double eps_high) {
  check_cuda(logp, op, "logp");
  TORCH_CHECK(logp.dim() == 1 && logp.is_contiguous(), op, ": logp must be 1-D and contiguous, got ", logp.sizes());
  float_dtype(logp, op, "logp");
  const int64_t n = logp.size(0);
  check_1d(old_logp, n, op, "old_logp");
  check_1d(adv, n, op, "advantages");
  check_1d(mask, n, op, "mask");
  check_dtype(old_logp, logp.scalar_type(), op, "old_logp");
  check_dtype(adv, logp.scalar_type(), op, "advantages");
  mask_is_bool(mask, op);
  check_device(old_logp, logp, op, "old_logp");
  check_device(adv, logp, op, "advantages");
  check_device(mask, logp, op, "mask");
  TORCH_CHECK(eps_low >= 0 && eps_high >= 0, op, ": eps_low and eps_high must be >= 0, got ", eps_low, ", ",
              eps_high);
}

std::tuple<at::Tensor, at::Tensor> clipped_surrogate(const at::Tensor& logp, const at::Tensor& old_logp,
                                                     const at::Tensor& adv, const at::Tensor& mask, double eps_low,
                                                     double eps_high) {
  const char* op = "popo_mega::clipped_surrogate";
  check_surrogate(op, logp, old_logp, adv, mask, eps_low, eps_high);
  c10::cuda::CUDAGuard guard(logp.device());
  auto loss = at::empty_like(logp);
  auto stats = at::empty({4}, logp.options().dtype(at::kFloat));
  check_launch(clipped_surrogate_fwd_cuda(logp.data_ptr(), old_logp.data_ptr(), adv.data_ptr(), mask.data_ptr(),
                                          mask_is_bool(mask, op), float_dtype(logp, op, "logp"), logp.size(0),
                                          float(eps_low), float(eps_high), loss.data_ptr(), stats.data_ptr<float>(),
                                          stream()),
               op);
  return std::make_tuple(loss, stats);
}

at::Tensor clipped_surrogate_grad(const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old_logp,
                                  const at::Tensor& adv, const at::Tensor& mask, double eps_low, double eps_high) {
  const char* op = "popo_mega::clipped_surrogate_grad";
  check_surrogate(op, logp, old_logp, adv, mask, eps_low, eps_high);
  check_1d(grad_loss, logp.size(0), op, "grad_loss");
  check_dtype(grad_loss, logp.scalar_type(), op, "grad_loss");
  check_device(grad_loss, logp, op, "grad_loss");
  c10::cuda::CUDAGuard guard(logp.device());
  auto grad = at::empty_like(logp);
  check_launch(clipped_surrogate_bwd_cuda(grad_loss.data_ptr(), logp.data_ptr(), old_logp.data_ptr(), adv.data_ptr(),
                                          mask.data_ptr(), mask_is_bool(mask, op), float_dtype(logp, op, "logp"),
                                          logp.size(0), float(eps_low), float(eps_high), grad.data_ptr(), stream()),
               op);
  return grad;
}

void check_segments(const char* op, const at::Tensor& ref, const at::Tensor& cu, const at::Tensor& mask,
                    int64_t num_tokens) {
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1 && cu.is_contiguous(), op,
              ": cu_seqlens must be a contiguous [B+1] tensor, got ", cu.sizes());
  check_dtype(cu, at::kLong, op, "cu_seqlens");
  check_device(cu, ref, op, "cu_seqlens");
  check_1d(mask, num_tokens, op, "mask");
  mask_is_bool(mask, op);
  check_device(mask, ref, op, "mask");
}

at::Tensor masked_mean_pool(const at::Tensor& hidden, const at::Tensor& cu, const at::Tensor& mask) {
  const char* op = "popo_mega::masked_mean_pool";
  check_cuda(hidden, op, "hidden");
  check_2d(hidden, op, "hidden");
  DType dt = float_dtype(hidden, op, "hidden");
  check_segments(op, hidden, cu, mask, hidden.size(0));
  const int64_t B = cu.size(0) - 1;
  c10::cuda::CUDAGuard guard(hidden.device());
  auto out = at::empty({B, hidden.size(1)}, hidden.options());
  check_launch(masked_mean_pool_fwd_cuda(hidden.data_ptr(), dt, hidden.size(0), hidden.size(1),
                                         cu.data_ptr<int64_t>(), B, mask.data_ptr(), mask_is_bool(mask, op),
                                         out.data_ptr(), stream()),
               op);
  return out;
}

at::Tensor masked_mean_pool_grad(const at::Tensor& grad_out, const at::Tensor& cu, const at::Tensor& mask) {
  const char* op = "popo_mega::masked_mean_pool_grad";
  check_cuda(grad_out, op, "grad_out");
  check_2d(grad_out, op, "grad_out");
  DType dt = float_dtype(grad_out, op, "grad_out");
  TORCH_CHECK(mask.dim() == 1, op, ": mask must be [T], got ", mask.sizes());
  const int64_t T = mask.size(0);
  check_segments(op, grad_out, cu, mask, T);
  const int64_t B = cu.size(0) - 1;
  TORCH_CHECK(grad_out.size(0) == B, op, ": grad_out must be [B=", B, ", H], got ", grad_out.sizes());
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto grad = at::empty({T, grad_out.size(1)}, grad_out.options());
  check_launch(masked_mean_pool_bwd_cuda(grad_out.data_ptr(), dt, T, grad_out.size(1), cu.data_ptr<int64_t>(), B,
                                         mask.data_ptr(), mask_is_bool(mask, op), grad.data_ptr(), stream()),
               op);
  return grad;
}

void check_cosine(const char* op, const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weights,
                  const at::Tensor& normaliser) {
  check_cuda(pred, op, "pred");
  check_2d(pred, op, "pred");
  check_2d(target, op, "target");
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": target must have pred's shape ", pred.sizes(), ", got ",
              target.sizes());
  float_dtype(pred, op, "pred");
  float_dtype(target, op, "target");
  check_1d(weights, pred.size(0), op, "weights");
  check_dtype(weights, at::kFloat, op, "weights");
  TORCH_CHECK(normaliser.dim() == 0, op, ": normaliser must be a 0-dim tensor, got ", normaliser.sizes());
  check_dtype(normaliser, at::kFloat, op, "normaliser");
  check_device(target, pred, op, "target");
  check_device(weights, pred, op, "weights");
  check_device(normaliser, pred, op, "normaliser");
}

at::Tensor cosine_penalty(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weights,
                          const at::Tensor& normaliser) {
  const char* op = "popo_mega::cosine_penalty";
  check_cosine(op, pred, target, weights, normaliser);
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
  check_cosine(op, pred, target, weights, normaliser);
  TORCH_CHECK(grad_loss.dim() == 0, op, ": grad_loss must be a 0-dim tensor, got ", grad_loss.sizes());
  check_dtype(grad_loss, at::kFloat, op, "grad_loss");
  check_device(grad_loss, pred, op, "grad_loss");
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
