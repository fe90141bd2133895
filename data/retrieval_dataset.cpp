// Implements RetrievalDataset (a split's shards stacked in memory) and DistributedBatchSampler.
#include "data/retrieval_dataset.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>

namespace vimo::data {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kJoints = 17;

std::string shape_string(DType dtype, const std::vector<int64_t>& shape) {
  return fmt::format("{} [{}]", dtype_name(dtype), fmt::join(shape, ", "));
}

// The field `name` of a record; the error names the file and record (`context`).
const Field& find_field(const Record& record, const std::string& name, const std::string& context) {
  for (const Field& field : record.fields) {
    if (field.name == name) return field;
  }
  throw std::runtime_error(
      fmt::format("{}: missing field '{}'. HINT: is this a retrieval dataset? regenerate it "
                  "with `vimo data synth`",
                  context, name));
}

// The field `name` of a record, checked to have `dtype` and `shape`.
const Field& expect_field(const Record& record, const std::string& name, DType dtype,
                          const std::vector<int64_t>& shape, const std::string& context) {
  const Field* found = &find_field(record, name, context);
  if (found->dtype != dtype || found->shape != shape) {
    throw std::runtime_error(fmt::format("{}: field '{}' is {}, expected {} (as in the split's first record)",
                                         context, name, shape_string(found->dtype, found->shape),
                                         shape_string(dtype, shape)));
  }
  return *found;
}

void copy_into(const at::Tensor& stacked, int64_t row, const Field& field) {
  auto* base = static_cast<uint8_t*>(stacked.data_ptr());
  std::memcpy(base + row * field.bytes.size(), field.bytes.data(), field.bytes.size());
}

int64_t count_lines(const fs::path& path) {
  std::ifstream in(path);
  if (!in) {
    throw std::runtime_error(
        fmt::format("dataset vocabulary {} cannot be read. HINT: a dataset directory holds "
                    "vocab.txt next to its splits; regenerate it with `vimo data synth`",
                    path.string()));
  }
  int64_t lines = 0;
  for (std::string line; std::getline(in, line);) ++lines;
  return lines;
}

std::vector<fs::path> shard_files(const fs::path& split_dir) {
  std::vector<fs::path> files;
  for (const fs::directory_entry& entry : fs::directory_iterator(split_dir)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_regular_file() && name.rfind("shard_", 0) == 0 && entry.path().extension() == ".bin") {
      files.push_back(entry.path());
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace

RetrievalDataset::RetrievalDataset(const std::string& dir, const std::string& split) {
  const fs::path split_dir = fs::path(dir) / split;
  if (!fs::is_directory(dir)) {
    throw std::runtime_error(
        fmt::format("dataset directory {} does not exist. HINT: write one with `vimo data synth "
                    "--out {}`, or fix data.dir",
                    dir, dir));
  }
  if (!fs::is_directory(split_dir)) {
    throw std::runtime_error(
        fmt::format("dataset {} has no split '{}' (no directory {}). HINT: regenerate it with "
                    "`vimo data synth --out {}`",
                    dir, split, split_dir.string(), dir));
  }
  const std::vector<fs::path> files = shard_files(split_dir);
  if (files.empty()) {
    throw std::runtime_error(
        fmt::format("dataset split {} holds no shard_*.bin files. HINT: regenerate it with "
                    "`vimo data synth --out {}`",
                    split_dir.string(), dir));
  }
  vocab_size_ = count_lines(fs::path(dir) / "vocab.txt");

  std::vector<std::unique_ptr<ShardReader>> readers;
  int64_t total = 0;
  for (const fs::path& file : files) {
    readers.push_back(std::make_unique<ShardReader>(file.string()));
    total += static_cast<int64_t>(readers.back()->size());
  }
  if (total == 0)
    throw std::runtime_error(fmt::format("dataset split {} has shards but no records", split_dir.string()));

  int64_t row = 0, L = 0, F = 0, Dv = 0;
  for (const auto& reader : readers) {
    for (uint64_t i = 0; i < reader->size(); ++i, ++row) {
      const Record record = reader->read_record(i);
      const std::string context = fmt::format("shard {}: record {}", reader->path(), i);
      if (row == 0) {  // The first record fixes the split's shapes.
        const Field& frames = find_field(record, "frames", context);
        L = find_field(record, "text_ids", context).numel();
        F = frames.shape.empty() ? 0 : frames.shape[0];
        Dv = frames.shape.size() < 2 ? 0 : frames.shape[1];
        sample_ids_ = at::empty({total}, at::kLong);
        text_ids_ = at::empty({total, L}, at::kLong);
        frames_ = at::empty({total, F, Dv}, at::kFloat);
        keypoints_ = at::empty({total, F, kJoints, 3}, at::kFloat);
        num_frames_ = at::empty({total}, at::kLong);
        captions_.reserve(total);
      }
      const Field& text_ids = expect_field(record, "text_ids", DType::Int64, {L}, context);
      for (const int64_t id : text_ids.int64s()) {
        if (id < 0 || id >= vocab_size_) {
          throw std::runtime_error(
              fmt::format("{}: token id {} outside the vocabulary [0, {}) of {}/vocab.txt", context, id,
                          vocab_size_, dir));
        }
      }
      const Field& num_frames = expect_field(record, "num_frames", DType::Int64, {1}, context);
      if (const int64_t n = num_frames.int64s()[0]; n < 0 || n > F) {
        throw std::runtime_error(fmt::format("{}: num_frames {} outside [0, {}]", context, n, F));
      }
      copy_into(sample_ids_, row, expect_field(record, "id", DType::Int64, {1}, context));
      copy_into(text_ids_, row, text_ids);
      copy_into(frames_, row, expect_field(record, "frames", DType::Float32, {F, Dv}, context));
      copy_into(keypoints_, row, expect_field(record, "keypoints", DType::Float32, {F, kJoints, 3}, context));
      copy_into(num_frames_, row, num_frames);
      const Field& caption = find_field(record, "caption", context);
      if (caption.dtype != DType::UInt8) {
        throw std::runtime_error(fmt::format("{}: field 'caption' is {}, expected uint8 text", context,
                                             dtype_name(caption.dtype)));
      }
      captions_.push_back(caption.text());
    }
  }
  size_ = total;
}

int64_t RetrievalDataset::max_text_len() const { return text_ids_.size(1); }
int64_t RetrievalDataset::frames() const { return frames_.size(1); }
int64_t RetrievalDataset::feature_dim() const { return frames_.size(2); }

RetrievalBatch RetrievalDataset::batch(const std::vector<int64_t>& indices) const {
  for (const int64_t index : indices) {
    if (index < 0 || index >= size_) {
      throw std::runtime_error(
          fmt::format("batch index {} is outside the dataset's {} samples", index, size_));
    }
  }
  const at::Tensor rows = at::tensor(indices, at::kLong);  // [B]
  RetrievalBatch batch;
  batch.sample_ids = sample_ids_.index_select(0, rows);
  batch.text_ids = text_ids_.index_select(0, rows);
  batch.text_mask = batch.text_ids.ne(0);
  batch.frames = frames_.index_select(0, rows);
  batch.keypoints = keypoints_.index_select(0, rows);
  const at::Tensor num_frames = num_frames_.index_select(0, rows);                            // [B]
  batch.frame_mask = at::arange(frames(), at::kLong).unsqueeze(0) < num_frames.unsqueeze(1);  // [B, F]
  return batch;
}

// ---------------------------------------------------------------------------------------------------------
// DistributedBatchSampler

DistributedBatchSampler::DistributedBatchSampler(int64_t dataset_size, int64_t global_batch, int dp_rank,
                                                 int dp_size, uint64_t seed)
    : dataset_size_(dataset_size), global_batch_(global_batch), dp_rank_(dp_rank), dp_size_(dp_size) {
  if (dp_size <= 0 || dp_rank < 0 || dp_rank >= dp_size) {
    throw std::runtime_error(fmt::format("batch sampler: DP rank {} is outside [0, {})", dp_rank, dp_size));
  }
  if (global_batch <= 0 || global_batch % dp_size != 0) {
    throw std::runtime_error(
        fmt::format("batch sampler: global batch {} is not a positive multiple of the DP size {}. "
                    "HINT: pick a global batch divisible by the number of DP ranks",
                    global_batch, dp_size));
  }
  if (global_batch > dataset_size) {
    throw std::runtime_error(
        fmt::format("batch sampler: global batch {} exceeds the dataset's {} samples. HINT: "
                    "lower the global batch or use a larger dataset",
                    global_batch, dataset_size));
  }
  state_.seed = seed;
  build_permutation();
}

// See Note [Deterministic global batches] in the header. The shuffle is a hand-written Fisher-Yates over
// raw mt19937_64 draws (std::shuffle's use of the engine is implementation-defined), so the order is the
// same with any standard library. The modulo bias is below dataset_size / 2^64.
void DistributedBatchSampler::build_permutation() {
  permutation_.resize(dataset_size_);
  std::iota(permutation_.begin(), permutation_.end(), int64_t{0});
  uint64_t mixed = state_.seed ^ (0x9e3779b97f4a7c15ULL * (static_cast<uint64_t>(state_.epoch) + 1));
  mixed = (mixed ^ (mixed >> 31)) * 0xbf58476d1ce4e5b9ULL;
  std::mt19937_64 rng(mixed ^ (mixed >> 29));
  for (int64_t i = dataset_size_ - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(permutation_[i], permutation_[j]);
  }
}

std::vector<int64_t> DistributedBatchSampler::next() {
  const int64_t local = global_batch_ / dp_size_;
  const auto begin = permutation_.begin() + state_.samples_consumed + dp_rank_ * local;
  std::vector<int64_t> slice(begin, begin + local);
  state_.samples_consumed += global_batch_;
  if (dataset_size_ - state_.samples_consumed < global_batch_) {  // the incomplete tail is dropped
    ++state_.epoch;
    state_.samples_consumed = 0;
    build_permutation();
  }
  return slice;
}

void DistributedBatchSampler::load_state(const SamplerState& state) {
  if (state.epoch < 0 || state.samples_consumed < 0 || state.samples_consumed > dataset_size_) {
    throw std::runtime_error(
        fmt::format("batch sampler: cannot resume at epoch {} after {} samples of a {}-sample "
                    "dataset. HINT: the checkpoint belongs to another dataset",
                    state.epoch, state.samples_consumed, dataset_size_));
  }
  state_ = state;
  if (dataset_size_ - state_.samples_consumed < global_batch_) {  // saved with a smaller global batch
    ++state_.epoch;
    state_.samples_consumed = 0;
  }
  build_permutation();
}

}  // namespace vimo::data
