// Defines StreamingLoader: a DP rank's stream of batches from a dataset's shards, read with background
// prefetch, in the deterministic elastic order of SampleOrder, resumable from a three-number state.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <future>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "data/collate.h"
#include "data/manifest.h"
#include "data/sample_order.h"
#include "data/shard.h"

namespace vimo::data {

struct LoaderOptions {
  std::string dir;  // dataset directory (with manifest.json)
  std::string split = "train";
  std::string kind;              // expected manifest kind; empty accepts any
  int64_t global_batch = 1;      // samples per step over all DP ranks
  int dp_rank = 0, dp_size = 1;  // this rank's slice of each global batch
  uint64_t seed = 0;
  bool shuffle = true;           // false: manifest order, every epoch
  int64_t shuffle_block = 4096;  // see Note [Block shuffle across shards]
  bool drop_last = true;         // false: the last global batch is completed from the epoch's start
  int workers = 2;               // background reader threads
  int prefetch = 4;              // batches read ahead (bounds memory: prefetch × local batch records)
  bool skip_corrupt = false;     // skip and count corrupt records instead of stopping
  // What every record must hold (RecordSchema in data/collate.h); only its fields are collated. A record
  // that lacks one or holds it with another dtype or shape is corrupt: an error naming its file, record and
  // offset, or skipped and counted with skip_corrupt. Empty: the split's first record that reads cleanly, in
  // manifest order, sets it (Note [One schema per split] in data/loader.cpp).
  RecordSchema schema;
  // When records' checksums are checked: every read (default), or a mapped record's first read only (Note
  // [Verifying a mapped record once] in data/shard_reader.cpp).
  Verification verify = Verification::EveryRead;
  // Shard files kept open (least recently used are closed). A batch being read also keeps the shards it
  // reads open until it is done, so at most open_shards + each worker's batch's shards are open at once.
  size_t open_shards = 64;
  // Freed batch memory kept for the next batches (Note [Why batches reuse their memory] in data/collate.cpp).
  size_t pool_bytes = size_t{256} << 20;
};

// One rank's batch, as the trainer receives it.
struct LoaderBatch {
  int64_t epoch = 0, step = 0;  // step: index of the global batch within its epoch
  CollatedBatch tensors;  // this rank's samples (fewer than global_batch / dp_size when some were corrupt)
  std::vector<int64_t> keys;    // the sample keys, in batch order
  int64_t corrupt_skipped = 0;  // records of this batch skipped as corrupt
};

struct LoaderStats {
  int64_t batches = 0;          // handed out by next()
  int64_t corrupt_skipped = 0;  // records skipped as corrupt in the batches handed out
  int64_t records = 0;          // records read, including batches read ahead
  uint64_t stored_bytes = 0;    // bytes read from shard files, including batches read ahead
  double wait_seconds = 0;      // time next() blocked waiting for a batch
};

class StreamingLoader {
 public:
  explicit StreamingLoader(LoaderOptions options);
  ~StreamingLoader();
  StreamingLoader(const StreamingLoader&) = delete;
  StreamingLoader& operator=(const StreamingLoader&) = delete;

  // This rank's part of the next global batch; blocks until it is read. Advances the state.
  LoaderBatch next();
  SamplerState state() const { return state_; }
  // Continues exactly where `state` was taken (also on another DP size). Drops prefetched batches.
  void load_state(const SamplerState& state);

  int64_t size() const { return order_.size(); }  // samples per epoch
  int64_t batches_per_epoch() const;
  const DatasetManifest& manifest() const { return manifest_; }
  LoaderStats stats() const;

  // Identifies what the order depends on besides the seed: the split's shards (names, record counts, hashes),
  // shuffle, shuffle_block and drop_last. A checkpoint stores it so a resume on changed data is an error, not
  // a silent change of the remaining batches.
  std::string order_fingerprint() const;

  // The global sample keys of batch `step` of `epoch` (all ranks), for tests and batch fingerprints.
  std::vector<int64_t> global_keys(int64_t epoch, int64_t step) const;

 private:
  struct Job;
  std::vector<SampleRef> local_refs(int64_t epoch, int64_t step) const;
  LoaderBatch read_batch(int64_t epoch, int64_t step);
  std::shared_ptr<ShardReader> open_shard(uint32_t shard);
  const RecordSchema& record_schema();
  void schedule();
  void drain();
  void worker_loop();

  LoaderOptions options_;
  DatasetManifest manifest_;
  const SplitManifest* split_ = nullptr;
  SampleOrder order_;
  SamplerState state_;
  int64_t scheduled_epoch_ = 0, scheduled_consumed_ = 0;  // position after the last scheduled batch

  std::mutex schema_mutex_;  // taken before shards_mutex_ when both are
  std::optional<RecordSchema> schema_;

  std::mutex shards_mutex_;
  std::list<std::pair<uint32_t, std::shared_ptr<ShardReader>>> open_;  // most recently used first

  mutable std::mutex mutex_;
  std::condition_variable work_ready_;
  std::deque<std::shared_ptr<Job>> queue_;    // jobs not yet taken by a worker
  std::deque<std::shared_ptr<Job>> pending_;  // jobs in batch order, until next() returns them
  bool stopping_ = false;
  LoaderStats stats_;
  TensorPool pool_;
  std::vector<std::thread> workers_;
};

}  // namespace vimo::data
