// TORCH_CHECK helpers and the argument checks of every op, shared by the CPU and CUDA bindings so
// the two cannot drift. Each check_*_args takes the op's primary tensor first: the caller has
// already checked that it is on its device kind (CPU or CUDA); every other tensor must be on the
// primary's device. What only one side checks stays in that side's file (the CPU side validates
// cu_seqlens contents; the CUDA side leaves that to Python to avoid a device sync).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kernels.h"

namespace popo {

inline void check_2d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_1d(const at::Tensor& t, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but expected ", ref.device());
}

inline DType float_dtype(const at::Tensor& t, const char* op, const char* name) {
  if (t.scalar_type() == at::kFloat) return DType::F32;
  if (t.scalar_type() == at::kBFloat16) return DType::BF16;
  TORCH_CHECK(false, op, ": ", name, " must be float32 or bfloat16, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", want, ", got ", t.scalar_type());
}

// Masks are bool or float32 (the Python wrapper converts other float masks to float32).
inline bool mask_is_bool(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kBool || t.scalar_type() == at::kFloat, op,
              ": mask must be bool or float32, got ", t.scalar_type());
  return t.scalar_type() == at::kBool;
}

// ---- per-op argument checks ----

// logits [T, V] float32|bfloat16, target [T] int64. Returns the logits dtype.
inline DType check_logprob_args(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  check_2d(logits, op, "logits");
  DType dt = float_dtype(logits, op, "logits");
  check_1d(target, logits.size(0), op, "target");
  check_dtype(target, at::kLong, op, "target");
  check_device(target, logits, op, "target");
  return dt;
}

// Real (non-padding) columns of a shard [T, V/tp] starting at global id vocab_start, in a vocabulary
// of vocab_size real ids: clamp(vocab_size - vocab_start, 0, V/tp). A shard may be all padding.
inline int64_t logprob_valid_cols(const char* op, const at::Tensor& logits, int64_t vocab_start, int64_t vocab_size) {
  TORCH_CHECK(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", vocab_start);
  TORCH_CHECK(vocab_size >= 1, op, ": vocab_size must be >= 1, got ", vocab_size);
  const int64_t valid = vocab_size - vocab_start;
  return valid < 0 ? 0 : (valid > logits.size(1) ? logits.size(1) : valid);
}

// ... and the backward's saved logz, entropy and incoming grads: [T] float32 each.
inline DType check_logprob_grad_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                     const at::Tensor& logz, const at::Tensor& entropy, const at::Tensor& grad_logp,
                                     const at::Tensor& grad_entropy) {
  DType dt = check_logprob_args(op, logits, target);
  const at::Tensor* vecs[] = {&logz, &entropy, &grad_logp, &grad_entropy};
  const char* names[] = {"logz", "entropy", "grad_logp", "grad_entropy"};
  for (int i = 0; i < 4; ++i) {
    check_1d(*vecs[i], logits.size(0), op, names[i]);
    check_dtype(*vecs[i], at::kFloat, op, names[i]);
    check_device(*vecs[i], logits, op, names[i]);
  }
  return dt;
}

// logp, old_logp, advantages [N] of one float dtype, mask [N] bool|float32, eps >= 0.
// Returns the dtype; *bool_mask tells the mask's.
inline DType check_surrogate_args(const char* op, const at::Tensor& logp, const at::Tensor& old_logp,
                                  const at::Tensor& adv, const at::Tensor& mask, double eps_low, double eps_high,
                                  bool* bool_mask) {
  TORCH_CHECK(logp.dim() == 1 && logp.is_contiguous(), op, ": logp must be 1-D and contiguous, got ", logp.sizes());
  DType dt = float_dtype(logp, op, "logp");
  const int64_t n = logp.size(0);
  check_1d(old_logp, n, op, "old_logp");
  check_1d(adv, n, op, "advantages");
  check_1d(mask, n, op, "mask");
  check_dtype(old_logp, logp.scalar_type(), op, "old_logp");
  check_dtype(adv, logp.scalar_type(), op, "advantages");
  *bool_mask = mask_is_bool(mask, op);
  check_device(old_logp, logp, op, "old_logp");
  check_device(adv, logp, op, "advantages");
  check_device(mask, logp, op, "mask");
  TORCH_CHECK(eps_low >= 0 && eps_high >= 0, op, ": eps_low and eps_high must be >= 0, got ", eps_low, ", ",
              eps_high);
  return dt;
}

// grad_loss [N] in logp's dtype, on logp's device.
inline void check_surrogate_grad_loss(const char* op, const at::Tensor& grad_loss, const at::Tensor& logp) {
  check_1d(grad_loss, logp.size(0), op, "grad_loss");
  check_dtype(grad_loss, logp.scalar_type(), op, "grad_loss");
  check_device(grad_loss, logp, op, "grad_loss");
}

// cu_seqlens [B+1] int64 and mask [num_tokens] bool|float32 on ref's device (shapes and dtypes
// only; the CPU binding also checks the offsets). Returns whether the mask is bool.
inline bool check_segment_args(const char* op, const at::Tensor& ref, const at::Tensor& cu, const at::Tensor& mask,
                               int64_t num_tokens) {
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1 && cu.is_contiguous(), op,
              ": cu_seqlens must be a contiguous [B+1] tensor, got ", cu.sizes());
  check_dtype(cu, at::kLong, op, "cu_seqlens");
  check_device(cu, ref, op, "cu_seqlens");
  check_1d(mask, num_tokens, op, "mask");
  check_device(mask, ref, op, "mask");
  return mask_is_bool(mask, op);
}

// hidden [T, H] float, then the segments over its T rows. Returns hidden's dtype.
inline DType check_pool_args(const char* op, const at::Tensor& hidden, const at::Tensor& cu, const at::Tensor& mask,
                             bool* bool_mask) {
  check_2d(hidden, op, "hidden");
  DType dt = float_dtype(hidden, op, "hidden");
  *bool_mask = check_segment_args(op, hidden, cu, mask, hidden.size(0));
  return dt;
}

// grad_out [B, H] float with B = len(cu_seqlens) - 1, mask [T]. Returns grad_out's dtype.
inline DType check_pool_grad_args(const char* op, const at::Tensor& grad_out, const at::Tensor& cu,
                                  const at::Tensor& mask, bool* bool_mask) {
  check_2d(grad_out, op, "grad_out");
  DType dt = float_dtype(grad_out, op, "grad_out");
  TORCH_CHECK(mask.dim() == 1, op, ": mask must be [T], got ", mask.sizes());
  *bool_mask = check_segment_args(op, grad_out, cu, mask, mask.size(0));
  const int64_t B = cu.size(0) - 1;
  TORCH_CHECK(grad_out.size(0) == B, op, ": grad_out must be [B=", B, ", H], got ", grad_out.sizes());
  return dt;
}

// pred, target [B, H] float (dtypes may differ), weights [B] float32, normaliser 0-dim float32.
inline void check_cosine_args(const char* op, const at::Tensor& pred, const at::Tensor& target,
                              const at::Tensor& weights, const at::Tensor& normaliser) {
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

// grad_loss: 0-dim float32 on pred's device.
inline void check_cosine_grad_loss(const char* op, const at::Tensor& grad_loss, const at::Tensor& pred) {
  TORCH_CHECK(grad_loss.dim() == 0, op, ": grad_loss must be a 0-dim tensor, got ", grad_loss.sizes());
  check_dtype(grad_loss, at::kFloat, op, "grad_loss");
  check_device(grad_loss, pred, op, "grad_loss");
}

}  // namespace popo
