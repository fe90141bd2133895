// Tests the retrieval-corpus importer: a corpus in the documented layout (features, keypoints, captions.tsv
// with CRLF, blank lines and TABs, split files) becomes retrieval shards with the synthetic schema; every
// record is compared with its inputs, the retrieval dataset reads the result, bad inputs are named errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/import_videos.h"
#include "data/manifest.h"
#include "data/npy.h"
#include "data/retrieval_dataset.h"
#include "data/shard.h"
#include "tests/test_support.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;
using vimo::testing::expect_error;

constexpr int64_t kDim = 8, kJoints = 17;

fs::path test_dir() {
  return vimo::testing::fresh_test_dir("import_videos",
                                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

struct Source {
  std::vector<float> features, keypoints;  // [F, D], [F, 17, 3]
  int64_t frames = 0;
};

Source add_video(const fs::path& root, const std::string& id, int64_t frames, int64_t seed,
                 bool keypoints = true) {
  Source s{std::vector<float>(frames * kDim), std::vector<float>(frames * kJoints * 3), frames};
  for (size_t i = 0; i < s.features.size(); ++i) s.features[i] = static_cast<float>(seed * 1000 + i) / 4.0f;
  for (size_t i = 0; i < s.keypoints.size(); ++i)
    s.keypoints[i] = static_cast<float>(seed * 10000 + i) / 8.0f;
  fs::create_directories(root / "features");
  fs::create_directories(root / "keypoints");
  write_npy((root / "features" / (id + ".npy")).string(), {frames, kDim}, s.features);
  if (keypoints) write_npy((root / "keypoints" / (id + ".npy")).string(), {frames, kJoints, 3}, s.keypoints);
  return s;
}

std::vector<Record> read_split(const std::string& dir, const std::string& split) {
  const DatasetManifest manifest = read_manifest(dir);
  std::vector<Record> records;
  for (size_t s = 0; s < manifest.split(split).shards.size(); ++s) {
    ShardReader reader(manifest.shard_path(split, s));
    for (uint64_t i = 0; i < reader.size(); ++i) records.push_back(reader.read_record(i));
  }
  return records;
}

// Checks one record against its source video (sampled at `kept`) and caption.
void expect_record(const Record& r, int64_t id, const std::string& video, const std::string& caption,
                   const Source& source, const std::vector<int64_t>& kept, const Tokenizer& tokenizer,
                   int64_t max_frames, int64_t max_text_len) {
  SCOPED_TRACE(video + ": " + caption);
  EXPECT_EQ(r.get("id").int64s(), std::vector<int64_t>{id});
  EXPECT_EQ(r.get("video").text(), video);
  EXPECT_EQ(r.get("caption").text(), caption);
  EXPECT_EQ(r.get("text_ids").int64s(), tokenizer.encode_padded(caption, max_text_len));
  EXPECT_EQ(r.get("num_frames").int64s(), std::vector<int64_t>{static_cast<int64_t>(kept.size())});
  std::vector<float> frames(max_frames * kDim, 0.0f), keypoints(max_frames * kJoints * 3, 0.0f);
  for (size_t t = 0; t < kept.size(); ++t) {
    for (int64_t d = 0; d < kDim; ++d) frames[t * kDim + d] = source.features[kept[t] * kDim + d];
    for (int64_t k = 0; k < kJoints * 3; ++k)
      keypoints[t * kJoints * 3 + k] = source.keypoints[kept[t] * kJoints * 3 + k];
  }
  EXPECT_EQ(r.get("frames").shape, (std::vector<int64_t>{max_frames, kDim}));
  EXPECT_EQ(r.get("frames").floats(), frames);
  EXPECT_EQ(r.get("keypoints").shape, (std::vector<int64_t>{max_frames, kJoints, 3}));
  EXPECT_EQ(r.get("keypoints").floats(), keypoints);
}

std::vector<int64_t> all_frames(int64_t n) {
  std::vector<int64_t> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

TEST(ImportVideos, SamplesFramesLikeNumpyLinspace) {
  // np.linspace(0, 29, 16).astype(int)
  EXPECT_EQ(sample_frame_indices(30, 16),
            (std::vector<int64_t>{0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29}));
  EXPECT_EQ(sample_frame_indices(5, 16), all_frames(5));
  EXPECT_EQ(sample_frame_indices(16, 16), all_frames(16));
  EXPECT_EQ(sample_frame_indices(100, 1), std::vector<int64_t>{0});
  EXPECT_EQ(sample_frame_indices(7, 3), (std::vector<int64_t>{0, 3, 6}));
  EXPECT_TRUE(sample_frame_indices(0, 4).empty());
}

TEST(ImportVideos, ImportsACorpusWithSplitsAndWordVocabulary) {
  const fs::path dir = test_dir(), root = dir / "corpus";
  const Source a = add_video(root, "vid_a", 5, 1);
  const Source b = add_video(root, "vid_b", 16, 2);
  add_video(root, "vid_c", 4, 3, /*keypoints=*/false);
  const Source d = add_video(root, "vid_d", 30, 4);
  add_video(root, "vid_e", 0, 5);
  add_video(root, "vid_f", 3, 6);
  write_text(root / "captions.tsv",
             "vid_a\ta person waves both hands.\r\n"
             "\n"
             "vid_b\ta man kicks a ball\n"
             "vid_a\tsomeone waves slowly\twith a pause   \n"
             "vid_c\ta woman jumps\n"
             "  vid_d \t a child runs in circles\n"
             "vid_e\tan empty video\n"
             "vid_f\tnot in a split\n");
  fs::create_directories(root / "splits");
  write_text(root / "splits" / "train.txt", "vid_a\nvid_c\r\nvid_d\n\nvid_e\n");
  write_text(root / "splits" / "test.txt", "vid_b\nvid_uncaptioned\n");

  VideoImportOptions options;
  options.tokenizer.kind = TokenizerKind::Word;
  options.max_text_len = 8;
  options.writer.max_shard_records = 2;
  const std::string out = (dir / "out").string();
  const VideoImportReport report = import_videos(root.string(), out, options);

  const DatasetManifest manifest = read_manifest(out);
  EXPECT_EQ(manifest.kind, "retrieval");
  const Tokenizer tokenizer = Tokenizer::load(manifest.file_path("vocab.txt"));
  // Trained on the train split's captions only: "man", "kicks", "ball" (test) are unknown.
  EXPECT_EQ(
      tokenizer.encode("a man kicks a ball"),
      (std::vector<int64_t>{tokenizer.encode("a")[0], kUnkId, kUnkId, tokenizer.encode("a")[0], kUnkId}));
  EXPECT_EQ(manifest.metadata.at("vocab_size"), tokenizer.vocab_size());
  EXPECT_EQ(manifest.files.count("tokenizer.model"), 0u);

  const std::vector<Record> train = read_split(out, "train");
  ASSERT_EQ(train.size(), 3u);
  expect_record(train[0], 0, "vid_a", "a person waves both hands.", a, all_frames(5), tokenizer, 16, 8);
  expect_record(train[1], 1, "vid_a", "someone waves slowly\twith a pause", a, all_frames(5), tokenizer, 16,
                8);
  expect_record(train[2], 2, "vid_d", "a child runs in circles", d, sample_frame_indices(30, 16), tokenizer,
                16, 8);
  const std::vector<Record> test = read_split(out, "test");
  ASSERT_EQ(test.size(), 1u);
  expect_record(test[0], 0, "vid_b", "a man kicks a ball", b, all_frames(16), tokenizer, 16, 8);

  EXPECT_EQ(report.records.at("train"), 3);
  EXPECT_EQ(report.records.at("test"), 1);
  EXPECT_EQ(report.videos, 3);
  EXPECT_EQ(report.captions, 7);
  EXPECT_EQ(report.missing_keypoints, 1);
  EXPECT_EQ(report.missing_features, 0);
  EXPECT_EQ(report.missing_names, std::vector<std::string>{"vid_c"});
  EXPECT_EQ(report.empty_videos, 1);
  EXPECT_EQ(report.unassigned_videos, 1);
  EXPECT_EQ(report.subsampled_videos, 1);
  EXPECT_EQ(report.truncated_captions, 0);
  EXPECT_EQ(report.unknown_tokens, 3);  // man, kicks, ball
  EXPECT_NE(report.summary().find("4 records (1 test, 3 train)"), std::string::npos) << report.summary();
  EXPECT_NE(report.summary().find("3 unknown tokens"), std::string::npos) << report.summary();
  EXPECT_EQ(manifest.metadata.at("videos").at("report").at("unknown_tokens"), 3);

  // The retriever's dataset reads the import like the synthetic data.
  const RetrievalDataset dataset(out, "train");
  EXPECT_EQ(dataset.size(), 3);
  EXPECT_EQ(dataset.frames(), 16);
  EXPECT_EQ(dataset.feature_dim(), kDim);
  EXPECT_EQ(dataset.max_text_len(), 8);
  EXPECT_EQ(dataset.vocab_size(), tokenizer.vocab_size());
}

TEST(ImportVideos, SentencePieceWithoutSplits) {
  const fs::path dir = test_dir(), root = dir / "corpus";
  std::string captions;
  const std::vector<std::string> verbs = {"walks", "jumps", "waves", "kicks", "turns", "runs"};
  std::vector<Source> sources;
  for (int v = 0; v < 6; ++v) {
    const std::string id = "clip" + std::to_string(v);
    sources.push_back(add_video(root, id, 3 + v, 10 + v));
    captions += id + "\ta person " + verbs[v] + " forward and then " + verbs[(v + 1) % 6] + " back\n";
  }
  write_text(root / "captions.tsv", captions);
  VideoImportOptions options;
  options.tokenizer.kind = TokenizerKind::Unigram;
  options.tokenizer.vocab_size = 64;
  options.test_every = 3;  // clip2 and clip5 (sorted order) go to test
  options.max_frames = 4;
  options.max_text_len = 6;  // long captions get cut
  const std::string out = (dir / "out").string();
  const VideoImportReport report = import_videos(root.string(), out, options);
  const DatasetManifest manifest = read_manifest(out);
  const Tokenizer tokenizer = Tokenizer::load(manifest.file_path("tokenizer.model"));
  EXPECT_EQ(manifest.metadata.at("vocab_size"), tokenizer.vocab_size());
  const std::vector<Record> train = read_split(out, "train"), test = read_split(out, "test");
  ASSERT_EQ(train.size(), 4u);
  ASSERT_EQ(test.size(), 2u);
  EXPECT_EQ(test[1].get("video").text(), "clip5");
  for (size_t i = 0; i < train.size(); ++i) {
    const int v = static_cast<int>(i < 2 ? i : i + 1);  // clip0, clip1, clip3, clip4
    const std::string caption = "a person " + verbs[v] + " forward and then " + verbs[(v + 1) % 6] + " back";
    expect_record(train[i], static_cast<int64_t>(i), "clip" + std::to_string(v), caption, sources[v],
                  sample_frame_indices(3 + v, 4), tokenizer, 4, 6);
  }
  EXPECT_EQ(report.truncated_captions, 6);
  EXPECT_EQ(report.subsampled_videos, 4);  // clip2..clip5 have 5..8 frames
}

TEST(ImportVideos, NamesBadInputs) {
  const fs::path dir = test_dir(), root = dir / "corpus";
  const std::string out = (dir / "out").string();
  VideoImportOptions options;
  options.tokenizer.kind = TokenizerKind::Word;
  expect_error([&] { import_videos(root.string(), out, options); }, {"captions.tsv", "missing"});
  add_video(root, "v1", 4, 1);
  add_video(root, "v2", 4, 2);
  write_text(root / "captions.tsv", "v1\tfine caption\nv2 has no tab\n");
  expect_error([&] { import_videos(root.string(), out, options); }, {"captions.tsv:2", "no TAB"});
  write_text(root / "captions.tsv", "../v1\tescape\n");
  expect_error([&] { import_videos(root.string(), out, options); },
               {"captions.tsv:1", "invalid video id '../v1'"});
  write_text(root / "captions.tsv", "v1\tone\nv2\ttwo\nv3\tthree\n");
  options.strict = true;
  expect_error([&] { import_videos(root.string(), out, options); }, {"features/v3.npy", "missing", "'v3'"});
  options.strict = false;
  write_npy((root / "features" / "v2.npy").string(), {4, 5}, std::vector<float>(20, 0.0f));
  expect_error([&] { import_videos(root.string(), out, options); }, {"v2.npy", "[F, 8]", "found [4, 5]"});
  write_npy((root / "features" / "v2.npy").string(), {4, kDim}, std::vector<float>(4 * kDim, 0.0f));
  write_npy((root / "keypoints" / "v2.npy").string(), {3, kJoints, 3},
            std::vector<float>(3 * kJoints * 3, 0.0f));
  expect_error([&] { import_videos(root.string(), out, options); },
               {"keypoints/v2.npy", "[4, 17, 3]", "found [3, 17, 3]"});
  write_npy((root / "keypoints" / "v2.npy").string(), {4, kJoints, 3},
            std::vector<int64_t>(4 * kJoints * 3, 0));
  expect_error([&] { import_videos(root.string(), out, options); },
               {"keypoints/v2.npy", "floating-point", "<i8"});
  add_video(root, "v2", 4, 2);
  fs::create_directories(root / "splits");
  write_text(root / "splits" / "train.txt", "v1\nv2\n");
  write_text(root / "splits" / "test.txt", "v2\n");
  expect_error([&] { import_videos(root.string(), out, options); },
               {"test.txt:1", "'v2' is already assigned", "train.txt:2"});
  EXPECT_FALSE(fs::exists(dir / "out" / "manifest.json"));
}

// --tokenizer-model with another import's model: the dataset is labelled with the model's own type (a BPE
// model was labelled "unigram"), and that import's vocab.txt, a list of SentencePiece pieces, is refused
// with a hint instead of being read as words (nearly every word became <unk>).
TEST(ImportVideos, ReusesTheTokenizerOfAnotherImport) {
  const fs::path dir = test_dir(), root = dir / "corpus";
  std::string captions;
  const std::vector<std::string> verbs = {"walks", "jumps", "waves", "kicks", "turns", "runs"};
  for (int v = 0; v < 6; ++v) {
    const std::string id = "clip" + std::to_string(v);
    add_video(root, id, 4, v);
    captions += id + "\ta person " + verbs[v] + " forward and then " + verbs[(v + 1) % 6] + " back\n";
  }
  write_text(root / "captions.tsv", captions);
  VideoImportOptions options;
  options.tokenizer.kind = TokenizerKind::Bpe;
  options.tokenizer.vocab_size = 60;
  options.test_every = 3;
  const std::string first = (dir / "first").string(), second = (dir / "second").string();
  import_videos(root.string(), first, options);
  EXPECT_EQ(read_manifest(first).metadata.at("videos").at("tokenizer"), "bpe");

  options.tokenizer.kind = TokenizerKind::Unigram;  // ignored: the model says what it is
  options.tokenizer_model = (fs::path(first) / "tokenizer.model").string();
  const VideoImportReport report = import_videos(root.string(), second, options);
  const DatasetManifest manifest = read_manifest(second);
  EXPECT_EQ(manifest.metadata.at("videos").at("tokenizer"), "bpe");
  EXPECT_EQ(manifest.files.at("tokenizer.model").xxh3, read_manifest(first).files.at("tokenizer.model").xxh3);
  EXPECT_EQ(read_split(second, "train").at(0).get("text_ids").int64s(),
            read_split(first, "train").at(0).get("text_ids").int64s());
  EXPECT_EQ(report.unknown_tokens, 0);

  options.tokenizer_model = (fs::path(first) / "vocab.txt").string();
  expect_error([&] { import_videos(root.string(), (dir / "third").string(), options); },
               {options.tokenizer_model + ":", "SentencePiece piece", "tokenizer.model"});
}

}  // namespace
}  // namespace vimo::data
