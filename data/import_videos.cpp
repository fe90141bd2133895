// Implements the retrieval-corpus importer of import_videos.h: captions.tsv and split parsing, per-video
// feature/keypoint loading with uniform frame sampling, tokenizer training, and the retrieval records.
#include "data/import_videos.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <stdexcept>

#include "data/import_humanml3d.h"  // read_trimmed_lines
#include "data/npy.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;

constexpr size_t kMissingNamesShown = 20;

struct CaptionLine {
  std::string video, caption;
};

std::string shape_text(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

void check_video_id(const std::string& id, const std::string& where) {
  check_file_stem(id, "video id", where);
}

std::vector<CaptionLine> read_captions(const fs::path& path) {
  if (!fs::exists(path)) {
    throw std::runtime_error(
        fmt::format("{}: missing. HINT: a video corpus holds captions.tsv with lines "
                    "'<video_id><TAB><caption>'",
                    path.string()));
  }
  std::vector<CaptionLine> captions;
  for (const NumberedLine& line : read_trimmed_lines(path.string())) {
    const std::string where = fmt::format("{}:{}", path.string(), line.number);
    const size_t tab = line.text.find('\t');
    if (tab == std::string::npos) {
      throw std::runtime_error(
          fmt::format("{}: expected '<video_id><TAB><caption>', found no TAB in '{}'", where, line.text));
    }
    CaptionLine caption{line.text.substr(0, tab), line.text.substr(tab + 1)};
    while (!caption.video.empty() && (caption.video.back() == ' ' || caption.video.back() == '\t'))
      caption.video.pop_back();
    caption.caption.erase(0, caption.caption.find_first_not_of(" \t"));
    check_video_id(caption.video, where);
    if (caption.caption.empty()) throw std::runtime_error(fmt::format("{}: empty caption", where));
    captions.push_back(std::move(caption));
  }
  if (captions.empty()) throw std::runtime_error(fmt::format("{}: no captions", path.string()));
  return captions;
}

// Split name -> video ids in order: from splits/*.txt, or every test_every-th sorted id to "test".
std::map<std::string, std::vector<std::string>> assign_splits(const fs::path& root,
                                                              const std::vector<std::string>& videos,
                                                              const VideoImportOptions& options,
                                                              VideoImportReport& report) {
  std::map<std::string, std::vector<std::string>> splits;
  if (!fs::is_directory(root / "splits")) {
    for (size_t i = 0; i < videos.size(); ++i) {
      const bool test = options.test_every > 0 && (i + 1) % static_cast<size_t>(options.test_every) == 0;
      splits[test ? "test" : "train"].push_back(videos[i]);
    }
    return splits;
  }
  const std::set<std::string> captioned(videos.begin(), videos.end());
  std::map<std::string, std::string> split_of;  // video -> "file:line" that assigned it
  for (const char* split : {"train", "test"}) {
    const fs::path path = root / "splits" / (std::string(split) + ".txt");
    if (!fs::exists(path)) continue;
    for (const NumberedLine& line : read_trimmed_lines(path.string())) {
      const std::string where = fmt::format("{}:{}", path.string(), line.number);
      check_video_id(line.text, where);
      const auto [it, fresh] = split_of.emplace(line.text, where);
      if (!fresh) {
        throw std::runtime_error(
            fmt::format("{}: video '{}' is already assigned at {}. HINT: a video belongs "
                        "to one split",
                        where, line.text, it->second));
      }
      if (captioned.count(line.text)) splits[split].push_back(line.text);  // uncaptioned: nothing to import
    }
  }
  if (split_of.empty()) {
    throw std::runtime_error(
        fmt::format("{}: neither train.txt nor test.txt lists a video", (root / "splits").string()));
  }
  for (const std::string& video : videos) report.unassigned_videos += split_of.count(video) ? 0 : 1;
  return splits;
}

// One video's features and keypoints, sampled and padded to max_frames.
struct Video {
  int64_t num_frames = 0;
  std::vector<float> frames;     // [F, D]
  std::vector<float> keypoints;  // [F, joints, 3]
};

std::vector<float> read_float_array(const std::string& path, const NpyArray& array) {
  if (array.dtype != NpyDType::Float32 && array.dtype != NpyDType::Float64 &&
      array.dtype != NpyDType::Float16) {
    throw std::runtime_error(
        fmt::format("{}: expected floating-point values ('<f4'), found '{}'", path, npy_descr(array.dtype)));
  }
  return array.to_floats();
}

Video load_video(const fs::path& root, const std::string& id, int64_t feature_dim,
                 const VideoImportOptions& o, VideoImportReport& report) {
  const std::string feature_path = (root / "features" / (id + ".npy")).string();
  const std::string keypoint_path = (root / "keypoints" / (id + ".npy")).string();
  const NpyArray features = read_npy(feature_path);
  if (features.shape.size() != 2 || features.shape[1] != feature_dim) {
    throw std::runtime_error(
        fmt::format("{}: features must have shape [F, {}] like the corpus's other videos, "
                    "found {}",
                    feature_path, feature_dim, shape_text(features.shape)));
  }
  const NpyArray keypoints = read_npy(keypoint_path);
  const std::vector<int64_t> keypoint_shape = {features.shape[0], o.joints, 3};
  if (keypoints.shape != keypoint_shape) {
    throw std::runtime_error(fmt::format(
        "{}: keypoints must have shape {} (frames as in {}, {} joints, x/y/"
        "confidence), found {}",
        keypoint_path, shape_text(keypoint_shape), feature_path, o.joints, shape_text(keypoints.shape)));
  }
  const std::vector<float> source_frames = read_float_array(feature_path, features);
  const std::vector<float> source_keypoints = read_float_array(keypoint_path, keypoints);
  const int64_t frames = features.shape[0], D = feature_dim, K = o.joints * 3;
  if (frames > o.max_frames) ++report.subsampled_videos;

  Video video;
  video.frames.assign(o.max_frames * D, 0.0f);
  video.keypoints.assign(o.max_frames * K, 0.0f);
  const std::vector<int64_t> kept = sample_frame_indices(frames, o.max_frames);
  video.num_frames = static_cast<int64_t>(kept.size());
  for (size_t t = 0; t < kept.size(); ++t) {
    std::copy_n(source_frames.begin() + kept[t] * D, D, video.frames.begin() + t * D);
    std::copy_n(source_keypoints.begin() + kept[t] * K, K, video.keypoints.begin() + t * K);
  }
  return video;
}

// The feature width of the corpus: the option, or the first existing feature file's.
int64_t corpus_feature_dim(const fs::path& root,
                           const std::map<std::string, std::vector<std::string>>& splits, int64_t option) {
  if (option > 0) return option;
  for (const auto& [split, videos] : splits) {
    for (const std::string& id : videos) {
      const fs::path path = root / "features" / (id + ".npy");
      if (!fs::exists(path)) continue;
      const NpyArray array = read_npy(path.string());
      if (array.shape.size() != 2 || array.shape[1] <= 0) {
        throw std::runtime_error(fmt::format("{}: features must have shape [F, D], found {}", path.string(),
                                             shape_text(array.shape)));
      }
      return array.shape[1];
    }
  }
  throw std::runtime_error(
      fmt::format("{}: no feature file for any captioned video", (root / "features").string()));
}

void check_options(const VideoImportOptions& o) {
  auto require = [](bool ok, const std::string& what) {
    if (!ok) throw std::runtime_error("video import options: " + what);
  };
  require(o.max_frames > 0, fmt::format("max_frames must be positive, found {}", o.max_frames));
  require(o.feature_dim >= 0,
          fmt::format("feature_dim must be >= 0 (0: from the files), found {}", o.feature_dim));
  require(o.joints > 0, fmt::format("joints must be positive, found {}", o.joints));
  require(o.max_text_len >= 3,
          fmt::format("max_text_len must be >= 3 (<bos>, a piece, <eot>), found {}", o.max_text_len));
  require(o.test_every >= 0, fmt::format("test_every must be >= 0, found {}", o.test_every));
}

}  // namespace

