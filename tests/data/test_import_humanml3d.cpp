// Tests the HumanML3D importer on a tree in the real layout with the real quirks (CRLF, blank lines,
// NaN and sub-segment from/to, mirrored names, extra '#', missing files, out-of-range lengths), reading the
// shards back and comparing every record with the inputs.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "data/import_humanml3d.h"
#include "data/manifest.h"
#include "data/npy.h"
#include "data/shard.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;
using vimo::testing::expect_error;

constexpr int64_t kDim = 263;

fs::path test_dir() {
  return vimo::testing::fresh_test_dir("import_humanml3d",
                                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// Distinct, exactly representable values per motion, frame and feature.
std::vector<float> motion_values(int64_t seed, int64_t frames) {
  std::vector<float> values(frames * kDim);
  for (int64_t t = 0; t < frames; ++t)
    for (int64_t d = 0; d < kDim; ++d)
      values[t * kDim + d] = static_cast<float>(seed * 4096 + t) + d / 512.0f;
  return values;
}

// A float64 motion as NumPy writes it with np.save(..., np.float64 array) when the header needs version 2.0
// (hand-assembled: the header is numpy's dict, padded so the 12-byte prefix + header is a multiple of 64).
std::string numpy_float64_v2(const std::vector<float>& values, int64_t frames) {
  std::string header = "{'descr': '<f8', 'fortran_order': False, 'shape': (" + std::to_string(frames) + ", " +
                       std::to_string(kDim) + "), }";
  header.append(64 - (12 + header.size() + 1) % 64, ' ');
  header += '\n';
  std::string out = std::string("\x93NUMPY\x02\x00", 8);
  for (int i = 0; i < 4; ++i) out += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  out += header;
  for (float v : values) {
    const double d = v;
    out.append(reinterpret_cast<const char*>(&d), sizeof d);
  }
  return out;
}

struct Tree {
  fs::path root;
  std::vector<float> m1, mirror, m6, m7;  // the motions whose samples are kept
  std::vector<float> mean, std_dev;       // Mean.npy and Std.npy, as float32
};

Tree make_tree(const fs::path& root) {
  Tree tree{
      root, motion_values(1, 60), motion_values(2, 45), motion_values(6, 120), motion_values(7, 199), {}, {}};
  fs::create_directories(root / "new_joint_vecs");
  fs::create_directories(root / "texts");
  const fs::path motions = root / "new_joint_vecs", texts = root / "texts";
  // The training set's per-feature statistics in the real files; fresh random values here, every one
  // different, so that an element copied from the wrong place or rounded shows.
  std::mt19937_64 rng(vimo::testing::seed_torch());
  for (int64_t d = 0; d < kDim; ++d) {
    tree.mean.push_back(std::normal_distribution<float>(0.0f, 3.0f)(rng));
    tree.std_dev.push_back(std::uniform_real_distribution<float>(0.01f, 2.0f)(rng));
  }
  write_npy((root / "Mean.npy").string(), {kDim}, tree.mean);
  write_npy((root / "Std.npy").string(), {kDim}, tree.std_dev);

  write_npy((motions / "000001.npy").string(), {60, kDim}, tree.m1);
  write_text(texts / "000001.txt",
             "a man walks forward.#a/DET man/NOUN walk/VERB forward/ADV#0.0#0.0\r\n"
             "\r\n"
             "a person steps ahead#a/DET person/NOUN step/VERB ahead/ADV#0.0#0.0   \r\n"
             "then he turns.#then/ADV he/PRON turn/VERB#0.09#2.63\r\n");
  write_text(motions / "M000001.npy", numpy_float64_v2(tree.mirror, 45));
  write_text(texts / "M000001.txt",
             "a man#walks to the left.#a/DET man/NOUN walk/VERB#0.0#0.0\n"
             "a line without tags\n");
  write_npy((motions / "000002.npy").string(), {39, kDim}, motion_values(3, 39));
  write_text(texts / "000002.txt", "too short#short/ADJ#0.0#0.0\n");
  write_npy((motions / "000003.npy").string(), {200, kDim}, motion_values(4, 200));
  write_text(texts / "000003.txt", "too long#long/ADJ#0.0#0.0\nits segment#x#0.0#3.0\n");
  write_text(texts / "000004.txt", "no motion#x#0.0#0.0\n");
  write_npy((motions / "000005.npy").string(), {50, kDim}, motion_values(5, 50));
  write_npy((motions / "000006.npy").string(), {120, kDim}, tree.m6);
  write_text(texts / "000006.txt",
             "a person jumps.#a/DET person/NOUN jump/VERB#nan#NaN\n"
             "jumps high#jump/VERB high/ADV#1.15#4.0\n"
             "short one#short/ADJ#0.0#1.0\n"
             "beyond the end#beyond/ADP#0.0#9.0\n"
             "to is zero#x#0.5#0.0\n");
  write_npy((motions / "000007.npy").string(), {199, kDim}, tree.m7);
  write_text(texts / "000007.txt", "dances#dance/VERB#0.0#9.95\ntwirls#twirl/VERB#2.0#3.0\n");

  write_text(root / "train.txt", "000001\r\n\r\nM000001  \n000002\n000003\n000004\n000005\n000001\n");
  write_text(root / "val.txt", "000006\n");
  write_text(root / "test.txt", "\n000007\r\n");
  return tree;
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

struct Expected {
  std::string name, captions, tokens;
  int64_t begin, end;
  const std::vector<float>* motion;
};

void expect_records(const std::vector<Record>& records, const std::vector<Expected>& expected) {
  ASSERT_EQ(records.size(), expected.size());
  for (size_t i = 0; i < records.size(); ++i) {
    SCOPED_TRACE(expected[i].name);
    const Record& r = records[i];
    const Expected& e = expected[i];
    EXPECT_EQ(r.get("id").int64s(), std::vector<int64_t>{static_cast<int64_t>(i)});
    EXPECT_EQ(r.get("name").text(), e.name);
    EXPECT_EQ(r.get("captions").text(), e.captions);
    EXPECT_EQ(r.get("tokens").text(), e.tokens);
    EXPECT_EQ(r.get("length").int64s(), std::vector<int64_t>{e.end - e.begin});
    EXPECT_EQ(r.get("range").int64s(), (std::vector<int64_t>{e.begin, e.end}));
    EXPECT_EQ(r.get("motion").shape, (std::vector<int64_t>{e.end - e.begin, kDim}));
    const std::vector<float> slice(e.motion->begin() + e.begin * kDim, e.motion->begin() + e.end * kDim);
    EXPECT_EQ(r.get("motion").floats(), slice);
  }
}

TEST(ImportHumanML3D, ImportsEverySampleOfTheRealLayout) {
  const fs::path dir = test_dir();
  const Tree tree = make_tree(dir / "HumanML3D");
  HumanML3DImportOptions options;
  options.writer.max_shard_records = 2;  // several shards per split
  const HumanML3DImportReport report = import_humanml3d(tree.root.string(), (dir / "out").string(), options);

  expect_records(
      read_split((dir / "out").string(), "train"),
      {{"000001", "a man walks forward.\na person steps ahead",
        "a/DET man/NOUN walk/VERB forward/ADV\na/DET person/NOUN step/VERB ahead/ADV", 0, 60, &tree.m1},
       // int(0.09 * 20) = int(1.7999999999999998) = 1; int(2.63 * 20) = 52
       {"000001[1:52]", "then he turns.", "then/ADV he/PRON turn/VERB", 1, 52, &tree.m1},
       {"M000001", "a man#walks to the left.", "a/DET man/NOUN walk/VERB", 0, 45, &tree.mirror}});
  expect_records(read_split((dir / "out").string(), "val"),
                 {{"000006", "a person jumps.", "a/DET person/NOUN jump/VERB", 0, 120, &tree.m6},
                  {"000006[23:80]", "jumps high", "jump/VERB high/ADV", 23, 80, &tree.m6},
                  {"000006[0:120]", "beyond the end", "beyond/ADP", 0, 120, &tree.m6}});
  expect_records(read_split((dir / "out").string(), "test"),
                 {{"000007[0:199]", "dances", "dance/VERB", 0, 199, &tree.m7}});

  const HumanML3DSplitReport& train = report.splits.at("train");
  EXPECT_EQ(train.names, 6);
  EXPECT_EQ(train.duplicate_names, 1);
  EXPECT_EQ(train.missing_motion, 1);
  EXPECT_EQ(train.missing_text, 1);
  EXPECT_EQ(train.missing_names, (std::vector<std::string>{"000004", "000005"}));
  EXPECT_EQ(train.motions_too_short, 1);
  EXPECT_EQ(train.motions_too_long, 1);  // its segment is not considered
  EXPECT_EQ(train.segments_too_short + train.segments_too_long, 0);
  EXPECT_EQ(train.bad_caption_lines, 1);
  EXPECT_EQ(train.whole_samples, 2);
  EXPECT_EQ(train.segment_samples, 1);
  EXPECT_EQ(train.captions, 4);
  const HumanML3DSplitReport& val = report.splits.at("val");
  EXPECT_EQ(val.segments_too_short, 2);  // [0, 20) and [10, 0)
  EXPECT_EQ(val.records(), 3);
  const HumanML3DSplitReport& test = report.splits.at("test");
  EXPECT_EQ(test.segments_too_short, 1);
  EXPECT_EQ(test.whole_samples, 0);
  EXPECT_EQ(test.segment_samples, 1);
  const std::string summary = report.summary();
  EXPECT_NE(summary.find("train: 3 records"), std::string::npos) << summary;
  EXPECT_NE(summary.find("missing 1 motions, 1 texts (e.g. 000004, 000005)"), std::string::npos) << summary;

  const DatasetManifest manifest = read_manifest((dir / "out").string());
  EXPECT_EQ(manifest.kind, "motion");
  EXPECT_EQ(manifest.split("train").shards.size(), 2u);
  EXPECT_EQ(manifest.metadata.at("feature_dim"), kDim);
  EXPECT_EQ(manifest.metadata.at("humanml3d").at("report").at("train").at("missing_motion"), 1);
  // The statistics are the source's, every element, stored as float32 [263].
  for (const auto& [file, expected] :
       {std::pair{"mean.npy", &tree.mean}, std::pair{"std.npy", &tree.std_dev}}) {
    const NpyArray stored = read_npy(manifest.file_path(file));
    EXPECT_EQ(stored.dtype, NpyDType::Float32) << file;
    EXPECT_EQ(stored.shape, std::vector<int64_t>{kDim}) << file;
    EXPECT_EQ(stored.to_floats(), *expected) << file;
  }
}

TEST(ImportHumanML3D, StrictMakesSkipsErrors) {
  const fs::path dir = test_dir();
  const Tree tree = make_tree(dir / "HumanML3D");
  HumanML3DImportOptions options;
  options.strict = true;
  const std::string out = (dir / "out").string();
  expect_error([&] { import_humanml3d(tree.root.string(), out, options); },
               {"M000001.txt:2", "expected 'caption#tokens#from#to'", "a line without tags"});
  EXPECT_FALSE(fs::exists(dir / "out" / "manifest.json"));
  write_text(tree.root / "texts" / "M000001.txt",
             "a man#walks to the left.#a/DET man/NOUN walk/VERB#0.0#0.0\n");
  expect_error([&] { import_humanml3d(tree.root.string(), out, options); },
               {"train.txt:6", "'000004' is listed", "000004.npy does not exist"});
}

TEST(ImportHumanML3D, CaptionLineParsing) {
  const HumanML3DCaption ok = parse_humanml3d_caption("x # y#tok/NOUN#1e0#2.5", "f.txt:1");
  EXPECT_EQ(ok.caption, "x # y");
  EXPECT_EQ(ok.tokens, "tok/NOUN");
  EXPECT_EQ(ok.from, 1.0);
  EXPECT_EQ(ok.to, 2.5);
  EXPECT_EQ(parse_humanml3d_caption("c#t#NaN#nan", "f.txt:1").to, 0.0);
  expect_error([] { parse_humanml3d_caption("c#t#abc#0.0", "f.txt:7"); }, {"f.txt:7", "'from' field 'abc'"});
  expect_error([] { parse_humanml3d_caption("c#t#0.0#inf", "f.txt:8"); }, {"f.txt:8", "'to' field inf"});
  expect_error([] { parse_humanml3d_caption("c#t#-1.0#2.0", "f.txt:9"); },
               {"f.txt:9", "must be finite and >= 0"});
  expect_error([] { parse_humanml3d_caption("c#t#0x10#2.0", "f.txt:9"); }, {"f.txt:9", "not a number"});
  expect_error([] { parse_humanml3d_caption("c#t#1.0", "f.txt:2"); }, {"f.txt:2", "found 3"});
}

TEST(ImportHumanML3D, NamesBadMotionFiles) {
  const fs::path dir = test_dir();
  const Tree tree = make_tree(dir / "HumanML3D");
  write_text(tree.root / "train.txt", "000001\n");
  const std::string motion = (tree.root / "new_joint_vecs" / "000001.npy").string();
  const std::string out = (dir / "out").string();
  const std::string good = npy_bytes({60, kDim}, tree.m1);

  write_text(motion, good.substr(0, good.size() - 100));
  expect_error([&] { import_humanml3d(tree.root.string(), out); },
               {motion, "truncated", "expected 63120 bytes of data, the file has 63020"});
  write_npy(motion, {60, kDim}, std::vector<int64_t>(60 * kDim, 1));
  expect_error([&] { import_humanml3d(tree.root.string(), out); }, {motion, "floating point", "<i8"});
  write_npy(motion, {60, 251}, std::vector<float>(60 * 251, 1.0f));
  expect_error([&] { import_humanml3d(tree.root.string(), out); }, {motion, "[T, 263]", "[60, 251]"});
  write_npy(motion, {60 * kDim}, tree.m1);
  expect_error([&] { import_humanml3d(tree.root.string(), out); }, {motion, "[T, 263]", "[15780]"});
  EXPECT_FALSE(fs::exists(dir / "out" / "manifest.json"));

  fs::remove(tree.root / "Std.npy");
  expect_error([&] { import_humanml3d(tree.root.string(), out); }, {"Std.npy", "missing"});
  fs::remove(tree.root / "val.txt");
  expect_error([&] { import_humanml3d(tree.root.string(), out); }, {"val.txt", "split file missing"});
  expect_error([&] { import_humanml3d((dir / "nowhere").string(), out); },
               {"nowhere", "not a HumanML3D directory"});
}

// A re-import that fails on a junk motion leaves the dataset of the last good import whole and verifiable
// (an audit's repro: the writer deleted the old manifest when it was made, before any input was read).
TEST(ImportHumanML3D, AFailedReimportKeepsTheDataset) {
  const fs::path dir = test_dir();
  const Tree tree = make_tree(dir / "HumanML3D");
  const std::string out = (dir / "out").string();
  import_humanml3d(tree.root.string(), out);
  const std::vector<Record> before = read_split(out, "val");
  write_text(tree.root / "new_joint_vecs" / "000006.npy", "junk");
  expect_error([&] { import_humanml3d(tree.root.string(), out); }, {"000006.npy"});
  const DatasetManifest manifest = read_manifest(out);
  EXPECT_NO_THROW(verify_dataset(manifest, /*hashes=*/true));
  EXPECT_EQ(manifest.split("train").records, 3u);
  const std::vector<Record> after = read_split(out, "val");
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i)
    EXPECT_EQ(after[i].get("name").text(), before[i].get("name").text());
}

// A motion in two split files would be trained on and tested on: an error naming both lines (the video
// importer refuses this too). Twice in one split stays a counted duplicate.
TEST(ImportHumanML3D, AMotionInTwoSplitsIsAnError) {
  const fs::path dir = test_dir();
  const Tree tree = make_tree(dir / "HumanML3D");
  write_text(tree.root / "test.txt", "000007\n\nM000001\n");
  expect_error([&] { import_humanml3d(tree.root.string(), (dir / "out").string()); },
               {(tree.root / "test.txt").string() + ":3", "'M000001'",
                "already listed at " + (tree.root / "train.txt").string() + ":3", "one split"});
  EXPECT_FALSE(fs::exists(dir / "out"));
}

// Split entries become paths (new_joint_vecs/<name>.npy): one that leaves the folder is refused.
TEST(ImportHumanML3D, SplitNamesMustBeFileStems) {
  const fs::path dir = test_dir();
  const Tree tree = make_tree(dir / "HumanML3D");
  fs::create_directories(dir / "elsewhere");
  write_npy((dir / "elsewhere" / "x.npy").string(), {60, kDim}, tree.m1);
  write_text(tree.root / "val.txt", "000006\n../../elsewhere/x\n");
  expect_error([&] { import_humanml3d(tree.root.string(), (dir / "out").string()); },
               {"val.txt:2", "invalid motion name '../../elsewhere/x'", "file stems"});
  write_text(tree.root / "val.txt", "..\n");
  expect_error([&] { import_humanml3d(tree.root.string(), (dir / "out").string()); },
               {"val.txt:1", "invalid motion name '..'"});
}

// Windows editors start a file with a UTF-8 byte order mark; it must not stick to the first name.
TEST(ImportHumanML3D, AByteOrderMarkIsNotPartOfTheFirstLine) {
  const fs::path dir = test_dir();
  write_text(dir / "bom.txt",
             "\xef\xbb\xbf"
             "000001\r\n\xef\xbb\xbf"
             "000002\n");
  const std::vector<NumberedLine> lines = read_trimmed_lines((dir / "bom.txt").string());
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0].text, "000001");
  EXPECT_EQ(lines[1].text,
            "\xef\xbb\xbf"
            "000002");  // only at the start of the file
  const Tree tree = make_tree(dir / "HumanML3D");
  write_text(tree.root / "test.txt",
             "\xef\xbb\xbf"
             "000007\n");
  HumanML3DImportOptions options;
  options.strict = true;  // a name with the mark would be a missing motion
  write_text(tree.root / "texts" / "M000001.txt", "a man#walks.#a/DET man/NOUN#0.0#0.0\n");
  write_text(tree.root / "train.txt", "000001\nM000001\n");
  import_humanml3d(tree.root.string(), (dir / "out").string(), options);
  EXPECT_EQ(read_split((dir / "out").string(), "test").at(0).get("name").text(), "000007[0:199]");
}

