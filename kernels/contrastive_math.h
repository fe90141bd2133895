// Defines the per-element math of the fused symmetric InfoNCE (DESIGN.md, "The two losses"), shared by the
// CPU kernel (fused_contrastive.cpp) and its CUDA twin (cuda/fused_contrastive.cu): the online log-sum-exp
// (reused from dpo_math.h), the gradient of one score, dL/dS = c·(softmax_row + softmax_column) − c·onehot,
// and where the one-hot part falls. See Note [Two-pass symmetric InfoNCE] in fused_contrastive.cpp.
// Every function is `VIMO_HOST_DEVICE inline` and templated on the value type (float or double). The CUDA
// kernels use them as they are. The CPU kernel uses the one-hot rule as it is and evaluates score_gradient's
// formula factored so that one exponential per score serves both softmaxes (Note [Shared exponentials] in
// fused_contrastive.cpp), as whole-strip ATen operations (ATen's vectorized exp: this project does not
// compile its own code per CPU capability). The exponential is a parameter so a vector type (e.g.
// at::vec::Vectorized) can use the same function.
#pragma once

#include <cmath>

#include "kernels/dpo_math.h"  // VIMO_HOST_DEVICE, RunningLogSumExp, merge_block, log_sum_exp

namespace vimo::kernels::contrastive_math {

using dpo_math::log_sum_exp;
using dpo_math::RunningLogSumExp;

// Folds one block of scores, given as (its max, Σ exp(score − its max)), into `running`. An empty block
// (sum 0, e.g. a thread that saw no rows) is skipped: merging −inf into −inf would compute 0 · exp(NaN).
template <typename T>
VIMO_HOST_DEVICE inline void merge_block(RunningLogSumExp<T>& running, T block_max, T block_sum) {
  if (block_sum > T(0)) dpo_math::merge_block(running, block_max, block_sum);
}

// The exponential of a scalar, for host and device; the CPU kernel passes its own for SIMD vectors.
struct ScalarExp {
  template <typename T>
  VIMO_HOST_DEVICE T operator()(T x) const {
    using std::exp;
    return exp(x);
  }
};

// dL/dS[i, j] without its one-hot part, for a score S[i, j] whose row has log-sum-exp `row_lse` and whose
// column has `column_lse`. kColumns: the same score matrix is also the other direction's logits, transposed
// (one process: text→video rows are video→text columns), so both softmaxes meet in one gradient.
// `coefficient` c = dL_out / (2n): each direction is a mean over n rows and the two directions are averaged.
template <bool kColumns, typename T, typename Exp>
VIMO_HOST_DEVICE inline T score_gradient(T score, T row_lse, T column_lse, T coefficient, Exp exp) {
  if constexpr (kColumns) {
    return coefficient * (exp(score - row_lse) + exp(score - column_lse));
  } else {
    return coefficient * exp(score - row_lse);
  }
}

// The one-hot part: row i's positive is column positive_offset + i, and with kColumns column j's positive is
// row j (then positive_offset is 0 and the matrix is square), so the diagonal carries c once per direction.
template <typename T>
VIMO_HOST_DEVICE inline T positive_correction(bool columns, T coefficient) {
  return columns ? T(2) * coefficient : coefficient;
}

}  // namespace vimo::kernels::contrastive_math
