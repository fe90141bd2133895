// Defines the retrieval record view: RetrievalBatch (the tensors the retriever trains on), its conversion
// from a collated batch with shape checks, and RetrievalDataset, a whole split held in memory (evaluation).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "data/collate.h"
#include "data/manifest.h"

namespace vimo::data {

// Record kind of retrieval datasets (manifest "kind"). Fields of each record:
//   id Int64 [1], caption UInt8 [len], text_ids Int64 [L], frames Float32 [F, Dv],
//   keypoints Float32 [F, 17, 3], num_frames Int64 [1], and optionally video UInt8 [len] (the video id)
inline constexpr const char* kRetrievalKind = "retrieval";

struct RetrievalBatch {
  at::Tensor sample_ids;  // [B] int64
  at::Tensor text_ids;    // [B, L] int64, 0 = pad
  at::Tensor text_mask;   // [B, L] bool, true at real tokens
  at::Tensor frames;      // [B, F, Dv] float32
  at::Tensor keypoints;   // [B, F, 17, 3] float32
  at::Tensor frame_mask;  // [B, F] bool, true at valid frames
  int64_t size() const { return sample_ids.size(0); }
};

// Shapes every record of a retrieval dataset must have.
// Keypoints per frame in retrieval records: the 17 COCO joints of the 2D pose detector (DESIGN.md, Data).
inline constexpr int64_t kKeypointJoints = 17;

struct RetrievalDims {
  int64_t max_text_len = 0, frames = 0, feature_dim = 0, vocab_size = 0;
};

// The vocabulary size of a dataset: metadata "vocab_size", else the line count of its vocab.txt.
int64_t dataset_vocab_size(const DatasetManifest& manifest);

// The fields of a retrieval record with `dims`' shapes (caption: any length), for the loader to check every
// record against (LoaderOptions::schema). `dims_source` says where the shapes come from, for errors.
RecordSchema retrieval_schema(const RetrievalDims& dims, const std::string& dims_source);

// Checks the fields, dtypes, shapes and value ranges against `dims`; `where` names the batch for errors.
// Batches of a loader given retrieval_schema(dims) already hold the right fields: their records were checked
// one by one, with errors that name them.
RetrievalBatch to_retrieval_batch(const CollatedBatch& batch, const RetrievalDims& dims,
                                  const std::string& where);

// All records of one split, held in memory as stacked tensors; shapes are taken from its first record, and a
// record that does not fit them is a CorruptDataError naming its file, record and offset.
//
// Note [Videos of a retrieval split]
// A record is one (caption, video) pair, and a video may have several captions: `vimo data import videos`
// writes one record per line of captions.tsv, copying the video into each and naming it in the record's
// `video` field. Evaluation must rank each caption among the distinct videos, not among the records (a
// competing video with k captions would count k times), so the split numbers its videos: records with the
// same `video` id are one video, in the order of their first record. A record without the field (the
// synthetic generator writes none: each of its samples is a video of its own) is a video by itself. Records
// of one video must hold the same frames, keypoints and frame count; the constructor refuses a split where
// they differ, since the video's first record stands for all of them.
class RetrievalDataset {
 public:
  RetrievalDataset(const std::string& dir, const std::string& split);
  int64_t size() const { return all_.size(); }
  const RetrievalDims& dims() const { return dims_; }
  int64_t vocab_size() const { return dims_.vocab_size; }
  int64_t max_text_len() const { return dims_.max_text_len; }
  int64_t frames() const { return dims_.frames; }
  int64_t feature_dim() const { return dims_.feature_dim; }
  // Gathers the given sample indices (0 <= index < size()) into a batch.
  RetrievalBatch batch(const std::vector<int64_t>& indices) const;
  const std::string& caption(int64_t index) const { return captions_[static_cast<size_t>(index)]; }

  // The distinct videos of the split (Note [Videos of a retrieval split]).
  int64_t num_videos() const { return static_cast<int64_t>(video_records_.size()); }
  // [size()] int64: the video (0 <= v < num_videos()) of each record.
  const at::Tensor& record_videos() const { return record_videos_; }
  // The first record of each video, which stands for it [num_videos()].
  const std::vector<int64_t>& video_records() const { return video_records_; }

 private:
  RetrievalDims dims_;
  RetrievalBatch all_;
  std::vector<std::string> captions_;
  at::Tensor record_videos_;
  std::vector<int64_t> video_records_;
};

}  // namespace vimo::data
