// CUDA element kernels of the fused symmetric InfoNCE (declared in fused_contrastive.cuh): the twin of the
// CPU strip loops in kernels/fused_contrastive.cpp, running the same per-element math (contrastive_math.h).
// See Note [Two-pass symmetric InfoNCE] there; the strip products S = R̃ · C̃ᵀ, G · C̃ and Gᵀ · R̃ are cuBLAS
// calls the caller makes through at::mm. Each kernel reads its strip once:
//   row_log_sum_exp          one block per row, an online (max, Σ exp) per thread merged across the block
//   fold_column_statistics   32 columns × 8 row groups per block, merged into each column's running pair
//   scores_to_gradient       elementwise: S → c·(softmax_row [+ softmax_column]) − c·onehot, in place
// Values and accumulation are in T (float for float32 and bfloat16 inputs, which the caller converts once;
// double for float64). Compiled for sm_80 and sm_90 with ptxas warnings as errors and spill warnings on, so
// a register spill to local memory fails the build (kernels/CMakeLists.txt, Note [No local-memory spills]).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/contrastive_math.h"
#include "kernels/cuda/fused_contrastive.cuh"

// Reports the failing call with file:line (llm.c's cudaCheck), as an exception the caller's frames unwind.
#define VIMO_CUDA_CHECK(call)                                                                              \
  do {                                                                                                     \
    const cudaError_t vimo_status = (call);                                                                \
    if (vimo_status != cudaSuccess) {                                                                      \
      throw std::runtime_error(std::string("CUDA error at ") + __FILE__ + ":" + std::to_string(__LINE__) + \
                               ": " + cudaGetErrorString(vimo_status) +                                    \
                               "; HINT: rerun with CUDA_LAUNCH_BLOCKING=1 to find the failing kernel");    \
    }                                                                                                      \
  } while (0)

namespace vimo::kernels::cuda {
namespace {

namespace math = contrastive_math;
using math::RunningLogSumExp;

constexpr int kRowThreads = 256;                      // row_log_sum_exp: threads per row
constexpr int kColumnsPerBlock = 32, kRowGroups = 8;  // fold_column_statistics: block shape
constexpr int kGradientThreads = 256, kMaxGridRows = 65535;

template <typename T>
__device__ RunningLogSumExp<T> empty_statistics() {
  return {-T(INFINITY), T(0)};  // INFINITY: numeric_limits is host-only without --expt-relaxed-constexpr
}

// Merges the (max, Σ exp) pairs of a warp's lanes; every lane ends with the warp's pair.
template <typename T>
__device__ void merge_across_warp(RunningLogSumExp<T>& running) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const T other_max = __shfl_xor_sync(0xffffffffu, running.max, offset);
    const T other_sum = __shfl_xor_sync(0xffffffffu, running.sum, offset);
    math::merge_block(running, other_max, other_sum);
  }
}

// lse[row] for one row per block: each thread folds its columns online, then warps and the block merge.
template <typename T>
__global__ void row_log_sum_exp_kernel(const T* __restrict__ scores, int64_t columns, T* __restrict__ lse) {
  __shared__ T warp_max[kRowThreads / 32], warp_sum[kRowThreads / 32];
  const T* row = scores + static_cast<int64_t>(blockIdx.x) * columns;
  RunningLogSumExp<T> running = empty_statistics<T>();
  for (int64_t j = threadIdx.x; j < columns; j += blockDim.x) math::merge_block(running, row[j], T(1));
  merge_across_warp(running);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_max[warp] = running.max;
    warp_sum[warp] = running.sum;
  }
  __syncthreads();
  if (warp != 0) return;
  running =
      lane < kRowThreads / 32 ? RunningLogSumExp<T>{warp_max[lane], warp_sum[lane]} : empty_statistics<T>();
  merge_across_warp(running);
  if (lane == 0) lse[blockIdx.x] = math::log_sum_exp(running);
}

// Folds rows [0, rows) of 32 columns per block into the columns' running pairs: row group y takes rows
// y, y + 8, …; the 8 partial pairs of a column merge in shared memory, then into the running pair.
template <typename T>
__global__ void fold_column_statistics_kernel(const T* __restrict__ scores, int64_t rows, int64_t columns,
                                              T* __restrict__ running_max, T* __restrict__ running_sum) {
  __shared__ T partial_max[kRowGroups][kColumnsPerBlock], partial_sum[kRowGroups][kColumnsPerBlock];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColumnsPerBlock + threadIdx.x;
  RunningLogSumExp<T> running = empty_statistics<T>();
  if (j < columns) {
    for (int64_t i = threadIdx.y; i < rows; i += kRowGroups)
      math::merge_block(running, scores[i * columns + j], T(1));
  }
  partial_max[threadIdx.y][threadIdx.x] = running.max;
  partial_sum[threadIdx.y][threadIdx.x] = running.sum;
  __syncthreads();
  if (threadIdx.y != 0 || j >= columns) return;
  running = {running_max[j], running_sum[j]};
  for (int y = 0; y < kRowGroups; ++y)
    math::merge_block(running, partial_max[y][threadIdx.x], partial_sum[y][threadIdx.x]);
  running_max[j] = running.max;
  running_sum[j] = running.sum;
}