// Mean.npy / Std.npy: float [feature_dim], finite, every std positive (features are divided by it); and an
// fps so large that int(seconds * fps) overflows is refused.
TEST(ImportHumanML3D, NamesBadStatisticsAndOptions) {
  const fs::path dir = test_dir();
  const Tree tree = make_tree(dir / "HumanML3D");
  const std::string out = (dir / "out").string();
  const std::string mean = (tree.root / "Mean.npy").string(), std_dev = (tree.root / "Std.npy").string();
  write_npy(mean, {kDim}, std::vector<int64_t>(kDim, 1));
  expect_error([&] { import_humanml3d(tree.root.string(), out); }, {mean, "float", "'<i8'", "[263]"});
  write_npy(mean, {1, kDim}, tree.mean);
  expect_error([&] { import_humanml3d(tree.root.string(), out); },
               {mean, "[263]", "found '<f4' of shape [1, 263]"});
  std::vector<float> bad = tree.mean;
  bad[7] = std::numeric_limits<float>::quiet_NaN();
  write_npy(mean, {kDim}, bad);
  expect_error([&] { import_humanml3d(tree.root.string(), out); }, {mean, "element 7 is nan", "finite"});
  write_npy(mean, {kDim}, tree.mean);
  for (const float value : {0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN()}) {
    bad = tree.std_dev;
    bad[200] = value;
    write_npy(std_dev, {kDim}, bad);
    expect_error([&] { import_humanml3d(tree.root.string(), out); },
                 {std_dev, "element 200 is", "finite and positive", "HINT"});
  }
  write_npy(std_dev, {kDim}, tree.std_dev);
  HumanML3DImportOptions options;
  options.fps = 1e300;
  expect_error([&] { import_humanml3d(tree.root.string(), out, options); },
               {"fps must be in (0, 1000]", "1e+300"});
  EXPECT_FALSE(fs::exists(dir / "out"));
  options.fps = 1000;
  EXPECT_NO_THROW(import_humanml3d(tree.root.string(), out, options));
}

}  // namespace
}  // namespace vimo::data
