// The summing loop of the shared-memory all-reduce (see shm_sum.h).
#include "comm/shm_sum.h"

#include <algorithm>
#include <cstring>

namespace vimo::comm::shm_detail {
namespace {

// Through a block on the stack, because dst is also one of the sources: the compiler may then vectorize
// without checking for overlap.
template <typename T>
void sum(T* dst, const T* const* src, int ranks, int64_t n, bool average) {
  constexpr int64_t kBlock = 1024;
  T acc[kBlock];
  const T divisor = static_cast<T>(ranks);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    std::memcpy(acc, src[0] + b, static_cast<size_t>(m) * sizeof(T));
    for (int q = 1; q < ranks; ++q) {
      const T* s = src[q] + b;
      for (int64_t i = 0; i < m; ++i) acc[i] += s[i];
    }
    if (average) {
      for (int64_t i = 0; i < m; ++i) dst[b + i] = acc[i] / divisor;
    } else {
      std::memcpy(dst + b, acc, static_cast<size_t>(m) * sizeof(T));
    }
  }
}

}  // namespace

void sum_parts(float* dst, const float* const* src, int ranks, int64_t n, bool average) {
  sum(dst, src, ranks, n, average);
}
void sum_parts(double* dst, const double* const* src, int ranks, int64_t n, bool average) {
  sum(dst, src, ranks, n, average);
}

}  // namespace vimo::comm::shm_detail