std::vector<int64_t> sample_frame_indices(int64_t frames, int64_t max_frames) {
  std::vector<int64_t> indices;
  if (frames <= max_frames) {
    for (int64_t t = 0; t < frames; ++t) indices.push_back(t);
    return indices;
  }
  if (max_frames == 1) return {0};
  const double step = static_cast<double>(frames - 1) / static_cast<double>(max_frames - 1);
  for (int64_t i = 0; i + 1 < max_frames; ++i)
    indices.push_back(static_cast<int64_t>(static_cast<double>(i) * step));
  indices.push_back(frames - 1);  // numpy sets the endpoint exactly
  return indices;
}

std::string VideoImportReport::summary() const {
  std::string per_split;
  int64_t total = 0;
  for (const auto& [split, count] : records) {
    per_split += fmt::format("{}{} {}", per_split.empty() ? "" : ", ", count, split);
    total += count;
  }
  return fmt::format(
      "{} records ({}) from {} videos and {} caption lines; skipped {} videos missing features, {} missing "
      "keypoints{}, {} empty, {} in no split; {} videos subsampled to max_frames, {} captions truncated; "
      "vocabulary {}, {} unknown tokens\n",
      total, per_split, videos, captions, missing_features, missing_keypoints,
      missing_names.empty() ? "" : fmt::format(" (e.g. {})", fmt::join(missing_names, ", ")), empty_videos,
      unassigned_videos, subsampled_videos, truncated_captions, vocab_size, unknown_tokens);
}

