// Declares the CUDA element kernels of the fused symmetric InfoNCE (kernels/cuda/fused_contrastive.cu), the
// twin of the CPU loops in kernels/fused_contrastive.cpp: both run the math of kernels/contrastive_math.h and
// the same two passes (Note [Two-pass symmetric InfoNCE]); the strip products are cuBLAS calls made by the
// caller through at::mm on CUDA tensors. Plain C++ (no LibTorch, no CUDA syntax), so the host code includes
// it; every pointer is device memory, every matrix row-major and contiguous, T is float or double, and each
// call only enqueues work on `stream`.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vimo::kernels::cuda {

// lse[i] = log Σ_j exp(scores[i, j]) for the strip scores [rows, columns].
template <typename T>
void row_log_sum_exp(const T* scores, int64_t rows, int64_t columns, T* lse, cudaStream_t stream);

// Folds the strip scores [rows, columns] into each column's running (max, Σ exp(score − max)), both
// [columns]; start them at (−inf, 0).
template <typename T>
void fold_column_statistics(const T* scores, int64_t rows, int64_t columns, T* running_max, T* running_sum,
                            cudaStream_t stream);

// lse[j] = running_max[j] + log running_sum[j] for [columns].
template <typename T>
void finish_column_log_sum_exp(const T* running_max, const T* running_sum, int64_t columns, T* lse,
                               cudaStream_t stream);

// Overwrites the strip scores [rows, columns] (global rows first_row …) with dL/dS: coefficient · (softmax
// of the row, plus softmax of the column when column_lse is not null) minus the one-hot part at column
// positive_offset + global row (twice when column_lse is given).
template <typename T>
void scores_to_gradient(T* scores, int64_t rows, int64_t columns, const T* row_lse, const T* column_lse,
                        T coefficient, int64_t first_row, int64_t positive_offset, cudaStream_t stream);

}  // namespace vimo::kernels::cuda
