// TORCH_CHECK helpers shared by the CPU and CUDA bindings.
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

}  // namespace popo
