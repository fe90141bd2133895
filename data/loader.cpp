// Implements StreamingLoader: jobs (one per batch) are queued in batch order up to `prefetch` ahead, read by
// worker threads, and handed out in order by next().
#include "data/loader.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <stdexcept>

namespace vimo::data {

namespace fs = std::filesystem;

struct StreamingLoader::Job {
  int64_t epoch = 0, step = 0;
  std::promise<LoaderBatch> promise;
  std::future<LoaderBatch> future = promise.get_future();
};

StreamingLoader::StreamingLoader(LoaderOptions options)
    : options_(std::move(options)),
      manifest_(read_manifest(options_.dir)),
      split_(&manifest_.split(options_.split)),
      order_(
          [&] {
            std::vector<uint64_t> records;
            for (const ShardEntry& s : split_->shards) records.push_back(s.records);
            if (records.empty()) {
              throw std::runtime_error(
                  fmt::format("dataset {}: split '{}' has no shards", options_.dir, options_.split));
            }
            return records;
          }(),
          options_.seed, options_.shuffle_block, options_.shuffle),
      pool_(options_.pool_bytes) {
  const LoaderOptions& o = options_;
  const std::string where = fmt::format("loader for {} split '{}'", o.dir, o.split);
  if (!o.kind.empty() && manifest_.kind != o.kind) {
    throw std::runtime_error(
        fmt::format("{}: the dataset holds '{}' records, expected '{}'. HINT: point data.dir at "
                    "a {} dataset",
                    where, manifest_.kind, o.kind, o.kind));
  }
  if (o.dp_size <= 0 || o.dp_rank < 0 || o.dp_rank >= o.dp_size) {
    throw std::runtime_error(fmt::format("{}: DP rank {} is outside [0, {})", where, o.dp_rank, o.dp_size));
  }
  if (o.global_batch <= 0 || o.global_batch % o.dp_size != 0) {
    throw std::runtime_error(
        fmt::format("{}: global batch {} is not a positive multiple of the DP size {}. HINT: pick "
                    "a global batch divisible by the number of DP ranks",
                    where, o.global_batch, o.dp_size));
  }
  if (o.drop_last && o.global_batch > order_.size()) {
    throw std::runtime_error(
        fmt::format("{}: global batch {} exceeds the split's {} samples. HINT: lower the global "
                    "batch, or set drop_last false",
                    where, o.global_batch, order_.size()));
  }
  if (o.workers < 0 || o.prefetch < 0) {
    throw std::runtime_error(
        fmt::format("{}: workers ({}) and prefetch ({}) must be >= 0", where, o.workers, o.prefetch));
  }
  // A missing shard is never skipped, even with skip_corrupt: it means an incomplete copy, not bad bytes.
  for (size_t i = 0; i < split_->shards.size(); ++i) {
    const std::string path = manifest_.shard_path(o.split, i);
    if (!fs::exists(path)) {
      throw std::runtime_error(
          fmt::format("{}: shard {} is listed in {}/manifest.json but missing. HINT: the dataset "
                      "copy is incomplete; copy the file or re-import the dataset",
                      where, path, o.dir));
    }
  }
  state_.seed = o.seed;
  for (int i = 0; i < (o.prefetch > 0 ? o.workers : 0); ++i) workers_.emplace_back([this] { worker_loop(); });
}

StreamingLoader::~StreamingLoader() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    queue_.clear();
  }
  work_ready_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

int64_t StreamingLoader::batches_per_epoch() const {
  const int64_t n = order_.size(), g = options_.global_batch;
  return options_.drop_last ? n / g : (n + g - 1) / g;
}

std::vector<SampleRef> StreamingLoader::local_refs(int64_t epoch, int64_t step) const {
  const int64_t local = options_.global_batch / options_.dp_size;
  // Positions past the epoch's end exist only without drop_last: they wrap to the epoch's start.
  return order_.range(epoch, step * options_.global_batch + options_.dp_rank * local, local);
}

std::vector<int64_t> StreamingLoader::global_keys(int64_t epoch, int64_t step) const {
  std::vector<int64_t> keys;
  for (const SampleRef& ref : order_.range(epoch, step * options_.global_batch, options_.global_batch))
    keys.push_back(ref.key);
  return keys;
}

std::shared_ptr<ShardReader> StreamingLoader::open_shard(uint32_t shard) {
  std::lock_guard<std::mutex> lock(shards_mutex_);
  for (auto it = open_.begin(); it != open_.end(); ++it) {
    if (it->first == shard) {
      open_.splice(open_.begin(), open_, it);
      return it->second;
    }
  }
  const std::string path = manifest_.shard_path(options_.split, shard);
  const ShardEntry& entry = split_->shards[shard];
  auto reader = std::make_shared<ShardReader>(path, options_.verify);
  if (reader->file_size() != entry.bytes || reader->size() != entry.records) {
    throw CorruptDataError(
        fmt::format("shard {}: the file is {} bytes with {} records, but {}/manifest.json lists {} "
                    "bytes and {} records: the shard was truncated or replaced. HINT: re-import "
                    "the dataset",
                    path, reader->file_size(), reader->size(), options_.dir, entry.bytes, entry.records),
        path, -1, 0);
  }
  open_.emplace_front(shard, reader);
  if (open_.size() > std::max<size_t>(options_.open_shards, 1)) open_.pop_back();
  return reader;
}

