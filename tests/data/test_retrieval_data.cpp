// Tests the synthetic generator (determinism, documented fields, learnable structure), the retrieval
// dataset (shapes, masks, errors). The streaming loader has its own tests (test_loader.cpp).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "data/collate.h"
#include "data/dataset_writer.h"
#include "data/loader.h"
#include "data/manifest.h"
#include "data/retrieval_dataset.h"
#include "data/shard.h"
#include "data/synthetic.h"
#include "tests/data/shard_file.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;
using vimo::testing::expect_error;
using vimo::testing::indexed_record_offset;

fs::path test_dir(const std::string& name) { return vimo::testing::fresh_test_dir("retrieval_data", name); }

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string shard_name(int index) {
  char name[32];
  std::snprintf(name, sizeof(name), "shard_%05d.bin", index);
  return name;
}

std::vector<std::string> split_words(const std::string& text) {
  std::istringstream in(text);
  return {std::istream_iterator<std::string>(in), {}};
}

SynthOptions tiny_options(uint64_t seed) {
  SynthOptions o;
  o.num_train = 20;
  o.num_test = 5;
  o.frames = 6;
  o.feature_dim = 5;
  o.records_per_shard = 8;
  o.seed = seed;
  return o;
}

// One mid-sized dataset shared by the tests that only read it: 3 train shards, structure measurable.
class SyntheticData : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    options_.num_train = 240;
    options_.num_test = 24;
    options_.frames = 32;
    options_.feature_dim = 16;
    options_.records_per_shard = 100;
    options_.seed = vimo::testing::fresh_seed();
    std::printf("[ seed     ] dataset seed %llu (set VIMO_TEST_SEED to replay)\n",
                static_cast<unsigned long long>(options_.seed));
    dir_ = test_dir("shared").string();
    write_synthetic_dataset(options_, dir_);
  }
  static SynthOptions options_;
  static std::string dir_;
};
SynthOptions SyntheticData::options_;
std::string SyntheticData::dir_;

TEST(Synthetic, SameOptionsGiveIdenticalFilesAndOtherSeedsDiffer) {
  const uint64_t seed = vimo::testing::seed_torch();
  const fs::path a = test_dir("a"), b = test_dir("b"), c = test_dir("c");
  write_synthetic_dataset(tiny_options(seed), a.string());
  write_synthetic_dataset(tiny_options(seed), b.string());
  write_synthetic_dataset(tiny_options(seed + 1), c.string());
  std::vector<std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(a)) {
    if (entry.is_regular_file()) files.push_back(fs::relative(entry.path(), a).string());
  }
  std::sort(files.begin(), files.end());
  EXPECT_EQ(files, (std::vector<std::string>{"manifest.json", "test/shard_00000.bin", "train/shard_00000.bin",
                                             "train/shard_00001.bin", "train/shard_00002.bin", "vocab.txt"}));
  for (const std::string& file : files) EXPECT_EQ(read_bytes(a / file), read_bytes(b / file)) << file;
  EXPECT_NE(read_bytes(a / "train/shard_00000.bin"), read_bytes(c / "train/shard_00000.bin"));

  const nlohmann::json manifest = nlohmann::json::parse(read_bytes(a / "manifest.json"));
  EXPECT_EQ(manifest["metadata"]["options"]["seed"].get<uint64_t>(), seed);
  EXPECT_EQ(manifest["splits"]["train"]["records"], 20);
  std::vector<int64_t> counts;
  for (const auto& shard : manifest["splits"]["train"]["shards"])
    counts.push_back(shard["records"].get<int64_t>());
  EXPECT_EQ(counts, (std::vector<int64_t>{8, 8, 4}));
  EXPECT_EQ(manifest["splits"]["test"]["shards"][0]["file"], "shard_00000.bin");

  // Rewriting with fewer records removes the shards the new dataset no longer has.
  SynthOptions smaller = tiny_options(seed);
  smaller.num_train = 8;
  write_synthetic_dataset(smaller, a.string());
  EXPECT_TRUE(fs::exists(a / "train/shard_00000.bin"));
  EXPECT_FALSE(fs::exists(a / "train/shard_00001.bin"));
  EXPECT_EQ(RetrievalDataset(a.string(), "train").size(), 8);
}

TEST(Synthetic, RejectsTextLengthTooShortForCaptions) {
  SynthOptions o = tiny_options(1);
  o.max_text_len = 9;
  expect_error([&] { write_synthetic_dataset(o, test_dir("short").string()); }, {"max_text_len", "10", "9"});
}

