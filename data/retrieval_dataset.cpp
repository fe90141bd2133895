// Implements the retrieval view: conversion with shape checks, and the in-memory split.
#include "data/retrieval_dataset.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>

#include "data/shard.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;

// `batch`'s field `spec.name` is [B] + spec.shape of spec.dtype (an extent of kAnyExtent matches any).
void expect_field(const CollatedBatch& batch, const FieldSpec& spec, const std::string& where) {
  const at::Tensor& t = batch.field(spec.name);
  std::vector<int64_t> expected = {batch.size()};
  expected.insert(expected.end(), spec.shape.begin(), spec.shape.end());
  bool same = t.scalar_type() == torch_dtype(spec.dtype) && t.dim() == static_cast<int64_t>(expected.size());
  for (size_t d = 0; same && d < expected.size(); ++d)
    same = expected[d] == kAnyExtent || expected[d] == t.size(d);
  if (!same) {
    throw std::runtime_error(
        fmt::format("{}: field '{}' is {} [{}], expected {} [{}]. HINT: the records do not match "
                    "the dataset's shapes (see its first test record) or the model config",
                    where, spec.name, c10::toString(t.scalar_type()), fmt::join(t.sizes(), ", "),
                    c10::toString(torch_dtype(spec.dtype)), fmt::join(expected, ", ")));
  }
}

// The shapes of a retrieval record: kAnyExtent where `first` lacks the field or has another rank (the schema
// check then names the field).
RetrievalDims dims_of(const RecordView& first, int64_t vocab_size) {
  RetrievalDims dims{kAnyExtent, kAnyExtent, kAnyExtent, vocab_size};
  const FieldView* text_ids = first.find("text_ids");
  if (text_ids && text_ids->shape.size() == 1) dims.max_text_len = text_ids->shape[0];
  const FieldView* frames = first.find("frames");
  if (frames && frames->shape.size() == 2) {
    dims.frames = frames->shape[0];
    dims.feature_dim = frames->shape[1];
  }
  return dims;
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

RecordSchema retrieval_schema(const RetrievalDims& dims, const std::string& dims_source) {
  RecordSchema schema{{{"id", DType::Int64, {1}},
                       {"caption", DType::UInt8, {kAnyExtent}},
                       {"text_ids", DType::Int64, {dims.max_text_len}},
                       {"frames", DType::Float32, {dims.frames, dims.feature_dim}},
                       {"keypoints", DType::Float32, {dims.frames, kKeypointJoints, 3}},
                       {"num_frames", DType::Int64, {1}}},
                      "a retrieval record with the shapes of " + dims_source};
  // Token ids within the vocabulary and frame counts within the frames, where those are known: a record
  // outside them is named (or skipped) by itself, rather than failing its whole batch in to_retrieval_batch.
  if (dims.vocab_size > 0) {
    schema.fields[2].min_value = 0;
    schema.fields[2].max_value = dims.vocab_size - 1;
  }
  if (dims.frames >= 0) {
    schema.fields[5].min_value = 0;
    schema.fields[5].max_value = dims.frames;
  }
  return schema;
}

RetrievalBatch to_retrieval_batch(const CollatedBatch& batch, const RetrievalDims& dims,
                                  const std::string& where) {
  for (const FieldSpec& spec : retrieval_schema(dims, where).fields) expect_field(batch, spec, where);
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
  std::vector<std::unique_ptr<ShardReader>> readers;
  for (size_t s = 0; s < split_manifest.shards.size(); ++s) {
    readers.push_back(std::make_unique<ShardReader>(manifest.shard_path(split, s)));
    if (readers.back()->size() != split_manifest.shards[s].records) {
      throw std::runtime_error(fmt::format("shard {} holds {} records, {}/manifest.json says {}",
                                           readers.back()->path(), readers.back()->size(), dir,
                                           split_manifest.shards[s].records));
    }
  }
  // The first record sets the shapes; every record, the first included, is checked against them as it is
  // collated.
  RecordSchema schema;
  std::optional<Collator> collator;
  int64_t key = 0;
  // Note [Videos of a retrieval split]: the video of each record, and where each record is, for errors.
  std::map<std::string, int64_t> video_of_id;
  std::vector<int64_t> record_videos;
  std::vector<std::string> origins;
  for (const std::unique_ptr<ShardReader>& reader : readers) {
    for (uint64_t i = 0; i < reader->size(); ++i) {
      const Record record = reader->read_record(i);
      const RecordView view = RecordView::of(record);
      const RecordOrigin origin{reader->path(), static_cast<int64_t>(i), reader.get()};
      if (!collator) {
        dims_ = dims_of(view, dataset_vocab_size(manifest));
        schema = retrieval_schema(dims_,
                                  fmt::format("split '{}' (its first record, {})", split, origin.describe()));
        collator.emplace(static_cast<int64_t>(split_manifest.records), nullptr, &schema);
      }
      collator->add(view, key++, origin);
      captions_.push_back(record.get("caption").text());
      origins.push_back(origin.describe());
      const FieldView* video = view.find("video");
      if (video && (video->dtype != DType::UInt8 || video->shape.size() != 1)) {
        throw CorruptDataError(
            fmt::format("{}: field 'video' is {} [{}], expected uint8 [len] (the video id, FORMAT.md)",
                        origins.back(), dtype_name(video->dtype), fmt::join(video->shape, ", ")),
            std::string(origin.source), origin.record, origin.offset());
      }
      const auto next = static_cast<int64_t>(video_records_.size());
      int64_t v = next;  // a video of its own, unless its id was seen before
      if (video) {
        const std::string id(reinterpret_cast<const char*>(video->bytes.data()), video->bytes.size());
        v = video_of_id.try_emplace(id, next).first->second;
      }
      if (v == next) video_records_.push_back(static_cast<int64_t>(record_videos.size()));
      record_videos.push_back(v);
    }
  }
  all_ = to_retrieval_batch(collator->finish(), dims_, fmt::format("dataset {} split '{}'", dir, split));
  record_videos_ = at::tensor(record_videos, at::kLong);
  // The first record of a video stands for it in evaluation: the others must hold the same video.
  for (size_t r = 0; r < record_videos.size(); ++r) {
    const int64_t first = video_records_[static_cast<size_t>(record_videos[r])];
    const auto i = static_cast<int64_t>(r);
    if (first == i) continue;
    if (!at::equal(all_.frames[i], all_.frames[first]) ||
        !at::equal(all_.keypoints[i], all_.keypoints[first]) ||
        !at::equal(all_.frame_mask[i], all_.frame_mask[first])) {
      throw std::runtime_error(fmt::format(
          "dataset {} split '{}': {} and {} name the same video but hold different frames, keypoints or "
          "frame counts. HINT: records of one video must carry the same video (`vimo data import videos` "
          "copies it into each); were corpora that reuse video ids merged into this split?",
          dir, split, origins[static_cast<size_t>(first)], origins[r]));
    }
  }
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
