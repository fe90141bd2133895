// Defines the retrieval-corpus importer (`vimo data import videos SRC OUT`): precomputed per-frame visual
// features, 2D keypoints and captions in, retrieval shards out (DatasetWriter, kind "retrieval") with
// exactly the record schema of the synthetic dataset (data/synthetic.h), so the retriever trainer reads
// either.
//
// Input layout:
//   SRC/captions.tsv              the captions, UTF-8, one per line: <video_id> TAB <caption>
//                                 - the first TAB separates; the caption may hold further TABs (kept)
//                                 - a video may have any number of lines (one record per line)
//                                 - blank lines, leading/trailing whitespace and CRLF are ignored
//                                 - video ids are file stems: no '/', not "." or ".."
//   SRC/features/<video_id>.npy   [F, D] per-frame visual features (float32; float64/float16 converted)
//   SRC/keypoints/<video_id>.npy  [F, 17, 3] per-frame 2D keypoints (x, y, confidence), same F
//   SRC/splits/train.txt, SRC/splits/test.txt   optional: one video id per line. Without splits/, every
//                                 `test_every`-th video (sorted by id) goes to "test", the rest to "train".
//
// Frames: a video longer than max_frames is subsampled uniformly at np.linspace(0, F-1, max_frames)
// truncated to int (the CLIP4Clip frame sampler); a shorter one is zero-padded. The text side: the
// tokenizer is trained on the train split's captions (or loaded from `tokenizer_model`) and written as
// vocab.txt (always; its line count is the vocabulary size) plus tokenizer.model for SentencePiece.
//
// Records (one per caption line), per split in split order, a video's captions in file order:
//   id         Int64   [1]          index within the split
//   caption    UInt8   [len]        the caption
//   text_ids   Int64   [L]          <bos> pieces <eot> then <pad> (0), L = max_text_len
//   frames     Float32 [F, D]       features, zero after num_frames (F = max_frames)
//   keypoints  Float32 [F, 17, 3]   keypoints, zero after num_frames
//   num_frames Int64   [1]          valid frames
//   video      UInt8   [len]        the video id (extra field; the trainer ignores it)
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "data/dataset_writer.h"
#include "data/tokenizer.h"

namespace vimo::data {

struct VideoImportOptions {
  int64_t max_frames = 16;          // F
  int64_t feature_dim = 0;          // D; 0: taken from the first feature file (every file must agree)
  int64_t joints = 17;              // keypoints per frame
  int64_t max_text_len = 32;        // L
  TokenizerTrainOptions tokenizer;  // used when tokenizer_model is empty
  std::string tokenizer_model;      // an existing SentencePiece .model or word vocab.txt to use instead
  int64_t test_every = 0;           // without splits/: every n-th video goes to "test" (0: none)
  bool strict = false;  // videos missing a feature or keypoint file are errors instead of counted skips
  DatasetWriterOptions writer;
};

struct VideoImportReport {
  std::map<std::string, int64_t> records;  // per split
  int64_t videos = 0;                      // videos with captions, in a split, and both files present
  int64_t captions = 0;                    // caption lines read
  int64_t missing_features = 0, missing_keypoints = 0;  // videos skipped for a missing file
  int64_t unassigned_videos = 0;                        // captioned videos in no split file (with splits/)
  int64_t empty_videos = 0;                             // videos with zero frames (skipped)
  int64_t subsampled_videos = 0;                        // videos longer than max_frames
  int64_t truncated_captions = 0;                       // captions cut to max_text_len
  int64_t unknown_tokens = 0;  // <unk> ids in the records' text_ids: words or characters the tokenizer lacks
  int64_t vocab_size = 0;
  std::vector<std::string> missing_names;  // the first 20 skipped video ids
  std::string summary() const;
};

// Imports SRC (the layout above) into the dataset directory `out`. Throws std::runtime_error naming the
// file (and line) for bad input: no captions.tsv, a line without a TAB, a bad video id, a video in both
// splits, a malformed .npy, a feature width or keypoint shape that disagrees.
VideoImportReport import_videos(const std::string& source, const std::string& out,
                                const VideoImportOptions& options = {});

// The frame indices kept from a video of `frames` frames: all of them when frames <= max_frames, else
// np.linspace(0, frames - 1, max_frames).astype(int).
std::vector<int64_t> sample_frame_indices(int64_t frames, int64_t max_frames);

}  // namespace vimo::data