TEST_F(SyntheticData, RecordsHaveTheDocumentedFields) {
  const std::vector<std::string>& vocab = synthetic_vocabulary();
  std::vector<std::string> file_vocab = split_words(read_bytes(fs::path(dir_) / "vocab.txt"));
  EXPECT_EQ(file_vocab, vocab);
  ASSERT_GE(vocab.size(), 3u);
  EXPECT_EQ(vocab[0], "<pad>");
  EXPECT_EQ(vocab[1], "<bos>");
  EXPECT_EQ(vocab[2], "<eot>");
  const int64_t F = options_.frames, Dv = options_.feature_dim, L = options_.max_text_len;

  for (const std::string split : {"train", "test"}) {
    int64_t expected_id = 0;
    std::set<std::string> captions;
    for (int shard = 0;; ++shard) {
      const fs::path path = fs::path(dir_) / split / shard_name(shard);
      if (!fs::exists(path)) break;
      const ShardReader reader(path.string());
      for (uint64_t i = 0; i < reader.size(); ++i, ++expected_id) {
        const Record r = reader.read_record(i);
        SCOPED_TRACE(path.string() + " record " + std::to_string(i));
        EXPECT_EQ(r.get("id").int64s(), std::vector<int64_t>{expected_id});
        const int64_t n = r.get("num_frames").int64s().at(0);
        EXPECT_GE(n, F / 2);
        EXPECT_LE(n, F);
        ASSERT_EQ(r.get("frames").shape, (std::vector<int64_t>{F, Dv}));
        ASSERT_EQ(r.get("keypoints").shape, (std::vector<int64_t>{F, 17, 3}));
        const std::vector<float> frames = r.get("frames").floats(), keypoints = r.get("keypoints").floats();
        for (int64_t t = 0; t < F; ++t) {
          float frame_norm = 0, keypoint_norm = 0;
          for (int64_t d = 0; d < Dv; ++d) frame_norm += std::abs(frames[t * Dv + d]);
          for (int64_t k = 0; k < 51; ++k) keypoint_norm += std::abs(keypoints[t * 51 + k]);
          const bool valid = t < n;
          EXPECT_EQ(valid, frame_norm > 0) << "frame " << t;
          EXPECT_EQ(valid, keypoint_norm > 0) << "frame " << t;
          for (int64_t j = 0; j < 17 && t < n; ++j) {
            const float confidence = keypoints[t * 51 + j * 3 + 2];
            EXPECT_TRUE(confidence >= 0.5f && confidence <= 1.0f) << confidence;
          }
        }
        // text_ids = <bos>, the caption's words, <eot>, then <pad>.
        const std::string caption = r.get("caption").text();
        captions.insert(caption);
        const std::vector<std::string> words = split_words(caption);
        ASSERT_EQ(r.get("text_ids").shape, std::vector<int64_t>{L});
        const std::vector<int64_t> ids = r.get("text_ids").int64s();
        ASSERT_LE(words.size() + 2, ids.size());
        EXPECT_EQ(ids[0], 1);
        for (size_t w = 0; w < words.size(); ++w) EXPECT_EQ(vocab.at(ids[w + 1]), words[w]);
        EXPECT_EQ(ids[words.size() + 1], 2);
        for (size_t k = words.size() + 2; k < ids.size(); ++k) EXPECT_EQ(ids[k], 0);
      }
    }
    EXPECT_EQ(expected_id, split == "train" ? options_.num_train : options_.num_test);
    EXPECT_GT(captions.size(), static_cast<size_t>(expected_id / 2)) << "captions should rarely repeat";
  }
}

// Per-sample statistics; words of "a person <action> <speed> holding a <color> <object>".
struct Sample {
  std::string action, speed, color, object;
  at::Tensor mean_frame;      // [Dv]: mean visual feature over the valid frames
  at::Tensor keypoint_swing;  // [34]: temporal std of each joint coordinate over the valid frames
};