namespace {

// What the trainer sees of a corrupt record when skip_corrupt is off.
std::runtime_error stop_at(const CorruptDataError& error) {
  return std::runtime_error(
      fmt::format("{}. HINT: set data.skip_corrupt to skip and count corrupt records", error.what()));
}

}  // namespace

// Note [One schema per split]
// Collation needs every record of a batch to hold the same fields, dtypes and extents past the first. The
// loader checks each record against one schema for the whole split rather than against its batch's first
// record: a record with a missing field or another dtype is then reported, or skipped, as itself wherever it
// falls in a batch (measured against its batch's first record, the good records of a batch whose first record
// is the odd one would be the ones rejected), and the records skipped do not depend on the DP size. The
// schema is the consumer's (LoaderOptions::schema: the retriever trainer's holds the shapes of the test
// split) or that of the split's first record that reads cleanly, in manifest order, read once by whichever
// batch needs it first; if that record is itself the odd one, every other record is reported against it,
// and the message names it.
const RecordSchema& StreamingLoader::record_schema() {
  std::lock_guard<std::mutex> lock(schema_mutex_);
  if (schema_) return *schema_;
  if (!options_.schema.empty()) return schema_.emplace(options_.schema);
  for (uint32_t s = 0; s < split_->shards.size(); ++s) {
    try {
      const std::shared_ptr<ShardReader> reader = open_shard(s);
      for (uint64_t i = 0; i < reader->size(); ++i) {
        try {
          const Record record = reader->read_record(i);
          const RecordOrigin origin{reader->path(), static_cast<int64_t>(i), reader.get()};
          return schema_.emplace(
              RecordSchema::of(RecordView::of(record), "the split's first record, " + origin.describe()));
        } catch (const CorruptDataError&) {
          if (!options_.skip_corrupt) throw;  // the skips are counted when batches read the records
        }
      }
    } catch (const CorruptDataError&) {
      if (!options_.skip_corrupt) throw;
    }
  }
  throw std::runtime_error(
      fmt::format("dataset {}: split '{}' holds no record that reads cleanly", options_.dir, options_.split));
}

LoaderBatch StreamingLoader::read_batch(int64_t epoch, int64_t step) {
  const std::vector<SampleRef> refs = local_refs(epoch, step);
  const RecordSchema* schema = nullptr;
  try {
    schema = &record_schema();
  } catch (const CorruptDataError& error) {
    throw stop_at(error);
  }
  // Each record is read into this thread's buffer and copied into the batch at once, while its bytes are in
  // the core's cache (Note [Collating record by record] in data/collate.cpp); the batch's tensors come from
  // pool_, so once warm a batch allocates nothing else of its size.
  thread_local RecordBuffer buffer;
  thread_local RecordView record;
  // `record` views the mapping of a reader that `readers` below keeps alive for this batch only: drop the
  // views when the batch ends (keeping the shape vectors' capacity), so that none outlives its mapping.
  struct ForgetViews {
    RecordView& record;
    ~ForgetViews() {
      for (FieldView& field : record.fields) {
        field.name = {};
        field.bytes = {};
      }
    }
  } forget_views{record};
  Collator collator(static_cast<int64_t>(refs.size()), &pool_, schema);
  uint64_t bytes = 0;
  int64_t skipped = 0;
  // The batch's shards, looked up in the shared LRU cache once each rather than once per record; they stay
  // open until the batch is read even if the cache closes them meanwhile (see LoaderOptions::open_shards).
  std::vector<std::pair<uint32_t, std::shared_ptr<ShardReader>>> readers;
  for (size_t k = 0; k < refs.size(); ++k) {
    const SampleRef& ref = refs[k];
    try {
      // The next record lies somewhere else in the page cache (a shuffled order): start loading its head
      // while this one is read, so the parse that follows does not wait on memory (`vimo bench data`: one
      // thread's second epoch 0.37-0.43x -> 0.45-0.46x of read()).
      if (k + 1 < refs.size()) {
        const auto next = std::find_if(readers.begin(), readers.end(),
                                       [&](const auto& r) { return r.first == refs[k + 1].shard; });
        if (next != readers.end()) next->second->prefetch(refs[k + 1].record);
      }
      auto it =
          std::find_if(readers.begin(), readers.end(), [&](const auto& r) { return r.first == ref.shard; });
      if (it == readers.end()) {
        it = readers.emplace(readers.end(), ref.shard, open_shard(ref.shard));
        it->second->recheck_if_modified();  // Note [Verifying a mapped record once] in data/shard_reader.cpp
      }
      const ShardReader* reader = it->second.get();
      reader->read_view(ref.record, buffer, record);
      collator.add(record, ref.key, {reader->path(), static_cast<int64_t>(ref.record), reader});
      bytes += reader->stored_size(ref.record);
    } catch (const CorruptDataError& error) {
      if (!options_.skip_corrupt) throw stop_at(error);
      ++skipped;
      std::fprintf(stderr, "[vimo data] skipping a corrupt record (key %lld): %s\n",
                   static_cast<long long>(ref.key), error.what());
    }
  }
  LoaderBatch batch;
  batch.epoch = epoch;
  batch.step = step;
  batch.tensors = collator.finish();
  batch.keys.assign(batch.tensors.keys.data_ptr<int64_t>(),
                    batch.tensors.keys.data_ptr<int64_t>() + batch.tensors.keys.numel());
  batch.corrupt_skipped = skipped;
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.records += batch.tensors.size();
  stats_.stored_bytes += bytes;
  return batch;
}

