// Plain C++ entry points of the CPU kernels (no torch): raw pointers, sizes, a thread count.
// The torch-facing checks and registration live in cpu_bindings.cpp. Shapes are row-major and
// contiguous. "elem" pointers hold fp32 or bf16 (as uint16) according to a DType argument.
#pragma once
#include <cstdint>

namespace popo {

enum class DType : int { F32 = 0, BF16 = 1 };

// Kernel 1, forward: per row of logits [rows, cols] (this rank's vocab shard, row stride cols)
// writes into stats [4, rows] (fp32), over the first `valid` columns only (0 <= valid <= cols;
// the rest is vocabulary padding and never read): m = max z, s = sum exp(z-m),
// q = sum exp(z-m)(z-m), zt = z[target - vocab_start] or 0 when the target lies outside
// [vocab_start, vocab_start + valid). valid == 0 gives m = -inf, s = q = 0.
void logprob_entropy_fwd_cpu(const void* logits, DType dtype, int64_t rows, int64_t cols, int64_t valid,
                             const int64_t* target, int64_t vocab_start, float* stats, int num_threads);

// Kernel 1, backward: grad [rows, cols] (dtype) = g_lp*(onehot - p) - g_ent*p*(z - logz + H),
// p = exp(z - logz), on the first `valid` columns; 0 on the padding columns [valid, cols).
// logz, entropy, g_lp, g_ent: [rows] fp32.
void logprob_entropy_bwd_cpu(const void* logits, DType dtype, int64_t rows, int64_t cols, int64_t valid,
                             const int64_t* target, int64_t vocab_start, const float* logz,
                             const float* entropy, const float* grad_logp, const float* grad_entropy,
                             void* grad, int num_threads);

// Kernel 2, forward: loss[i] = -min(rho*A, clip(rho, 1-el, 1+eh)*A) * mask, rho = exp(logp - old)
// (log-ratio 0 where mask == 0); stats[4] = {clip_low_count, clip_high_count, rho_sum, token_count}.
// logp/old/adv/loss share `dtype`; mask is fp32 (mask_is_bool = false) or bool bytes.
void clipped_surrogate_fwd_cpu(const void* logp, const void* old_logp, const void* adv, const void* mask,
                               bool mask_is_bool, DType dtype, int64_t n, float eps_low, float eps_high,
                               void* loss, float* stats, int num_threads);

// Kernel 2, backward: grad_logp[i] = -g[i]*A*rho*mask unless the clipped branch is the strict
// minimum (A > 0 and rho > 1+eh, or A < 0 and rho < 1-el), where it is 0.
void clipped_surrogate_bwd_cpu(const void* grad_loss, const void* logp, const void* old_logp, const void* adv,
                               const void* mask, bool mask_is_bool, DType dtype, int64_t n, float eps_low,
                               float eps_high, void* grad_logp, int num_threads);

// Kernel 3a, forward: out[b, :] = sum_{t in seg b} m_t h_t / sum m_t (zeros when sum m_t == 0).
void masked_mean_pool_fwd_cpu(const void* hidden, DType dtype, int64_t num_tokens, int64_t hidden_size,
                              const int64_t* cu_seqlens, int64_t num_seqs, const void* mask, bool mask_is_bool,
                              void* out, int num_threads);

// Kernel 3a, backward: grad_hidden[t, :] = m_t / sum_seg(m) * grad_out[b(t), :] (0 for empty segments).
void masked_mean_pool_bwd_cpu(const void* grad_out, DType dtype, int64_t num_tokens, int64_t hidden_size,
                              const int64_t* cu_seqlens, int64_t num_seqs, const void* mask, bool mask_is_bool,
                              void* grad_hidden, int num_threads);

// Kernel 3b, forward: loss = -(sum_b w_b cos(pred_b, target_b)) / max(normaliser, 1e-30); a pair
// with a norm below 1e-8 has cos 0. pred in pred_dtype, target in target_dtype, weights fp32.
void cosine_penalty_fwd_cpu(const void* pred, DType pred_dtype, const void* target, DType target_dtype,
                            const float* weights, float normaliser, int64_t rows, int64_t cols, float* loss,
                            int num_threads);

// Kernel 3b, backward: grad_pred[b] = -(g w_b / D) (t/(|p||t|) - cos p/|p|^2) for valid pairs.
void cosine_penalty_bwd_cpu(float grad_loss, const void* pred, DType pred_dtype, const void* target,
                            DType target_dtype, const float* weights, float normaliser, int64_t rows,
                            int64_t cols, void* grad_pred, int num_threads);

}  // namespace popo
