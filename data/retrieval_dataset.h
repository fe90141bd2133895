// Defines the retrieval dataset view over a split's shards, its batches, and the deterministic
// data-parallel batch sampler whose small state makes resume exact.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "data/shard.h"

namespace vimo::data {

struct RetrievalBatch {
  at::Tensor sample_ids;  // [B] int64
  at::Tensor text_ids;    // [B, L] int64, 0 = pad
  at::Tensor text_mask;   // [B, L] bool, true at real tokens
  at::Tensor frames;      // [B, F, Dv] float32
  at::Tensor keypoints;   // [B, F, 17, 3] float32
  at::Tensor frame_mask;  // [B, F] bool, true at valid frames
  int64_t size() const { return sample_ids.size(0); }
};

// All records of one split (`dir`/`split`/shard_*.bin in name order), held in memory as stacked tensors.
class RetrievalDataset {
 public:
  RetrievalDataset(const std::string& dir, const std::string& split);
  int64_t size() const { return size_; }
  int64_t vocab_size() const { return vocab_size_; }  // lines of `dir`/vocab.txt
  int64_t max_text_len() const;
  int64_t frames() const;
  int64_t feature_dim() const;
  // Gathers the given sample indices (0 <= index < size()) into a batch.
  RetrievalBatch batch(const std::vector<int64_t>& indices) const;
  const std::string& caption(int64_t index) const { return captions_[index]; }

 private:
  int64_t size_ = 0, vocab_size_ = 0;
  at::Tensor sample_ids_, text_ids_, frames_, keypoints_, num_frames_;
  std::vector<std::string> captions_;
};

// Resumable position of a sampler: the whole state a checkpoint needs for exact resume.
struct SamplerState {
  uint64_t seed = 0;
  int64_t epoch = 0;
  int64_t samples_consumed = 0;  // global samples handed out in this epoch
};

// Note [Deterministic global batches]: the order of an epoch is a permutation of [0, dataset_size)
// that depends only on (seed, epoch). Global batch g is permutation[g*G, (g+1)*G); DP rank r takes its
// contiguous slice [r*G/P, (r+1)*G/P). So the samples of a global batch do not depend on the DP size P.
// The last incomplete global batch of an epoch is dropped.
class DistributedBatchSampler {
 public:
  DistributedBatchSampler(int64_t dataset_size, int64_t global_batch, int dp_rank, int dp_size, uint64_t seed);
  // This rank's sample indices of the next global batch; advances to the next epoch when one runs out.
  std::vector<int64_t> next();
  SamplerState state() const { return state_; }
  void load_state(const SamplerState& state);
  int64_t batches_per_epoch() const { return dataset_size_ / global_batch_; }

 private:
  void build_permutation();
  int64_t dataset_size_, global_batch_;
  int dp_rank_, dp_size_;
  SamplerState state_;
  std::vector<int64_t> permutation_;
};

}  // namespace vimo::data
