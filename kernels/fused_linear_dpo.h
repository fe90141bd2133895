// Defines the fused LM-head losses of the motion LLM on CPU and CUDA (DESIGN.md, "The two losses"): the McDPO
// loss, the SFT cross-entropy and the per-sequence log-probs of the frozen reference model, each computed
// from the hidden states and the LM head weight without ever materializing the [R, T, V] logits; plus the
// eager LibTorch compositions they are tested and benchmarked against. One implementation serves all three
// (see Note [Fused linear LM-head losses] in fused_linear_dpo.cpp).
//
// Shapes: R rows (sequences), T positions, H hidden, V vocabulary. For McDPO R = 2B: chosen rows 0..B−1,
// then the rejected rows B..2B−1, row i and row B + i forming pair i.
//   hidden   [R, T, H]  float32, float64 or bfloat16 (the final hidden states, already shifted: position t
//                       predicts targets[., t])
//   weight   [V, H]     the LM head, same dtype as hidden
//   targets  [R, T]     int64 token ids; read only where the mask is set, so padding may hold anything
//   mask     [R, T]     bool, true on answer tokens (the motion codes + end), the only tokens that count
// float32 and bfloat16 accumulate in float32 (float64 for the per-sequence sums), float64 in float64.
// All four tensors on one device: CPU, or CUDA in a build with VIMO_HAVE_CUDA
// (kernels/cuda/fused_linear_dpo.cu); the results are on that device (reference_logps may be anywhere).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace vimo::kernels {

// How the kernel tiles the work. Beyond the inputs and the gradients (held in float32, plus a float32 copy of
// a bfloat16 weight), extra memory is one tile of logits [tokens, min(vocabulary, V)] and O(tokens · H).
// McDPO visits whole pairs: a pair with more answer tokens than `tokens` is split, at the cost of recomputing
// its logits (a fourth LM-head product), so `tokens` ≥ the longest pair's answer is fastest.
struct LmHeadChunking {
  int64_t tokens = 1024;   // answer tokens per chunk, ≥ 1
  int64_t vocabulary = 0;  // vocabulary entries per chunk, 0 = the whole vocabulary in one chunk
};

// L = α·mean_pairs[−(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)] + γ·CE(chosen answer tokens, mean per token)
struct McDpoConfig {
  double beta = 0.1, alpha = 1.0, gamma = 0.1, epsilon = 0.0;
};

// The loss and the metrics of DESIGN.md. Only `loss` is differentiable; the rest is detached, in the
// accumulation dtype (float32, or float64 for float64 inputs).
struct McDpoResult {
  at::Tensor loss;                              // [] dtype of hidden
  at::Tensor dpo_loss, sft_loss;                // [] the two terms before α and γ (losses/dpo, losses/sft)
  at::Tensor logps_chosen, logps_rejected;      // [B] logπθ(y_w), logπθ(y_l)
  at::Tensor rewards_chosen, rewards_rejected;  // [B] β(logπθ − logπref) of each side
  at::Tensor accuracy, margin;  // [] mean(chosen reward > rejected), mean(chosen − rejected)
};

// McDPO from hidden states [2B, T, H] and the LM head [V, H]; `reference_logps` [2B] holds logπref of each
// row (from fused_linear_sequence_logps on the frozen model, or the preference shards). Gradients reach
// hidden and weight where they require grad. They are computed in the forward and handed over once: a
// second backward (retain_graph) and double backward (create_graph) are refused, the latter because its
// second-order terms would silently be zero. The same holds for fused_linear_cross_entropy.
McDpoResult fused_linear_mcdpo(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                               const at::Tensor& mask, const at::Tensor& reference_logps,
                               const McDpoConfig& config = {}, const LmHeadChunking& chunking = {});

// Σ_{answer tokens} log softmax(h·Wᵀ)[target] per row → [R] in the accumulation dtype, without gradient (the
// frozen reference model, evaluation).
at::Tensor fused_linear_sequence_logps(const at::Tensor& hidden, const at::Tensor& weight,
                                       const at::Tensor& targets, const at::Tensor& mask,
                                       const LmHeadChunking& chunking = {});

// SFT: cross-entropy mean over all answer tokens → [] dtype of hidden, differentiable (0 with no answer
// token).
at::Tensor fused_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                      const at::Tensor& targets, const at::Tensor& mask,
                                      const LmHeadChunking& chunking = {});

// The eager compositions: logits = h·Wᵀ [R, T, V], log_softmax, gather, masked sums, the formula, all in the
// inputs' dtype and differentiated by LibTorch's autograd. The references of tests and benchmark.
McDpoResult eager_mcdpo(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                        const at::Tensor& mask, const at::Tensor& reference_logps,
                        const McDpoConfig& config = {});
at::Tensor eager_sequence_logps(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                const at::Tensor& mask);
at::Tensor eager_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                               const at::Tensor& mask);

}  // namespace vimo::kernels
