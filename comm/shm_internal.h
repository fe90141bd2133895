// Internal to the shared-memory all-reduce (comm/shm_allreduce.cpp and comm/shm_segment.cpp): the segment's
// layout constants and its header, ShmAllreduce::Control.
#pragma once

#include <atomic>
#include <cstdint>
#include <new>

#include "comm/shm_allreduce.h"

namespace vimo::comm {
namespace shm_detail {

inline constexpr int64_t kPage = 4096;
inline constexpr int64_t kAlignment = 64;                  // every allocation starts on a cache line
inline constexpr uint64_t kMagic = 0x6d6873206f6d6976ull;  // "vimo shm"
inline constexpr uint64_t kGaveUp = ~uint64_t{0};  // a counter's value once its rank's operation failed

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

}  // namespace shm_detail

// The segment's header: the tag, then one counter per rank on a cache line of its own, from kCountersAt;
// then size() parts of part_stride_ bytes.
struct ShmAllreduce::Control {
  static constexpr int64_t kCountersAt = 64;
  static constexpr int64_t kCounterStride = 64;
  static_assert(std::atomic<uint64_t>::is_always_lock_free, "the counters are shared between processes");

  uint64_t magic;
  uint64_t tag;  // rank 0's random tag: another rank that reads it opened the same object

  // Rank q's counter: the last step of Note [A shared-memory all-reduce for one host] it finished, or
  // kGaveUp.
  std::atomic<uint64_t>& counter(int q) {
    return *std::launder(reinterpret_cast<std::atomic<uint64_t>*>(reinterpret_cast<char*>(this) +
                                                                  kCountersAt + kCounterStride * q));
  }
  static int64_t bytes(int ranks) {
    return shm_detail::round_up(kCountersAt + kCounterStride * ranks, shm_detail::kPage);
  }
};

}  // namespace vimo::comm
