// Defines the deterministic synthetic retrieval dataset: captions whose words determine the per-frame
// visual features (object words) and the 2D keypoint motion (action words), plus noise, so a retriever
// has real structure to learn. Used by the main job and the tests.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vimo::data {

struct SynthOptions {
  int64_t num_train = 4096;
  int64_t num_test = 256;
  int64_t frames = 16;        // F: frames per video (every video has between frames/2 and frames valid)
  int64_t feature_dim = 32;   // Dv: per-frame visual feature size
  int64_t max_text_len = 12;  // L: token ids per caption, padded
  int64_t records_per_shard = 1024;
  uint64_t seed = 1234;
  double noise = 0.3;  // std of Gaussian noise added to features and keypoints
  bool zstd = false;   // compress records with zstd
};

// Fixed word vocabulary of the synthetic captions; id 0 is <pad>, 1 is <bos>, 2 is <eot>.
const std::vector<std::string>& synthetic_vocabulary();

// Writes a "retrieval" dataset through DatasetWriter: `dir`/train/shard_00000.bin..., `dir`/test/...,
// `dir`/vocab.txt and `dir`/manifest.json (with the options as metadata). Deterministic in `options`.
// Every record has the fields:
//   id        Int64  [1]             sample id, unique within the split
//   caption   UInt8  [len]           the caption text
//   text_ids  Int64  [L]             <bos> words <eot> then <pad> (0)
//   frames    Float32 [F, Dv]        visual features, zero after the valid frames
//   keypoints Float32 [F, 17, 3]     (x, y, confidence), zero after the valid frames
//   num_frames Int64 [1]             valid frame count
void write_synthetic_dataset(const SynthOptions& options, const std::string& dir);

}  // namespace vimo::data
