// CUDA kernels of the fused linear McDPO / cross-entropy / log-prob engine (see fused_linear_dpo.cuh).
// Both kernels are memory-bound passes over one logits tile (the products around them are cuBLAS): the token
// statistics read each logit once (twice with keep_exp: read, then write exp), the gradient tile reads and
// writes each once. Block size 256 threads, float or double accumulation, registers only (no local memory:
// built with -Xptxas=-warn-spills).
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "kernels/cuda/fused_linear_dpo.cuh"
#include "kernels/dpo_math.h"

namespace vimo::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ inline T negative_infinity() {
  return -static_cast<T>(INFINITY);
}

// Folds the partial log-sum-exp (max, sum) into `into`; either may be the empty start (−inf, 0). Plain
// scalars (no struct by reference) keep the double instantiation in registers.
template <typename T>
__device__ inline void fold(T& into_max, T& into_sum, T max, T sum) {
  if (max == negative_infinity<T>()) return;
  const bool grows = max > into_max;
  const T e = exp(grows ? into_max - max : max - into_max);
  into_sum = grows ? into_sum * e + sum : into_sum + sum * e;
  into_max = grows ? max : into_max;
}

// Folds the (max, sum) of all 32 lanes of a warp into lane 0's.
template <typename T>
__device__ inline void warp_fold(T& max, T& sum) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const T other_max = __shfl_down_sync(0xffffffffu, max, offset);
    const T other_sum = __shfl_down_sync(0xffffffffu, sum, offset);
    fold(max, sum, other_max, other_sum);
  }
}

// One block per token row: each thread folds a strided subset of the row online, then the block combines
// the partial (max, sum) pairs with warp shuffles and one shared-memory step.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    token_statistics_kernel(T* tile, int64_t vc, int64_t v0, const int64_t* target_column, T* running_max,
                            T* running_sum, T* target_logit, bool keep_exp) {
  const int64_t k = blockIdx.x;
  T* row = tile + k * vc;
  T mine_max = negative_infinity<T>(), mine_sum = T(0);
  for (int64_t j = threadIdx.x; j < vc; j += kThreads) {
    const T z = row[j];
    // One exp per element: e = exp(smaller − larger) ≤ 1; exp(−inf) = 0 clears the empty start.
    const bool grows = z > mine_max;
    const T e = exp(grows ? mine_max - z : z - mine_max);
    mine_sum = grows ? mine_sum * e + T(1) : mine_sum + e;
    mine_max = grows ? z : mine_max;
  }
  // Fold the 256 partials: within each warp, then warp 0 folds the 8 warp results, all by shuffles.
  warp_fold(mine_max, mine_sum);
  __shared__ T warp_max[kWarps], warp_sum[kWarps];
  __shared__ T tile_max;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_max[warp] = mine_max;
    warp_sum[warp] = mine_sum;
  }
  __syncthreads();
  if (warp != 0) {
    if (!keep_exp) return;
  } else {
    T block_max = lane < kWarps ? warp_max[lane] : negative_infinity<T>();
    T block_sum = lane < kWarps ? warp_sum[lane] : T(0);
    warp_fold(block_max, block_sum);
    if (lane == 0) {
      dpo_math::RunningLogSumExp<T> running{running_max[k], running_sum[k]};
      dpo_math::merge_block(running, block_max, block_sum);  // the merge shared with the CPU engine
      running_max[k] = running.max;
      running_sum[k] = running.sum;
      tile_max = block_max;
      const int64_t y = target_column[k] - v0;
      if (y >= 0 && y < vc) target_logit[k] = row[y];
    }
    if (!keep_exp) return;
  }
  __syncthreads();  // the target logit is read before the row is overwritten
  const T m = tile_max;
  for (int64_t j = threadIdx.x; j < vc; j += kThreads) row[j] = exp(row[j] - m);
}

// blockIdx.y = token row, blockIdx.x · 256 + threadIdx.x strides over its columns.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gradient_tile_kernel(T* tile, int64_t rows, int64_t vc, int64_t v0, const int64_t* target_column,
                         const T* lse, const T* target_logit, const T* token_weight, const T* exp_scale) {
  // Rows stride over gridDim.y, which CUDA caps at 65535, so a chunk may hold any number of tokens.
  for (int64_t k = blockIdx.y; k < rows; k += gridDim.y) {
    T* row = tile + k * vc;
    const T w = token_weight[k], l = lse[k];
    const int64_t y = target_column[k] - v0;
    const T scale = exp_scale != nullptr ? exp_scale[k] : T(0);
    for (int64_t j = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; j < vc;
         j += static_cast<int64_t>(gridDim.x) * kThreads) {
      if (j == y) {
        row[j] = dpo_math::logit_gradient(target_logit[k], l, true, w);
      } else if (exp_scale != nullptr) {
        row[j] *= scale;
      } else {
        row[j] = dpo_math::logit_gradient(row[j], l, false, w);
      }
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_token_statistics(T* tile, int64_t c, int64_t vc, int64_t v0, const int64_t* target_column,
                                    T* running_max, T* running_sum, T* target_logit, bool keep_exp,
                                    cudaStream_t stream) {
  if (c == 0 || vc == 0) return cudaSuccess;
  token_statistics_kernel<T><<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
      tile, vc, v0, target_column, running_max, running_sum, target_logit, keep_exp);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gradient_tile(T* tile, int64_t c, int64_t vc, int64_t v0, const int64_t* target_column,
                                 const T* lse, const T* target_logit, const T* token_weight,
                                 const T* exp_scale, cudaStream_t stream) {
  if (c == 0 || vc == 0) return cudaSuccess;
  // Enough blocks per row to cover it with ~4 elements per thread, at most 64; one block row per token up to
  // CUDA's gridDim.y limit, past which the kernel's rows stride.
  const int64_t per_block = 4 * static_cast<int64_t>(kThreads);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((vc + per_block - 1) / per_block, 64)),
                  static_cast<unsigned>(std::min<int64_t>(c, 65535)));
  gradient_tile_kernel<T><<<grid, kThreads, 0, stream>>>(tile, c, vc, v0, target_column, lse, target_logit,
                                                         token_weight, exp_scale);
  return cudaGetLastError();
}

template cudaError_t launch_token_statistics<float>(float*, int64_t, int64_t, int64_t, const int64_t*, float*,
                                                    float*, float*, bool, cudaStream_t);
template cudaError_t launch_token_statistics<double>(double*, int64_t, int64_t, int64_t, const int64_t*,
                                                     double*, double*, double*, bool, cudaStream_t);
template cudaError_t launch_gradient_tile<float>(float*, int64_t, int64_t, int64_t, const int64_t*,
                                                 const float*, const float*, const float*, const float*,
                                                 cudaStream_t);
template cudaError_t launch_gradient_tile<double>(double*, int64_t, int64_t, int64_t, const int64_t*,
                                                  const double*, const double*, const double*, const double*,
                                                  cudaStream_t);

}  // namespace vimo::kernels::cuda
