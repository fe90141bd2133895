// Implements the retrieval view: conversion with shape checks, and the in-memory split.
#include "data/retrieval_dataset.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>

#include "data/shard.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kJoints = 17;

void expect_shape(const CollatedBatch& batch, const std::string& name, at::ScalarType dtype,
                  const std::vector<int64_t>& tail, const std::string& where) {
  const at::Tensor& t = batch.field(name);
  std::vector<int64_t> expected = {batch.size()};
  expected.insert(expected.end(), tail.begin(), tail.end());
  if (t.scalar_type() != dtype || t.sizes().vec() != expected) {
    throw std::runtime_error(
        fmt::format("{}: field '{}' is {} [{}], expected {} [{}]. HINT: the records do not match "
                    "the dataset's shapes (see its first test record) or the model config",
                    where, name, c10::toString(t.scalar_type()), fmt::join(t.sizes(), ", "),
                    c10::toString(dtype), fmt::join(expected, ", ")));
  }
}

}  // namespace

int64_t dataset_vocab_size(const DatasetManifest& manifest) {
  if (manifest.metadata.contains("vocab_size")) return manifest.metadata["vocab_size"].get<int64_t>();
  const std::string path = manifest.file_path("vocab.txt");
  std::ifstream in(path);
  if (!in) throw std::runtime_error(fmt::format("dataset vocabulary {} cannot be read", path));
  int64_t lines = 0;
  for (std::string line; std::getline(in, line);) ++lines;
  return lines;
}

RetrievalBatch to_retrieval_batch(const CollatedBatch& batch, const RetrievalDims& dims,
                                  const std::string& where) {
  expect_shape(batch, "id", at::kLong, {1}, where);
  expect_shape(batch, "text_ids", at::kLong, {dims.max_text_len}, where);
  expect_shape(batch, "frames", at::kFloat, {dims.frames, dims.feature_dim}, where);
  expect_shape(batch, "keypoints", at::kFloat, {dims.frames, kJoints, 3}, where);
  expect_shape(batch, "num_frames", at::kLong, {1}, where);
  RetrievalBatch out;
  out.sample_ids = batch.field("id").select(1, 0);
  out.text_ids = batch.field("text_ids");
  if (out.text_ids.numel() > 0) {
    const int64_t low = out.text_ids.min().item<int64_t>(), high = out.text_ids.max().item<int64_t>();
    if (low < 0 || high >= dims.vocab_size) {
      throw std::runtime_error(fmt::format("{}: token id {} outside the vocabulary [0, {})", where,
                                           low < 0 ? low : high, dims.vocab_size));
    }
  }
  out.text_mask = out.text_ids.ne(0);
  out.frames = batch.field("frames");
  out.keypoints = batch.field("keypoints");
  const at::Tensor num_frames = batch.field("num_frames").select(1, 0);  // [B]
  if (num_frames.numel() > 0 &&
      (num_frames.min().item<int64_t>() < 0 || num_frames.max().item<int64_t>() > dims.frames)) {
    throw std::runtime_error(fmt::format("{}: num_frames outside [0, {}]", where, dims.frames));
  }
  out.frame_mask = at::arange(dims.frames, at::kLong).unsqueeze(0) < num_frames.unsqueeze(1);  // [B, F]
  return out;
}

RetrievalDataset::RetrievalDataset(const std::string& dir, const std::string& split) {
  if (!fs::is_directory(dir)) {
    throw std::runtime_error(
        fmt::format("dataset directory {} does not exist. HINT: write one with `vimo data synth "
                    "--out {}`, or fix data.dir",
                    dir, dir));
  }
  const DatasetManifest manifest = read_manifest(dir);
  if (manifest.kind != kRetrievalKind) {
    throw std::runtime_error(
        fmt::format("dataset {} holds '{}' records, expected '{}'", dir, manifest.kind, kRetrievalKind));
  }
  const SplitManifest& split_manifest = manifest.split(split);
  if (split_manifest.records == 0) {
    throw std::runtime_error(fmt::format("dataset {}: split '{}' holds no records", dir, split));
  }
  std::vector<Record> records;
  std::vector<int64_t> keys;
  std::vector<std::string> where;
  for (size_t s = 0; s < split_manifest.shards.size(); ++s) {
    const ShardReader reader(manifest.shard_path(split, s));
    if (reader.size() != split_manifest.shards[s].records) {
      throw std::runtime_error(fmt::format("shard {} holds {} records, {}/manifest.json says {}",
                                           reader.path(), reader.size(), dir,
                                           split_manifest.shards[s].records));
    }
    for (uint64_t i = 0; i < reader.size(); ++i) {
      records.push_back(reader.read_record(i));
      keys.push_back(static_cast<int64_t>(keys.size()));
      where.push_back(fmt::format("shard {}: record {}", reader.path(), i));
    }
  }
  const Record& first = records.front();
  const std::vector<int64_t> frames = first.get("frames").shape;
  if (frames.size() != 2) {
    throw std::runtime_error(
        fmt::format("{}: field 'frames' has rank {}, expected [F, Dv]", where[0], frames.size()));
  }
  dims_ = {first.get("text_ids").numel(), frames[0], frames[1], dataset_vocab_size(manifest)};
  const CollatedBatch all = collate(records, keys, where);
  all_ = to_retrieval_batch(all, dims_, fmt::format("dataset {} split '{}'", dir, split));
  captions_.reserve(records.size());
  for (const Record& record : records) captions_.push_back(record.get("caption").text());
}

RetrievalBatch RetrievalDataset::batch(const std::vector<int64_t>& indices) const {
  for (const int64_t index : indices) {
    if (index < 0 || index >= size()) {
      throw std::runtime_error(
          fmt::format("batch index {} is outside the dataset's {} samples", index, size()));
    }
  }
  const at::Tensor rows = at::tensor(indices, at::kLong);  // [B]
  RetrievalBatch batch;
  batch.sample_ids = all_.sample_ids.index_select(0, rows);
  batch.text_ids = all_.text_ids.index_select(0, rows);
  batch.text_mask = all_.text_mask.index_select(0, rows);
  batch.frames = all_.frames.index_select(0, rows);
  batch.keypoints = all_.keypoints.index_select(0, rows);
  batch.frame_mask = all_.frame_mask.index_select(0, rows);
  return batch;
}

}  // namespace vimo::data