VideoImportReport import_videos(const std::string& source, const std::string& out,
                                const VideoImportOptions& options) {
  check_options(options);
  const fs::path root(source);
  VideoImportReport report;
  const std::vector<CaptionLine> captions = read_captions(root / "captions.tsv");
  report.captions = static_cast<int64_t>(captions.size());
  std::map<std::string, std::vector<const CaptionLine*>> captions_of;
  for (const CaptionLine& line : captions) captions_of[line.video].push_back(&line);
  std::vector<std::string> videos;  // sorted: std::map order
  for (const auto& [video, lines] : captions_of) videos.push_back(video);

  std::map<std::string, std::vector<std::string>> splits = assign_splits(root, videos, options, report);
  // Drop videos missing a file (counted, or an error with strict) before the tokenizer sees their captions.
  for (auto& [split, ids] : splits) {
    std::vector<std::string> present;
    for (const std::string& id : ids) {
      const bool features = fs::exists(root / "features" / (id + ".npy"));
      const bool keypoints = fs::exists(root / "keypoints" / (id + ".npy"));
      if (features && keypoints) {
        present.push_back(id);
        continue;
      }
      const fs::path absent = root / (features ? "keypoints" : "features") / (id + ".npy");
      if (options.strict) {
        throw std::runtime_error(
            fmt::format("{}: missing for captioned video '{}'. HINT: unset strict to skip "
                        "(and count) such videos",
                        absent.string(), id));
      }
      ++(features ? report.missing_keypoints : report.missing_features);
      if (report.missing_names.size() < kMissingNamesShown) report.missing_names.push_back(id);
    }
    ids = std::move(present);
  }
  const int64_t feature_dim = corpus_feature_dim(root, splits, options.feature_dim);

  std::vector<std::string> train_captions;
  if (splits.count("train")) {
    for (const std::string& id : splits["train"])
      for (const CaptionLine* line : captions_of[id]) train_captions.push_back(line->caption);
  }
  if (options.tokenizer_model.empty() && train_captions.empty()) {
    throw std::runtime_error(
        fmt::format("{}: no train-split caption to build the tokenizer from. HINT: add "
                    "videos to splits/train.txt or pass an existing tokenizer model",
                    source));
  }
  const Tokenizer tokenizer = options.tokenizer_model.empty()
                                  ? Tokenizer::train(train_captions, options.tokenizer)
                                  : Tokenizer::load(options.tokenizer_model);
  report.vocab_size = tokenizer.vocab_size();

  DatasetWriter writer(out, "retrieval", options.writer);
  for (const auto& [split, ids] : splits) {
    int64_t next_id = 0;
    for (const std::string& id : ids) {
      const Video video = load_video(root, id, feature_dim, options, report);
      if (video.num_frames == 0) {
        ++report.empty_videos;
        continue;
      }
      ++report.videos;
      const Field frames = Field::from_floats("frames", {options.max_frames, feature_dim}, video.frames);
      const Field keypoints =
          Field::from_floats("keypoints", {options.max_frames, options.joints, 3}, video.keypoints);
      for (const CaptionLine* line : captions_of[id]) {
        bool truncated = false;
        const std::vector<int64_t> text_ids =
            tokenizer.encode_padded(line->caption, options.max_text_len, &truncated);
        report.truncated_captions += truncated ? 1 : 0;
        report.unknown_tokens += std::count(text_ids.begin(), text_ids.end(), kUnkId);
        Record record;
        record.fields.push_back(Field::from_int64s("id", {1}, {next_id++}));
        record.fields.push_back(Field::from_string("caption", line->caption));
        record.fields.push_back(Field::from_int64s("text_ids", {options.max_text_len}, text_ids));
        record.fields.push_back(frames);
        record.fields.push_back(keypoints);
        record.fields.push_back(Field::from_int64s("num_frames", {1}, {video.num_frames}));
        record.fields.push_back(Field::from_string("video", id));
        writer.append(split, record);
        ++report.records[split];
      }
    }
  }
  writer.add_file("vocab.txt", tokenizer.vocab_text());
  if (tokenizer.kind() != TokenizerKind::Word) writer.add_file("tokenizer.model", tokenizer.model_bytes());
  writer.set_metadata("vocab_size", tokenizer.vocab_size());
  writer.set_metadata("frames", options.max_frames);
  writer.set_metadata("feature_dim", feature_dim);
  writer.set_metadata("max_text_len", options.max_text_len);
  writer.set_metadata("videos", {{"source", source},
                                 {"tokenizer", tokenizer_kind_name(tokenizer.kind())},
                                 {"tokenizer_model", options.tokenizer_model},
                                 {"joints", options.joints},
                                 {"test_every", options.test_every},
                                 {"report",
                                  {{"records", report.records},
                                   {"videos", report.videos},
                                   {"captions", report.captions},
                                   {"missing_features", report.missing_features},
                                   {"missing_keypoints", report.missing_keypoints},
                                   {"unassigned_videos", report.unassigned_videos},
                                   {"empty_videos", report.empty_videos},
                                   {"subsampled_videos", report.subsampled_videos},
                                   {"truncated_captions", report.truncated_captions},
                                   {"unknown_tokens", report.unknown_tokens}}}});
  writer.finish();
  return report;
}

}  // namespace vimo::data
