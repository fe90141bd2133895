// Defines the scalar math of the McDPO loss (DESIGN.md, "The two losses") shared by the CPU kernel in
// fused_linear_dpo.cpp and a future CUDA twin: stable log σ and σ, one pair's loss term and its derivative,
// the per-row gradient coefficients dL/dlogπθ, the online log-sum-exp merge, and the gradient of one logit.
// Every function is `VIMO_HOST_DEVICE inline` and templated on the accumulation type (float or double).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define VIMO_HOST_DEVICE __host__ __device__
#else
#define VIMO_HOST_DEVICE
#endif

namespace vimo::kernels::dpo_math {

// log σ(x) = min(x, 0) − log1p(exp(−|x|)): exp never sees a positive argument, so it is finite for every
// finite x (the naive −log(1 + exp(−x)) overflows for x < −88 in float32).
template <typename T>
VIMO_HOST_DEVICE inline T log_sigmoid(T x) {
  return (x < T(0) ? x : T(0)) - std::log1p(std::exp(-std::fabs(x)));
}

// σ(x) through exp(−|x|) for the same reason.
template <typename T>
VIMO_HOST_DEVICE inline T sigmoid(T x) {
  const T e = std::exp(-std::fabs(x));
  return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// Δ = (logπθ(y_w) − logπref(y_w)) − (logπθ(y_l) − logπref(y_l)).
template <typename T>
VIMO_HOST_DEVICE inline T pair_delta(T policy_chosen, T reference_chosen, T policy_rejected,
                                     T reference_rejected) {
  return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected);
}

// One pair's term ℓ(Δ) = −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ) and dℓ/dΔ = β·(−(1−ε)·σ(−βΔ) + ε·σ(βΔ)).
template <typename T>
struct PairTerm {
  T loss;
  T d_delta;
};

template <typename T>
VIMO_HOST_DEVICE inline PairTerm<T> mcdpo_pair_term(T delta, T beta, T epsilon) {
  const T z = beta * delta;
  return {-(T(1) - epsilon) * log_sigmoid(z) - epsilon * log_sigmoid(-z),
          beta * (-(T(1) - epsilon) * sigmoid(-z) + epsilon * sigmoid(z))};
}

// dL/dlogπθ of the chosen and the rejected row of one pair, for
//   L = α·mean_pairs ℓ(Δ) + γ·CE(chosen answer tokens, mean per token) = α/P·Σ ℓ(Δ_i) − γ/N_c·Σ_i
//   logπθ(y_w,i)
// with P pairs and N_c chosen answer tokens in the whole batch (`gamma_per_token` = γ/N_c, or 0 when N_c =
// 0).
template <typename T>
struct RowCoefficients {
  T chosen, rejected;
};

template <typename T>
VIMO_HOST_DEVICE inline RowCoefficients<T> mcdpo_row_coefficients(T d_delta, T alpha_per_pair,
                                                                  T gamma_per_token) {
  return {alpha_per_pair * d_delta - gamma_per_token, -alpha_per_pair * d_delta};
}

// A running log-sum-exp over vocabulary blocks (online softmax, Milakov & Gimelshein): the largest logit
// seen and Σ exp(logit − max). Start at {−inf, 0}; lse = max + log(sum).
template <typename T>
struct RunningLogSumExp {
  T max;
  T sum;
};

// Folds one block, given as its own (max, Σ exp(logit − block_max)), into `running`.
template <typename T>
VIMO_HOST_DEVICE inline void merge_block(RunningLogSumExp<T>& running, T block_max, T block_sum) {
  if (block_max <= running.max) {
    running.sum += block_sum * std::exp(block_max - running.max);
  } else {
    // exp(−inf − finite) = 0 clears the empty start.
    running.sum = running.sum * std::exp(running.max - block_max) + block_sum;
    running.max = block_max;
  }
}

template <typename T>
VIMO_HOST_DEVICE inline T log_sum_exp(const RunningLogSumExp<T>& running) {
  return running.max + std::log(running.sum);
}

// dL/dz for one logit z of a token with log-sum-exp `lse` and weight w = −dL/dlogπ(token):
// w·(softmax − onehot). The target's (p − 1) is formed as expm1(z − lse) in T, never as a rounded p minus 1,
// which would cancel catastrophically as p → 1 (the precision fix Liger applies for bfloat16).
template <typename T>
VIMO_HOST_DEVICE inline T logit_gradient(T logit, T lse, bool is_target, T weight) {
  const T shifted = logit - lse;
  return weight * (is_target ? std::expm1(shifted) : std::exp(shifted));
}

}  // namespace vimo::kernels::dpo_math
