// Defines SampleOrder, the global sample order of an epoch as a pure function of (seed, epoch, shard list),
// and the resumable position in it (SamplerState). See Note [Block shuffle across shards].
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace vimo::data {

// Where a sample lives: shard (index in the manifest's list) and record within the shard, plus its key, the
// sample's position in the manifest order (shard offsets + record): unique and stable across runs.
struct SampleRef {
  uint32_t shard = 0;
  uint64_t record = 0;
  int64_t key = 0;
};

// Resumable position of a loader: the whole state a checkpoint needs for exact resume.
struct SamplerState {
  uint64_t seed = 0;
  int64_t epoch = 0;
  int64_t samples_consumed = 0;  // global samples handed to the trainer in this epoch
};

// The loader state a checkpoint keeps (its loader.json): `state` and the fingerprint of the sample order it
// counts in (StreamingLoader::order_fingerprint).
std::string sampler_state_json(const SamplerState& state, const std::string& order);
// Reads sampler_state_json's text back. Throws naming `source` (the file) and the key on any error: text
// that is not JSON, a missing key, a value of the wrong type or sign. `order` returns the fingerprint, ""
// when absent (checkpoints written before it was kept).
SamplerState parse_sampler_state_json(const std::string& text, const std::string& source, std::string* order);

// Note [Block shuffle across shards]: an epoch's order is built in two levels. (1) The shards are permuted
// with a generator seeded by (seed, epoch). (2) Their records, concatenated in that order, are cut into
// blocks of `block` consecutive samples and each block is permuted with a generator seeded by (seed, epoch,
// block index). A block spans shard boundaries, so neighbouring samples come from up to ⌈block / shard⌉ + 1
// shards (better mixing than a small shuffle buffer), while a batch still touches few shards, which keeps
// reads local. Nothing depends on the DP size or on how many samples were read before, so any rank can
// compute any position on its own, and resume needs only (seed, epoch, position). block = 1 keeps the
// shard order's record order; shuffle = false keeps the manifest order exactly.
class SampleOrder {
 public:
  SampleOrder(std::vector<uint64_t> shard_records, uint64_t seed, int64_t block, bool shuffle = true);
  int64_t size() const { return total_; }  // samples per epoch
  // The sample at `position` (0 <= position < size()) of `epoch`. Thread-safe; caches one block.
  SampleRef at(int64_t epoch, int64_t position) const;
  // The `count` samples from `begin` on (positions wrap to the epoch's start past size()), under one lock:
  // what a batch needs, without a lock per sample.
  std::vector<SampleRef> range(int64_t epoch, int64_t begin, int64_t count) const;

 private:
  struct EpochLayout {
    int64_t epoch = -1;
    std::vector<uint32_t> shard_order;  // shards in this epoch's order
    std::vector<int64_t> starts;        // position where each ordered shard begins
  };
  void build_layout(int64_t epoch) const;
  void build_block(int64_t epoch, int64_t block) const;
  SampleRef locate(int64_t epoch, int64_t position) const;  // with mutex_ held

  std::vector<uint64_t> shard_records_;
  std::vector<int64_t> shard_keys_;  // key of each shard's first record (manifest order)
  uint64_t seed_;
  int64_t block_;
  bool shuffle_;
  int64_t total_ = 0;
  mutable std::mutex mutex_;
  mutable EpochLayout layout_;
  mutable int64_t cached_block_ = -1;
  mutable std::vector<int64_t> block_permutation_;  // offsets within the cached block
};

// xxh3-64 of the keys' bytes as 16 hex digits: a fingerprint of a batch's contents and order for the logs.
std::string keys_fingerprint(const std::vector<int64_t>& keys);

// 64-bit mix of several words (splitmix64 finalizer): seeds for the shard and block generators.
uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b = 0);

}  // namespace vimo::data