std::vector<Sample> sample_statistics(const RetrievalDataset& data) {
  std::vector<int64_t> all(data.size());
  std::iota(all.begin(), all.end(), 0);
  const RetrievalBatch batch = data.batch(all);
  std::vector<Sample> samples;
  for (int64_t i = 0; i < data.size(); ++i) {
    const std::vector<std::string> w = split_words(data.caption(i));
    const int64_t n = batch.frame_mask[i].sum().item<int64_t>();
    const at::Tensor xy = batch.keypoints[i].narrow(0, 0, n).narrow(2, 0, 2).reshape({n, 34});
    samples.push_back(
        {w.at(2), w.at(3), w.at(6), w.at(7), batch.frames[i].narrow(0, 0, n).mean(0), xy.std(0)});
  }
  return samples;
}

// Mean distance of `field` over the pairs `among` selects, split by whether `same` holds: {same, different}.
std::pair<double, double> mean_distances(const std::vector<Sample>& s, at::Tensor Sample::*field,
                                         const std::function<bool(const Sample&, const Sample&)>& among,
                                         const std::function<bool(const Sample&, const Sample&)>& same) {
  double sum[2] = {0, 0};
  int64_t count[2] = {0, 0};
  for (size_t i = 0; i < s.size(); ++i) {
    for (size_t j = i + 1; j < s.size(); ++j) {
      if (!among(s[i], s[j])) continue;
      const int k = same(s[i], s[j]) ? 0 : 1;
      sum[k] += (s[i].*field - s[j].*field).norm().item<double>();
      ++count[k];
    }
  }
  EXPECT_GT(count[0], 10);
  EXPECT_GT(count[1], 10);
  return {sum[0] / std::max<int64_t>(count[0], 1), sum[1] / std::max<int64_t>(count[1], 1)};
}

TEST_F(SyntheticData, FramesCarryObjectAndColorButNotAction) {
  const std::vector<Sample> s = sample_statistics(RetrievalDataset(dir_, "train"));
  auto any = [](const Sample&, const Sample&) { return true; };
  auto same_look = [](const Sample& a, const Sample& b) {
    return a.object == b.object && a.color == b.color;
  };
  auto same_object = [](const Sample& a, const Sample& b) { return a.object == b.object; };
  auto same_action = [](const Sample& a, const Sample& b) { return a.action == b.action; };
  const auto [look_same, look_different] = mean_distances(s, &Sample::mean_frame, any, same_look);
  EXPECT_LT(look_same, 0.3 * look_different);
  const auto [object_same, object_different] = mean_distances(s, &Sample::mean_frame, any, same_object);
  EXPECT_LT(object_same, 0.85 * object_different);
  // Among samples that look alike, the action changes nothing.
  const auto [action_same, action_different] = mean_distances(s, &Sample::mean_frame, same_look, same_action);
  EXPECT_GT(action_same, 0.75 * action_different);
  EXPECT_LT(action_same, 1.33 * action_different);
}

TEST_F(SyntheticData, KeypointsCarryActionButNotObject) {
  const std::vector<Sample> s = sample_statistics(RetrievalDataset(dir_, "train"));
  auto same_speed = [](const Sample& a, const Sample& b) { return a.speed == b.speed; };
  auto same_action = [](const Sample& a, const Sample& b) { return a.action == b.action; };
  auto same_motion = [](const Sample& a, const Sample& b) {
    return a.action == b.action && a.speed == b.speed;
  };
  auto same_object = [](const Sample& a, const Sample& b) { return a.object == b.object; };
  const auto [action_same, action_different] =
      mean_distances(s, &Sample::keypoint_swing, same_speed, same_action);
  EXPECT_LT(action_same, 0.6 * action_different);
  // Among samples that move alike, the object changes nothing.
  const auto [object_same, object_different] =
      mean_distances(s, &Sample::keypoint_swing, same_motion, same_object);
  EXPECT_GT(object_same, 0.75 * object_different);
  EXPECT_LT(object_same, 1.33 * object_different);
}

