// Implements SampleOrder (see Note [Block shuffle across shards] in the header).
#include "data/sample_order.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <stdexcept>

namespace vimo::data {

namespace {

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Fisher-Yates over raw mt19937_64 draws. Hand-written because std::shuffle's use of the engine is
// implementation-defined, and the order must be the same with any standard library. The modulo bias is below
// size / 2^64.
template <typename T>
void shuffle(std::vector<T>& values, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t i = values.size(); i > 1; --i) {
    const auto j = static_cast<size_t>(rng() % static_cast<uint64_t>(i));
    std::swap(values[i - 1], values[j]);
  }
}

constexpr uint64_t kShardStream = 0x5348415244ULL;  // "SHARD"
constexpr uint64_t kBlockStream = 0x424c4f434bULL;  // "BLOCK"

}  // namespace

std::string keys_fingerprint(const std::vector<int64_t>& keys) {
  return fmt::format("{:016x}", XXH3_64bits(keys.data(), keys.size() * sizeof(int64_t)));
}

uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b) {
  return splitmix(splitmix(splitmix(seed) ^ a) ^ b);
}

SampleOrder::SampleOrder(std::vector<uint64_t> shard_records, uint64_t seed, int64_t block, bool shuffle)
    : shard_records_(std::move(shard_records)), seed_(seed), block_(block), shuffle_(shuffle) {
  if (block_ < 1)
    throw std::runtime_error(fmt::format("sample order: shuffle block {} must be >= 1", block_));
  for (const uint64_t records : shard_records_) {
    shard_keys_.push_back(total_);
    total_ += static_cast<int64_t>(records);
  }
  if (total_ == 0) throw std::runtime_error("sample order: the shards hold no records");
}

void SampleOrder::build_layout(int64_t epoch) const {
  layout_.epoch = epoch;
  layout_.shard_order.resize(shard_records_.size());
  std::iota(layout_.shard_order.begin(), layout_.shard_order.end(), uint32_t{0});
  if (shuffle_) shuffle(layout_.shard_order, mix_seed(seed_, kShardStream, static_cast<uint64_t>(epoch)));
  layout_.starts.clear();
  int64_t position = 0;
  for (const uint32_t shard : layout_.shard_order) {
    layout_.starts.push_back(position);
    position += static_cast<int64_t>(shard_records_[shard]);
  }
  cached_block_ = -1;
}

void SampleOrder::build_block(int64_t epoch, int64_t block) const {
  const int64_t begin = block * block_;
  const int64_t length = std::min(block_, total_ - begin);
  block_permutation_.resize(static_cast<size_t>(length));
  std::iota(block_permutation_.begin(), block_permutation_.end(), int64_t{0});
  if (shuffle_) {
    shuffle(block_permutation_,
            mix_seed(seed_ ^ kBlockStream, static_cast<uint64_t>(epoch), static_cast<uint64_t>(block)));
  }
  cached_block_ = block;
}

SampleRef SampleOrder::at(int64_t epoch, int64_t position) const {
  if (position < 0 || position >= total_ || epoch < 0) {
    throw std::runtime_error(
        fmt::format("sample order: position {} of epoch {} is outside [0, {})", position, epoch, total_));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return locate(epoch, position);
}

std::vector<SampleRef> SampleOrder::range(int64_t epoch, int64_t begin, int64_t count) const {
  if (begin < 0 || count < 0 || epoch < 0) {
    throw std::runtime_error(fmt::format(
        "sample order: a range needs begin, count and epoch >= 0, got begin {}, count {}, epoch {}", begin,
        count, epoch));
  }
  std::vector<SampleRef> refs;
  refs.reserve(static_cast<size_t>(count));
  std::lock_guard<std::mutex> lock(mutex_);
  for (int64_t i = 0; i < count; ++i) refs.push_back(locate(epoch, (begin + i) % total_));
  return refs;
}

SampleRef SampleOrder::locate(int64_t epoch, int64_t position) const {
  if (layout_.epoch != epoch) build_layout(epoch);
  const int64_t block = position / block_;
  if (cached_block_ != block) build_block(epoch, block);
  const int64_t source = block * block_ + block_permutation_[static_cast<size_t>(position - block * block_)];
  // The ordered shard holding position `source`: the last start <= source.
  const auto it = std::upper_bound(layout_.starts.begin(), layout_.starts.end(), source) - 1;
  const auto slot = static_cast<size_t>(it - layout_.starts.begin());
  SampleRef ref;
  ref.shard = layout_.shard_order[slot];
  ref.record = static_cast<uint64_t>(source - *it);
  ref.key = shard_keys_[ref.shard] + static_cast<int64_t>(ref.record);
  return ref;
}

std::string sampler_state_json(const SamplerState& state, const std::string& order) {
  return nlohmann::json{{"seed", state.seed},
                        {"epoch", state.epoch},
                        {"samples_consumed", state.samples_consumed},
                        {"order", order}}
      .dump();
}

SamplerState parse_sampler_state_json(const std::string& text, const std::string& source,
                                      std::string* order) {
  const nlohmann::json json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!json.is_object()) {
    throw std::runtime_error(
        fmt::format("{}: not a JSON object of the loader state (seed, epoch, "
                    "samples_consumed). HINT: the checkpoint was not written by vimo",
                    source));
  }
  const auto number = [&](const char* key) -> const nlohmann::json& {
    if (!json.contains(key))
      throw std::runtime_error(fmt::format("{}: the key '{}' is missing", source, key));
    const nlohmann::json& value = json[key];
    if (!value.is_number_integer() ||
        (value.is_number_integer() && !value.is_number_unsigned() && value.get<int64_t>() < 0)) {
      throw std::runtime_error(
          fmt::format("{}: '{}' must be a non-negative integer, found {}", source, key, value.dump()));
    }
    return value;
  };
  SamplerState state;
  state.seed = number("seed").get<uint64_t>();
  state.epoch = number("epoch").get<int64_t>();
  state.samples_consumed = number("samples_consumed").get<int64_t>();
  if (order) {
    order->clear();
    if (json.contains("order")) {
      if (!json["order"].is_string()) {
        throw std::runtime_error(
            fmt::format("{}: 'order' must be a string, found {}", source, json["order"].dump()));
      }
      *order = json["order"].get<std::string>();
    }
  }
  return state;
}

}  // namespace vimo::data
