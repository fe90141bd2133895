// A retrieval split written for the evaluation tests: records of (caption, video) pairs where a video may
// have several captions, as `vimo data import videos` writes them (the video copied into each record and
// named in its `video` field), with random frames, keypoints and token ids shaped for a Gemini config.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "data/dataset_writer.h"
#include "data/retrieval_dataset.h"
#include "models/gemini_config.h"

namespace vimo::testing {

// Writes split "test" of a retrieval dataset to `dir`: record i shows video record_videos[i] with caption
// record_captions[i]. Videos and captions are drawn from `seed` and their own index only, so two corpora of
// the same seed share them whatever their records. Video v is named `video_names[v]` ("v007" by default);
// without `name_videos`, records carry no `video` field.
inline void write_retrieval_corpus(const std::filesystem::path& dir, const models::GeminiConfig& c,
                                   const std::vector<int64_t>& record_videos,
                                   const std::vector<int64_t>& record_captions, uint64_t seed,
                                   bool name_videos = true,
                                   const std::vector<std::string>& video_names = {}) {
  const int64_t F = c.frames, Dv = c.feature_dim, L = c.max_text_len, J = c.joints;
  data::DatasetWriter writer(dir.string(), data::kRetrievalKind);
  for (size_t i = 0; i < record_videos.size(); ++i) {
    const int64_t video = record_videos[i], caption = record_captions[i];
    std::mt19937_64 video_rng(seed * 1000003 + static_cast<uint64_t>(video));
    std::normal_distribution<float> normal;
    const int64_t num_frames = std::uniform_int_distribution<int64_t>(1, F)(video_rng);
    std::vector<float> frames(static_cast<size_t>(F * Dv), 0.0f),
        keypoints(static_cast<size_t>(F * J * 3), 0.0f);
    for (int64_t k = 0; k < num_frames * Dv; ++k) frames[static_cast<size_t>(k)] = normal(video_rng);
    for (int64_t k = 0; k < num_frames * J * 3; ++k) keypoints[static_cast<size_t>(k)] = normal(video_rng);

    std::mt19937_64 caption_rng(seed * 1000003 + 500009 + static_cast<uint64_t>(caption));
    const int64_t words = std::uniform_int_distribution<int64_t>(1, L - 2)(caption_rng);
    std::vector<int64_t> text_ids(static_cast<size_t>(L), 0);
    text_ids[0] = 1;  // <bos>
    for (int64_t w = 1; w <= words; ++w)
      text_ids[static_cast<size_t>(w)] =
          std::uniform_int_distribution<int64_t>(3, c.vocab_size - 1)(caption_rng);
    text_ids[static_cast<size_t>(words + 1)] = 2;  // <eot>

    data::Record record;
    record.fields.push_back(data::Field::from_int64s("id", {1}, {static_cast<int64_t>(i)}));
    record.fields.push_back(data::Field::from_string("caption", fmt::format("caption {}", caption)));
    record.fields.push_back(data::Field::from_int64s("text_ids", {L}, text_ids));
    record.fields.push_back(data::Field::from_floats("frames", {F, Dv}, frames));
    record.fields.push_back(data::Field::from_floats("keypoints", {F, J, 3}, keypoints));
    record.fields.push_back(data::Field::from_int64s("num_frames", {1}, {num_frames}));
    if (name_videos) {
      const std::string name =
          video_names.empty() ? fmt::format("v{:03d}", video) : video_names[static_cast<size_t>(video)];
      record.fields.push_back(data::Field::from_string("video", name));
    }
    writer.append("test", record);
  }
  writer.set_metadata("vocab_size", c.vocab_size);
  writer.finish();
}

// Records for video v with captions_per_video[v] captions each (caption ids distinct), in an order shuffled
// by `seed`: {record_videos, record_captions}.
inline std::pair<std::vector<int64_t>, std::vector<int64_t>> grouped_records(
    const std::vector<int64_t>& captions_per_video, uint64_t seed) {
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (video, caption)
  for (size_t v = 0; v < captions_per_video.size(); ++v) {
    for (int64_t k = 0; k < captions_per_video[v]; ++k)
      pairs.emplace_back(static_cast<int64_t>(v), static_cast<int64_t>(pairs.size()));
  }
  std::mt19937_64 rng(seed);
  std::shuffle(pairs.begin(), pairs.end(), rng);
  std::vector<int64_t> record_videos, record_captions;
  for (const auto& [v, caption] : pairs) {
    record_videos.push_back(v);
    record_captions.push_back(caption);
  }
  return {record_videos, record_captions};
}

}  // namespace vimo::testing