TEST_F(SyntheticData, DatasetBatchesHaveShapesAndMasks) {
  const RetrievalDataset train(dir_, "train"), test(dir_, "test");
  EXPECT_EQ(train.size(), options_.num_train);
  EXPECT_EQ(test.size(), options_.num_test);
  EXPECT_EQ(train.vocab_size(), static_cast<int64_t>(synthetic_vocabulary().size()));
  EXPECT_EQ(train.max_text_len(), options_.max_text_len);
  EXPECT_EQ(train.frames(), options_.frames);
  EXPECT_EQ(train.feature_dim(), options_.feature_dim);

  std::mt19937_64 rng(vimo::testing::seed_torch());
  std::vector<int64_t> indices(1 + rng() % 12);
  for (int64_t& index : indices) index = static_cast<int64_t>(rng() % train.size());
  const RetrievalBatch b = train.batch(indices);
  const int64_t B = static_cast<int64_t>(indices.size()), F = options_.frames;
  EXPECT_EQ(b.size(), B);
  EXPECT_EQ(b.text_ids.sizes(), (at::IntArrayRef{B, options_.max_text_len}));
  EXPECT_EQ(b.frames.sizes(), (at::IntArrayRef{B, F, options_.feature_dim}));
  EXPECT_EQ(b.keypoints.sizes(), (at::IntArrayRef{B, F, 17, 3}));
  EXPECT_EQ(b.frame_mask.sizes(), (at::IntArrayRef{B, F}));
  EXPECT_EQ(b.text_mask.scalar_type(), at::kBool);
  EXPECT_EQ(b.frame_mask.scalar_type(), at::kBool);
  EXPECT_TRUE(b.text_mask.equal(b.text_ids.ne(0)));
  EXPECT_TRUE(b.text_mask.sum(1).eq(10).all().item<bool>());
  EXPECT_TRUE(b.sample_ids.equal(at::tensor(indices, at::kLong)));  // synthetic ids are 0..n-1 in shard order

  // The masks agree with the records themselves.
  std::map<int64_t, Record> records;
  for (int shard = 0; shard < 3; ++shard) {
    const ShardReader reader((fs::path(dir_) / "train" / shard_name(shard)).string());
    for (uint64_t i = 0; i < reader.size(); ++i) {
      Record r = reader.read_record(i);
      records[r.get("id").int64s()[0]] = std::move(r);
    }
  }
  for (int64_t k = 0; k < B; ++k) {
    const Record& r = records.at(indices[k]);
    const int64_t n = r.get("num_frames").int64s()[0];
    EXPECT_TRUE(b.frame_mask[k].equal(at::arange(F) < n));
    EXPECT_EQ(train.caption(indices[k]), r.get("caption").text());
    EXPECT_TRUE(b.frames[k].equal(at::tensor(r.get("frames").floats()).reshape({F, options_.feature_dim})));
    EXPECT_EQ(b.frames[k].narrow(0, n, F - n).abs().sum().item<float>(), 0.0f);
  }
  expect_error([&] { train.batch({0, train.size()}); }, {"index " + std::to_string(train.size()), "240"});
}

TEST(RetrievalDataset, ErrorsNameTheInput) {
  const fs::path root = test_dir("errors");
  expect_error([&] { RetrievalDataset((root / "absent").string(), "train"); },
               {(root / "absent").string(), "synth"});
  write_synthetic_dataset(tiny_options(7), (root / "a").string());
  expect_error([&] { RetrievalDataset((root / "a").string(), "valid"); }, {"split 'valid'"});
  fs::create_directories(root / "c");
  expect_error([&] { RetrievalDataset((root / "c").string(), "train"); },
               {(root / "c" / "manifest.json").string(), "manifest"});

  // A shard whose records have another feature size than the split's first record.
  SynthOptions other = tiny_options(7);
  other.feature_dim += 1;
  write_synthetic_dataset(other, (root / "b").string());
  const fs::path odd = root / "a" / "train" / "shard_00001.bin";
  fs::copy_file(root / "b" / "train" / "shard_00001.bin", odd, fs::copy_options::overwrite_existing);
  expect_error([&] { RetrievalDataset((root / "a").string(), "train"); },
               {odd.string() + ": record 0 at offset 16", "'frames'", "float32 [6, 6]", "float32 [6, 5]"});
}

TEST(RetrievalDataset, CollatedBatchesWithMissingFieldsOrWrongDtypesAreNamed) {
  const fs::path root = test_dir("batch_errors");
  write_synthetic_dataset(tiny_options(3), root.string());
  const RetrievalDataset test(root.string(), "test");
  const DatasetManifest manifest = read_manifest(root.string());
  const ShardReader reader(manifest.shard_path("train", 0));
  std::vector<Record> records = {reader.read_record(0), reader.read_record(1)};
  const auto convert = [&](const std::vector<Record>& rs) {
    return to_retrieval_batch(collate(rs, {0, 1}, {"r0", "r1"}), test.dims(), "batch 7");
  };
  EXPECT_EQ(convert(records).size(), 2);
  for (Record& r : records) {
    for (Field& f : r.fields) {
      if (f.name == "num_frames") f = Field::from_bytes("num_frames", DType::Int32, {1}, {1, 0, 0, 0});
    }
  }
  expect_error([&] { convert(records); }, {"batch 7", "'num_frames'", "Int", "expected Long"});
  for (Record& r : records) r.fields.erase(r.fields.begin() + 2);  // text_ids
  expect_error([&] { convert(records); }, {"no field 'text_ids'"});
}