template <typename T>
__global__ void finish_column_log_sum_exp_kernel(const T* __restrict__ running_max,
                                                 const T* __restrict__ running_sum, int64_t columns,
                                                 T* __restrict__ lse) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < columns) lse[j] = math::log_sum_exp(RunningLogSumExp<T>{running_max[j], running_sum[j]});
}

// scores[i, j] ← dL/dS[i, j]; rows stride over gridDim.y, columns over the x grid.
template <bool kColumns, typename T>
__global__ void scores_to_gradient_kernel(T* __restrict__ scores, int64_t rows, int64_t columns,
                                          const T* __restrict__ row_lse, const T* __restrict__ column_lse,
                                          T coefficient, int64_t first_row, int64_t positive_offset) {
  const T correction = math::positive_correction(kColumns, coefficient);
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    T* row = scores + i * columns;
    const T lse = row_lse[i];
    const int64_t positive = positive_offset + first_row + i;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < columns;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      T g = math::score_gradient<kColumns>(row[j], lse, kColumns ? column_lse[j] : T(0), coefficient,
                                           math::ScalarExp{});
      if (j == positive) g -= correction;
      row[j] = g;
    }
  }
}

unsigned blocks_for(int64_t count, int threads) {
  return static_cast<unsigned>((count + threads - 1) / threads);
}

}  // namespace

template <typename T>
void row_log_sum_exp(const T* scores, int64_t rows, int64_t columns, T* lse, cudaStream_t stream) {
  if (rows == 0) return;
  // One block per row: a strip has at most `tile` rows, far below the 2^31 − 1 grid limit.
  row_log_sum_exp_kernel<T><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(scores, columns, lse);
  VIMO_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void fold_column_statistics(const T* scores, int64_t rows, int64_t columns, T* running_max, T* running_sum,
                            cudaStream_t stream) {
  if (rows == 0 || columns == 0) return;
  const dim3 block(kColumnsPerBlock, kRowGroups);
  fold_column_statistics_kernel<T><<<blocks_for(columns, kColumnsPerBlock), block, 0, stream>>>(
      scores, rows, columns, running_max, running_sum);
  VIMO_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void finish_column_log_sum_exp(const T* running_max, const T* running_sum, int64_t columns, T* lse,
                               cudaStream_t stream) {
  if (columns == 0) return;
  finish_column_log_sum_exp_kernel<T>
      <<<blocks_for(columns, 256), 256, 0, stream>>>(running_max, running_sum, columns, lse);
  VIMO_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void scores_to_gradient(T* scores, int64_t rows, int64_t columns, const T* row_lse, const T* column_lse,
                        T coefficient, int64_t first_row, int64_t positive_offset, cudaStream_t stream) {
  if (rows == 0 || columns == 0) return;
  const dim3 grid(blocks_for(columns, kGradientThreads),
                  static_cast<unsigned>(rows < kMaxGridRows ? rows : kMaxGridRows));
  if (column_lse) {
    scores_to_gradient_kernel<true, T><<<grid, kGradientThreads, 0, stream>>>(
        scores, rows, columns, row_lse, column_lse, coefficient, first_row, positive_offset);
  } else {
    scores_to_gradient_kernel<false, T><<<grid, kGradientThreads, 0, stream>>>(
        scores, rows, columns, row_lse, column_lse, coefficient, first_row, positive_offset);
  }
  VIMO_CUDA_CHECK(cudaGetLastError());
}

#define VIMO_INSTANTIATE(T)                                                                          \
  template void row_log_sum_exp<T>(const T*, int64_t, int64_t, T*, cudaStream_t);                    \
  template void fold_column_statistics<T>(const T*, int64_t, int64_t, T*, T*, cudaStream_t);         \
  template void finish_column_log_sum_exp<T>(const T*, const T*, int64_t, T*, cudaStream_t);         \
  template void scores_to_gradient<T>(T*, int64_t, int64_t, const T*, const T*, T, int64_t, int64_t, \
                                      cudaStream_t);
VIMO_INSTANTIATE(float)
VIMO_INSTANTIATE(double)
#undef VIMO_INSTANTIATE

}  // namespace vimo::kernels::cuda