void StreamingLoader::worker_loop() {
  while (true) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_ready_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      job = queue_.front();
      queue_.pop_front();
    }
    try {
      job->promise.set_value(read_batch(job->epoch, job->step));
    } catch (...) {
      job->promise.set_exception(std::current_exception());
    }
  }
}

// Queues jobs for the batches after the last scheduled one until `prefetch` are pending.
void StreamingLoader::schedule() {
  std::lock_guard<std::mutex> lock(mutex_);
  while (pending_.size() < static_cast<size_t>(std::max(options_.prefetch, 1))) {
    auto job = std::make_shared<Job>();
    job->epoch = scheduled_epoch_;
    job->step = scheduled_consumed_ / options_.global_batch;
    scheduled_consumed_ += options_.global_batch;
    if (scheduled_consumed_ / options_.global_batch >= batches_per_epoch()) {
      ++scheduled_epoch_;
      scheduled_consumed_ = 0;
    }
    pending_.push_back(job);
    if (!workers_.empty()) queue_.push_back(job);
  }
  work_ready_.notify_all();
}

LoaderBatch StreamingLoader::next() {
  schedule();
  std::shared_ptr<Job> job;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job = pending_.front();
    pending_.pop_front();
  }
  const auto start = std::chrono::steady_clock::now();
  LoaderBatch batch = workers_.empty() ? read_batch(job->epoch, job->step) : job->future.get();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  state_.samples_consumed = (batch.step + 1) * options_.global_batch;
  state_.epoch = batch.epoch;
  if (batch.step + 1 >= batches_per_epoch()) {
    ++state_.epoch;
    state_.samples_consumed = 0;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.batches += 1;
    stats_.corrupt_skipped += batch.corrupt_skipped;
    stats_.wait_seconds += waited;
  }
  schedule();
  return batch;
}

// Forgets every pending job. Jobs a worker already took finish in the background (the worker holds them) and
// their results are dropped; they only read, so nothing else is affected.
void StreamingLoader::drain() {
  std::lock_guard<std::mutex> lock(mutex_);
  queue_.clear();
  pending_.clear();
}

void StreamingLoader::load_state(const SamplerState& state) {
  if (state.epoch < 0 || state.samples_consumed < 0 || state.samples_consumed % options_.global_batch != 0) {
    throw std::runtime_error(
        fmt::format("loader for {}: cannot resume at epoch {} after {} samples: not a whole number "
                    "of global batches of {}. HINT: resume with the global batch of the run "
                    "that saved the checkpoint",
                    options_.dir, state.epoch, state.samples_consumed, options_.global_batch));
  }
  if (state.seed != options_.seed) {
    throw std::runtime_error(
        fmt::format("loader for {}: the checkpoint's loader seed {} differs from this run's data "
                    "seed {}; resuming would change the sample order. HINT: resume with the "
                    "seed of the run that saved the checkpoint",
                    options_.dir, state.seed, options_.seed));
  }
  drain();
  state_ = state;
  if (state_.samples_consumed / options_.global_batch >= batches_per_epoch()) {  // saved at an epoch's end
    ++state_.epoch;
    state_.samples_consumed = 0;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  scheduled_epoch_ = state_.epoch;
  scheduled_consumed_ = state_.samples_consumed;
}

std::string StreamingLoader::order_fingerprint() const {
  std::string text = fmt::format("shuffle={} block={}", options_.shuffle, options_.shuffle_block);
  // Without drop_last the epochs have another batch count. Named only then, so fingerprints saved before
  // this option existed (always drop_last) still match.
  if (!options_.drop_last) text += " pad_last";
  for (const ShardEntry& shard : split_->shards)
    text += fmt::format(";{}:{}:{}", shard.file, shard.records, shard.xxh3);
  return fmt::format("{:016x}", XXH3_64bits(text.data(), text.size()));
}

LoaderStats StreamingLoader::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

}  // namespace vimo::data