// The dataset at `source` written again to `out`, record for record, with `change` applied to each train
// record (by its index in the split) and 8 records per shard.
void rewrite_dataset(const fs::path& source, const fs::path& out,
                     const std::function<void(int64_t, Record&)>& change) {
  const DatasetManifest manifest = read_manifest(source.string());
  DatasetWriterOptions options;
  options.max_shard_records = 8;
  DatasetWriter writer(out.string(), manifest.kind, options);
  for (const auto& [name, split] : manifest.splits) {
    int64_t index = 0;
    for (size_t s = 0; s < split.shards.size(); ++s) {
      const ShardReader reader(manifest.shard_path(name, s));
      for (uint64_t i = 0; i < reader.size(); ++i, ++index) {
        Record record = reader.read_record(i);
        if (name == "train") change(index, record);
        writer.append(name, record);
      }
    }
  }
  writer.add_file("vocab.txt", read_bytes(manifest.file_path("vocab.txt")));
  for (const auto& [key, value] : manifest.metadata.items()) writer.set_metadata(key, value);
  writer.finish();
}

// An epoch of the train split as the retriever trainer reads it: every batch converted; returns the keys.
std::vector<int64_t> read_training_epoch(const LoaderOptions& o, const RetrievalDims& dims,
                                         int64_t& skipped) {
  StreamingLoader loader(o);
  std::vector<int64_t> keys;
  for (int64_t step = 0; step < loader.batches_per_epoch(); ++step) {
    const LoaderBatch batch = loader.next();
    EXPECT_EQ(to_retrieval_batch(batch.tensors, dims, "batch").size(),
              static_cast<int64_t>(batch.keys.size()));
    keys.insert(keys.end(), batch.keys.begin(), batch.keys.end());
    skipped += batch.corrupt_skipped;
  }
  return keys;
}

// The trainer's loader checks every training record against the test split's shapes (retrieval_schema): a
// record without text_ids, and a split whose every record has int32 num_frames, are named with their file,
// record and offset, or skipped and counted with skip_corrupt.
TEST(RetrievalDataset, TrainingRecordsOfOtherFieldsAreNamedOrSkippedByTheLoader) {
  const fs::path root = test_dir("loader_schema");
  const uint64_t seed = vimo::testing::fresh_seed();
  write_synthetic_dataset(tiny_options(seed), (root / "good").string());  // 20 train records
  const RetrievalDataset test((root / "good").string(), "test");
  LoaderOptions o;
  o.dir = (root / "bad").string();
  o.kind = kRetrievalKind;
  o.global_batch = 4;
  o.seed = seed;
  o.schema = retrieval_schema(test.dims(), "the test split's first record");
  const std::string required = " (a retrieval record with the shapes of the test split's first record)";
  int64_t skipped = 0;

  rewrite_dataset(root / "good", root / "bad", [](int64_t index, Record& r) {
    if (index == 11) r.fields.erase(r.fields.begin() + 2);  // text_ids of shard 1, record 3
  });
  std::string shard = read_manifest(o.dir).shard_path("train", 1);
  expect_error([&] { read_training_epoch(o, test.dims(), skipped); },
               {"shard " + shard + ": record 3 at offset " + std::to_string(indexed_record_offset(shard, 3)) +
                    ": missing field 'text_ids', expected int64 [12]" + required,
                "skip_corrupt"});
  o.skip_corrupt = true;
  skipped = 0;
  std::vector<int64_t> keys = read_training_epoch(o, test.dims(), skipped);
  std::sort(keys.begin(), keys.end());
  std::vector<int64_t> expected(20);
  std::iota(expected.begin(), expected.end(), 0);
  expected.erase(expected.begin() + 11);
  EXPECT_EQ(keys, expected);
  EXPECT_EQ(skipped, 1);

  rewrite_dataset(root / "good", root / "bad", [](int64_t, Record& r) {
    for (Field& f : r.fields) {
      if (f.name == "num_frames") f = Field::from_bytes("num_frames", DType::Int32, {1}, {4, 0, 0, 0});
    }
  });
  o.skip_corrupt = false;
  const int64_t first = StreamingLoader(o).global_keys(0, 0).front();  // the first record read
  shard = read_manifest(o.dir).shard_path("train", static_cast<size_t>(first / 8));
  const auto record = static_cast<uint64_t>(first % 8);
  expect_error([&] { read_training_epoch(o, test.dims(), skipped); },
               {"shard " + shard + ": record " + std::to_string(record) + " at offset " +
                    std::to_string(indexed_record_offset(shard, record)) +
                    ": field 'num_frames' is int32 [1], expected int64 [1]" + required,
                "skip_corrupt"});
  o.skip_corrupt = true;
  skipped = 0;
  EXPECT_TRUE(read_training_epoch(o, test.dims(), skipped).empty());  // batches of no rows, still converted
  EXPECT_EQ(skipped, 20);
}

