// Internal to the fused LM-head losses (fused_linear_dpo.cpp, fused_linear_dpo_autograd.cpp): what one call
// computes, what the engine returns, and the engine itself, defined in fused_linear_dpo.cpp (Note [Fused
// linear LM-head losses] there).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "kernels/fused_linear_dpo.h"
#include "kernels/fused_linear_dpo_engine.h"

namespace vimo::kernels::detail {

enum class Objective { kLogProbs, kCrossEntropy, kMcDpo };

// What to compute, besides the tensors that autograd tracks.
struct Task {
  Objective objective = Objective::kLogProbs;
  McDpoConfig dpo;
  at::Tensor reference_logps;  // [R] float64, McDPO only
  LmHeadChunking chunking;
  int64_t answer_tokens = 0;  // N: all rows
  int64_t chosen_tokens = 0;  // N_c: rows 0..B−1
  VocabSlice slice;           // the vocabulary rows of `weight` (Note [Vocabulary-parallel LM-head losses])
};

// What the engine returns.
struct Passes {
  at::Tensor row_logps;    // [R] float64, on the CPU
  at::Tensor grad_hidden;  // [R·T, H] accumulation dtype, or undefined
  at::Tensor grad_weight;  // [V, H] accumulation dtype, or undefined
};

// The engine of Note [Fused linear LM-head losses] (fused_linear_dpo.cpp) on the device of hidden, outside
// autograd: pass 1 always; pass 2 for grad_hidden (need_hidden) and grad_W (need_weight) when the objective
// has a gradient.
Passes run_passes(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                  const at::Tensor& mask, const Task& task, bool need_hidden, bool need_weight);

}  // namespace vimo::kernels::detail
