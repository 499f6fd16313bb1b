// Plain C++ launch functions of the CUDA kernels: raw device pointers, sizes, a cudaStream_t.
// No torch: the glue (checks, current stream, registration) is cuda_bindings.cpp. Semantics are
// those of the CPU kernels documented in ../kernels.h. Each returns the launch's cudaError_t.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kernels.h"

namespace popo {

cudaError_t logprob_entropy_fwd_cuda(const void* logits, DType dtype, int64_t rows, int64_t cols, int64_t valid,
                                     const int64_t* target, int64_t vocab_start, float* stats, cudaStream_t stream);

cudaError_t logprob_entropy_bwd_cuda(const void* logits, DType dtype, int64_t rows, int64_t cols, int64_t valid,
                                     const int64_t* target, int64_t vocab_start, const float* logz,
                                     const float* entropy, const float* grad_logp, const float* grad_entropy,
                                     void* grad, cudaStream_t stream);

// stats[4] is zeroed by the launch and accumulated with atomics.
cudaError_t clipped_surrogate_fwd_cuda(const void* logp, const void* old_logp, const void* adv, const void* mask,
                                       bool mask_is_bool, DType dtype, int64_t n, float eps_low, float eps_high,
                                       void* loss, float* stats, cudaStream_t stream);

cudaError_t clipped_surrogate_bwd_cuda(const void* grad_loss, const void* logp, const void* old_logp,
                                       const void* adv, const void* mask, bool mask_is_bool, DType dtype, int64_t n,
                                       float eps_low, float eps_high, void* grad_logp, cudaStream_t stream);

cudaError_t masked_mean_pool_fwd_cuda(const void* hidden, DType dtype, int64_t num_tokens, int64_t hidden_size,
                                      const int64_t* cu_seqlens, int64_t num_seqs, const void* mask,
                                      bool mask_is_bool, void* out, cudaStream_t stream);

cudaError_t masked_mean_pool_bwd_cuda(const void* grad_out, DType dtype, int64_t num_tokens, int64_t hidden_size,
                                      const int64_t* cu_seqlens, int64_t num_seqs, const void* mask,
                                      bool mask_is_bool, void* grad_hidden, cudaStream_t stream);

// normaliser and the loss are device scalars; the loss is zeroed by the launch.
cudaError_t cosine_penalty_fwd_cuda(const void* pred, DType pred_dtype, const void* target, DType target_dtype,
                                    const float* weights, const float* normaliser, int64_t rows, int64_t cols,
                                    float* loss, cudaStream_t stream);

cudaError_t cosine_penalty_bwd_cuda(const float* grad_loss, const void* pred, DType pred_dtype, const void* target,
                                    DType target_dtype, const float* weights, const float* normaliser, int64_t rows,
                                    int64_t cols, void* grad_pred, cudaStream_t stream);

}  // namespace popo
