// Declares the summing loop of the shared-memory all-reduce (comm/shm_allreduce.cpp): plain loops over
// float32 / float64, in a translation unit of their own so that they are compiled with -O3 and vectorized
// (at -O2 GCC 12 leaves them scalar), without LibTorch's headers.
#pragma once

#include <cstdint>

namespace vimo::comm::shm_detail {

// dst[i] = src[0][i] + src[1][i] + ... + src[ranks-1][i], summed in that order, then divided by `ranks` when
// `average`; i in [0, n). dst may be one of the sources (the same elements), no other overlap.
void sum_parts(float* dst, const float* const* src, int ranks, int64_t n, bool average);
void sum_parts(double* dst, const double* const* src, int ranks, int64_t n, bool average);

}  // namespace vimo::comm::shm_detail
