// Defines the statistics the `vimo bench` reports share: the median, and the paired ratio of two
// implementations timed in the same rounds (Note [Paired ratios]).
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

namespace vimo::trainer {

// Note [Paired ratios]
// This machine's speed moves by up to 4x between minutes. A benchmark that times implementation A for a
// while and then B reports that drift as a difference between them. So the reports run their contenders in
// rounds, each once per round, and a ratio is the median over rounds of that round's a / b: the two times of
// a round were taken seconds apart at most, and a slow round slows both. The order within a round rotates
// (round_order), so that no contender always runs right after the same one (caches, allocator state).

// The median of `values` (the mean of the middle two for an even count); 0 for none.
inline double median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// The median over rounds of numerator[r] / denominator[r], rounds with a zero denominator left out.
inline double paired_ratio(const std::vector<double>& numerator, const std::vector<double>& denominator) {
  std::vector<double> ratios;
  for (size_t r = 0; r < std::min(numerator.size(), denominator.size()); ++r) {
    if (denominator[r] > 0) ratios.push_back(numerator[r] / denominator[r]);
  }
  return median(ratios);
}

// The j-th contender (of k) to run in round `round`: the order rotates by one each round.
inline size_t round_order(size_t round, size_t j, size_t k) { return (round + j) % k; }

}  // namespace vimo::trainer
