// Fresh random inputs for every test run, with the seed printed so a failure can be replayed:
// VIMO_TEST_SEED=<seed> reruns with the same inputs.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>

namespace vimo::testing {

inline uint64_t fresh_seed() {
  if (const char* fixed = std::getenv("VIMO_TEST_SEED")) return std::stoull(fixed);
  return std::random_device{}();
}

// Seeds LibTorch's generator and records the seed in the test's output (shown on failure).
inline uint64_t seed_torch() {
  const uint64_t seed = fresh_seed();
  at::manual_seed(seed);
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  std::printf("[ seed     ] VIMO_TEST_SEED=%llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

}  // namespace vimo::testing