// A token id at the vocabulary's size and a frame count past the frames: each record is named by itself,
// with its file, record and offset (not its batch), or skipped and counted.
TEST(RetrievalDataset, TokenIdsAndFrameCountsOutOfRangeAreNamedOrSkippedByRecord) {
  const fs::path root = test_dir("loader_ranges");
  const uint64_t seed = vimo::testing::fresh_seed();
  write_synthetic_dataset(tiny_options(seed), (root / "good").string());  // 20 train records, 8 per shard
  const RetrievalDataset test((root / "good").string(), "test");
  const RetrievalDims dims = test.dims();
  LoaderOptions o;
  o.dir = (root / "bad").string();
  o.kind = kRetrievalKind;
  o.global_batch = 4;
  o.seed = seed;
  o.schema = retrieval_schema(dims, "the test split's first record");
  std::mt19937_64 rng(seed);
  const int64_t bad_tokens = static_cast<int64_t>(rng() % 20);
  const int64_t bad_frames = (bad_tokens + 1 + static_cast<int64_t>(rng() % 19)) % 20;  // another record
  const int64_t position = static_cast<int64_t>(rng() % static_cast<uint64_t>(dims.max_text_len));
  const auto set_int64 = [](Field& field, int64_t element, int64_t value) {
    std::memcpy(field.bytes.data() + element * sizeof(int64_t), &value, sizeof(value));
  };
  rewrite_dataset(root / "good", root / "bad", [&](int64_t index, Record& r) {
    for (Field& f : r.fields) {
      if (index == bad_tokens && f.name == "text_ids") set_int64(f, position, dims.vocab_size);
      if (index == bad_frames && f.name == "num_frames") set_int64(f, 0, dims.frames + 1);
    }
  });
  const DatasetManifest manifest = read_manifest(o.dir);
  int64_t skipped = 0;
  try {
    read_training_epoch(o, dims, skipped);
    ADD_FAILURE() << "records out of range were accepted";
  } catch (const std::runtime_error& e) {
    // Whichever of the two the epoch's order reads first.
    const std::string message = e.what();
    const bool tokens_first = message.find("text_ids") != std::string::npos;
    const int64_t index = tokens_first ? bad_tokens : bad_frames;
    const std::string shard = manifest.shard_path("train", static_cast<size_t>(index / 8));
    const auto record = static_cast<uint64_t>(index % 8);
    const std::string where = "shard " + shard + ": record " + std::to_string(record) + " at offset " +
                              std::to_string(indexed_record_offset(shard, record)) + ": ";
    const std::string what = tokens_first
                                 ? fmt::format("field 'text_ids' holds {} at element {}, outside [0, {}]",
                                               dims.vocab_size, position, dims.vocab_size - 1)
                                 : fmt::format("field 'num_frames' holds {} at element 0, outside [0, {}]",
                                               dims.frames + 1, dims.frames);
    EXPECT_NE(message.find(where + what), std::string::npos) << message;
    EXPECT_NE(message.find("skip_corrupt"), std::string::npos) << message;
  }
  o.skip_corrupt = true;
  skipped = 0;
  std::vector<int64_t> keys = read_training_epoch(o, dims, skipped);
  std::sort(keys.begin(), keys.end());
  std::vector<int64_t> expected;
  for (int64_t k = 0; k < 20; ++k) {
    if (k != bad_tokens && k != bad_frames) expected.push_back(k);
  }
  EXPECT_EQ(keys, expected);
  EXPECT_EQ(skipped, 2);
}

}  // namespace
}  // namespace vimo::data
