// Defines the two CUDA kernels of the fused linear McDPO / cross-entropy / log-prob engine (see Note [Fused
// linear LM-head losses] in kernels/fused_linear_dpo.cpp), as plain launchers on raw device pointers so that
// this header and the .cu include no LibTorch header (the engine in fused_linear_dpo.cpp makes the LM-head
// products with at::mm / addmm on CUDA tensors, i.e. cuBLAS, and calls these on the tiles):
//   token statistics   per token of a logits tile: online log-sum-exp merge and the target logit (pass 1)
//   gradient tile      w·(softmax − onehot) in place over a logits tile (pass 2)
// The per-element math is kernels/dpo_math.h, shared with the CPU engine. T is the accumulation type: float
// (float32 and bfloat16 inputs) or double.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace vimo::kernels::cuda {

// tile [c, vc] row-major: logits z of c tokens over vocabulary columns [v0, v0 + vc) of the slice.
// target_column [c]: the target's column in the slice, or −1 outside it. For every token k:
//   (running_max[k], running_sum[k]) ← merge with (max_j z[k, j], Σ_j exp(z[k, j] − max))
//   target_logit[k] ← z[k, target − v0] when the target lies in this tile (left alone otherwise)
// keep_exp: also overwrite the tile with exp(z − max of this tile), for a pass 2 that reuses it (only when
// the tile is the token's whole slice, so the tile's max is the running max). Start the running state at
// (−inf, 0). One block per token.
template <typename T>
cudaError_t launch_token_statistics(T* tile, int64_t c, int64_t vc, int64_t v0, const int64_t* target_column,
                                    T* running_max, T* running_sum, T* target_logit, bool keep_exp,
                                    cudaStream_t stream);

// In place over tile [c, vc] (columns [v0, v0 + vc) of the slice), per token k with weight w_k =
// token_weight[k], log-sum-exp lse[k] over the whole vocabulary and target logit target_logit[k]:
//   exp_scale == nullptr: the tile holds logits z;          non-target: w·exp(z − lse)
//   exp_scale != nullptr: the tile holds exp(z − tile max); non-target: tile · exp_scale[k]
//                         (exp_scale[k] = w·exp(tile max − max) / Σ: the same value without a second exp)
//   target column: w·expm1(target_logit − lse) (dpo_math::logit_gradient: no cancellation as p → 1).
template <typename T>
cudaError_t launch_gradient_tile(T* tile, int64_t c, int64_t vc, int64_t v0, const int64_t* target_column,
                                 const T* lse, const T* target_logit, const T* token_weight,
                                 const T* exp_scale, cudaStream_t stream);

}  // namespace vimo::kernels::cuda
