// Tests the dataset writer and manifest, collation, the epoch order, and the streaming loader: elastic
// determinism, exact resume (twice, on other DP sizes, by sample keys), and every bad-data case.
#include <gtest/gtest.h>
#include <sys/mount.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "data/collate.h"
#include "data/dataset_writer.h"
#include "data/loader.h"
#include "data/manifest.h"
#include "data/pack.h"
#include "data/sample_order.h"
#include "tests/data/shard_file.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;
using vimo::testing::expect_error;
using vimo::testing::indexed_record_offset;

fs::path test_dir() {
  return vimo::testing::fresh_test_dir("loader",
                                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
}

// Record with key-derived contents: "key" Int64 [1] and "values" Float32 [len, 3] with len = 1 + key % 4,
// so every read can be checked against the key it claims to be.
Record keyed_record(int64_t key) {
  const int64_t len = 1 + key % 4;
  std::vector<float> values(static_cast<size_t>(len * 3));
  for (size_t i = 0; i < values.size(); ++i)
    values[i] = static_cast<float>(key) + 0.25f * static_cast<float>(i);
  Record r;
  r.fields.push_back(Field::from_int64s("key", {1}, {key}));
  r.fields.push_back(Field::from_floats("values", {len, 3}, values));
  return r;
}

// A dataset of `records` keyed records in shards of `per_shard` records (the last one shorter); `change`,
// when given, may alter each record before it is written.
void write_keyed_dataset(const fs::path& dir, int64_t records, uint64_t per_shard,
                         Compression compression = Compression::None,
                         const std::function<void(int64_t key, Record&)>& change = {}) {
  DatasetWriterOptions options;
  options.max_shard_records = per_shard;
  options.compression = compression;
  DatasetWriter writer(dir.string(), "keyed", options);
  for (int64_t k = 0; k < records; ++k) {
    Record record = keyed_record(k);
    if (change) change(k, record);
    writer.append("train", record);
  }
  writer.add_file("notes.txt", "keyed test data\n");
  writer.set_metadata("records", records);
  writer.finish();
}

LoaderOptions keyed_options(const fs::path& dir, int64_t global_batch, int rank, int size, uint64_t seed) {
  LoaderOptions o;
  o.dir = dir.string();
  o.kind = "keyed";
  o.global_batch = global_batch;
  o.dp_rank = rank;
  o.dp_size = size;
  o.seed = seed;
  o.shuffle_block = 7;
  return o;
}

// The batch's keys, checked against the record contents (the key field and the values derived from it).
std::vector<int64_t> checked_keys(const LoaderBatch& batch) {
  const at::Tensor keys = batch.tensors.field("key").select(1, 0);
  const at::Tensor lengths = batch.tensors.lengths.at("values");
  const at::Tensor values = batch.tensors.field("values");  // [B, 4, 3]
  std::vector<int64_t> out;
  for (int64_t i = 0; i < batch.tensors.size(); ++i) {
    const int64_t key = keys[i].item<int64_t>();
    EXPECT_EQ(key, batch.keys[static_cast<size_t>(i)]);
    const Record expected = keyed_record(key);
    const int64_t len = expected.get("values").shape[0];
    EXPECT_EQ(lengths[i].item<int64_t>(), len);
    EXPECT_TRUE(values[i].narrow(0, 0, len).flatten().equal(at::tensor(expected.get("values").floats())));
    EXPECT_EQ(values[i].narrow(0, len, values.size(1) - len).abs().sum().item<float>(), 0.0f);
    out.push_back(key);
  }
  return out;
}

// `steps` global batches read by `dp_size` loaders (one per rank), each continuing from `state` when given.
// Returns the concatenated global batches and the state after them.
std::vector<std::vector<int64_t>> read_global(const fs::path& dir, int64_t global_batch, int dp_size,
                                              uint64_t seed, int64_t steps, SamplerState* state,
                                              int workers = 2) {
  std::vector<std::unique_ptr<StreamingLoader>> ranks;
  for (int r = 0; r < dp_size; ++r) {
    LoaderOptions o = keyed_options(dir, global_batch, r, dp_size, seed);
    o.workers = workers;
    ranks.push_back(std::make_unique<StreamingLoader>(o));
    if (state && state->seed == seed) ranks.back()->load_state(*state);
  }
  std::vector<std::vector<int64_t>> batches;
  for (int64_t s = 0; s < steps; ++s) {
    std::vector<int64_t> global;
    for (auto& rank : ranks) {
      const std::vector<int64_t> keys = checked_keys(rank->next());
      global.insert(global.end(), keys.begin(), keys.end());
    }
    batches.push_back(global);
  }
  for (auto& rank : ranks) EXPECT_EQ(rank->state().epoch, ranks.front()->state().epoch);
  if (state) *state = ranks.front()->state();
  return batches;
}

// ---------------------------------------------------------------------------------------------------------
// DatasetWriter and manifest

TEST(DatasetWriter, RollsShardsBySizeAndListsHashes) {
  const fs::path dir = test_dir();
  DatasetWriterOptions options;
  options.max_shard_bytes = 300;  // a few keyed records per shard
  DatasetWriter writer(dir.string(), "keyed", options);
  for (int64_t k = 0; k < 40; ++k) writer.append(k % 4 == 0 ? "test" : "train", keyed_record(k));
  EXPECT_FALSE(fs::exists(dir / "manifest.json"));  // not before finish()
  writer.finish();
  const DatasetManifest m = read_manifest(dir.string());
  EXPECT_EQ(m.kind, "keyed");
  EXPECT_EQ(m.split("train").records, 30u);
  EXPECT_EQ(m.split("test").records, 10u);
  EXPECT_GT(m.split("train").shards.size(), 2u);
  for (const auto& [name, split] : m.splits) {
    for (size_t i = 0; i < split.shards.size(); ++i) {
      const std::string path = m.shard_path(name, i);
      EXPECT_EQ(split.shards[i].bytes, fs::file_size(path));
      EXPECT_EQ(split.shards[i].xxh3, file_xxh3(path));
      EXPECT_EQ(ShardReader(path).size(), split.shards[i].records);
      // A shard closes at the first record that takes it to max_shard_bytes.
      if (i + 1 < split.shards.size()) {
        EXPECT_GE(split.shards[i].bytes, 300u);
      }
    }
  }
  EXPECT_NO_THROW(verify_dataset(m, true));
}

// A writer abandoned half-way (as by an exception on bad input) leaves the dataset already in its directory
// whole: it wrote into a hidden sibling that finish() would have swapped in (Note [Replacing a dataset
// directory]). Before, the old manifest was deleted when the writer was made, and a failed re-import
// destroyed a good dataset.
TEST(DatasetWriter, AnUnfinishedWriterLeavesTheOldDatasetWholeAndARewriteReplacesIt) {
  const fs::path dir = test_dir() / "data";
  const fs::path staging = dir.parent_path() / ".data.vimo-tmp";
  write_keyed_dataset(dir, 30, 4);
  EXPECT_TRUE(fs::exists(dir / "train" / "shard_00007.bin"));
  {
    DatasetWriter writer(dir.string(), "keyed");
    for (int64_t k = 0; k < 9; ++k) writer.append("train", keyed_record(k));
    writer.add_file("notes.txt", "replaced\n");
    EXPECT_TRUE(fs::exists(staging));
  }
  EXPECT_FALSE(fs::exists(staging));
  const DatasetManifest kept = read_manifest(dir.string());
  EXPECT_EQ(kept.split("train").records, 30u);
  EXPECT_NO_THROW(verify_dataset(kept, /*hashes=*/true));

  write_keyed_dataset(dir, 6, 4);
  EXPECT_FALSE(fs::exists(dir / "train" / "shard_00002.bin"));
  EXPECT_FALSE(fs::exists(staging));
  EXPECT_EQ(read_manifest(dir.string()).split("train").records, 6u);
  EXPECT_NO_THROW(verify_dataset(read_manifest(dir.string()), /*hashes=*/true));
}

// Leftovers of a killed writer: its staging copy is deleted, and an old dataset that a crash between the two
// renames of the fallback swap left only as .<dir>.vimo-old is put back before anything else.
TEST(DatasetWriter, CleansUpAfterAKilledWriter) {
  const fs::path root = test_dir(), dir = root / "data";
  write_keyed_dataset(dir, 10, 4);
  fs::create_directories(root / ".data.vimo-tmp" / "train");
  std::ofstream(root / ".data.vimo-tmp" / "train" / "shard_00000.bin.tmp") << "half a shard";
  fs::rename(dir, root / ".data.vimo-old");
  {
    DatasetWriter writer(dir.string(), "keyed");
    writer.append("train", keyed_record(0));
  }
  EXPECT_FALSE(fs::exists(root / ".data.vimo-tmp"));
  EXPECT_FALSE(fs::exists(root / ".data.vimo-old"));
  EXPECT_EQ(read_manifest(dir.string()).split("train").records, 10u);
  EXPECT_NO_THROW(verify_dataset(read_manifest(dir.string()), /*hashes=*/true));
  // A .vimo-old beside its directory is the rest of an old dataset whose deletion was cut: it goes.
  fs::create_directories(root / ".data.vimo-old" / "train");
  write_keyed_dataset(dir, 3, 4);
  EXPECT_FALSE(fs::exists(root / ".data.vimo-old"));
  EXPECT_EQ(read_manifest(dir.string()).split("train").records, 3u);
}

// finish() replaces the whole directory, so a writer refuses one holding anything but a dataset, up front.
TEST(DatasetWriter, RefusesADirectoryHoldingMoreThanADataset) {
  const fs::path root = test_dir();
  fs::create_directories(root / "mine");
  std::ofstream(root / "mine" / "thesis.tex") << "years of work";
  expect_error([&] { DatasetWriter((root / "mine").string(), "keyed"); },
               {"mine", "no manifest.json", "not a vimo dataset", "HINT"});
  write_keyed_dataset(root / "data", 5, 4);
  std::ofstream(root / "data" / "README") << "notes";
  expect_error([&] { DatasetWriter((root / "data").string(), "keyed"); },
               {(root / "data" / "README").string(), "does not list", "HINT"});
  EXPECT_TRUE(fs::exists(root / "mine" / "thesis.tex"));
  fs::remove(root / "data" / "README");
  fs::create_directories(root / "empty");
  write_keyed_dataset(root / "empty", 5, 4);  // an empty directory, and a dataset with only its own files
  write_keyed_dataset(root / "data", 7, 4);
  EXPECT_EQ(read_manifest((root / "data").string()).split("train").records, 7u);
}

// A mount point (an empty mounted volume is a common output directory in containers) cannot be swapped for
// the finished dataset: the writer refuses it before writing anything, where the swap used to fail after the
// whole import had been written into the parent's filesystem. Needs the right to mount a tmpfs (root).
TEST(DatasetWriter, RefusesAMountPointBeforeWriting) {
  const fs::path root = test_dir();
  fs::create_directories(root / "volume");
  if (::mount("tmpfs", (root / "volume").c_str(), "tmpfs", 0, "size=4m") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here (" << std::strerror(errno) << "): needs root";
  }
  std::string error;
  try {
    DatasetWriter((root / "volume").string(), "keyed");
  } catch (const std::runtime_error& e) {
    error = e.what();
  }
  EXPECT_FALSE(fs::exists(root / ".volume.vimo-tmp"));
  ::umount((root / "volume").c_str());
  EXPECT_NE(error.find("is a mount point"), std::string::npos) << error;
  EXPECT_NE(error.find("HINT: write into a directory inside it"), std::string::npos) << error;
}

TEST(Manifest, VerifyFindsChangedMissingAndMiscountedFiles) {
  const fs::path dir = test_dir();
  write_keyed_dataset(dir, 20, 6);
  const std::string shard = (dir / "train" / "shard_00001.bin").string();
  {  // Same size, one byte changed: only the hash can tell.
    std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(20);
    f.put('\x7f');
  }
  EXPECT_NO_THROW(verify_dataset(read_manifest(dir.string()), false));
  expect_error([&] { verify_dataset(read_manifest(dir.string()), true); }, {shard, "xxh3", "corrupt"});
  fs::remove(dir / "notes.txt");
  write_keyed_dataset(dir, 20, 6);
  fs::remove(dir / "notes.txt");
  expect_error([&] { verify_dataset(read_manifest(dir.string()), false); }, {"notes.txt", "incomplete"});

  // A manifest whose counts disagree names the key path.
  write_keyed_dataset(dir, 20, 6);
  nlohmann::json json = nlohmann::json::parse(std::ifstream(dir / "manifest.json"));
  json["splits"]["train"]["shards"][2]["records"] = 5;
  std::ofstream(dir / "manifest.json") << json.dump();
  expect_error([&] { read_manifest(dir.string()); }, {"manifest.json", "splits.train.records", "20", "19"});
  json["splits"]["train"]["records"] = 19;
  std::ofstream(dir / "manifest.json") << json.dump();
  expect_error([&] { verify_dataset(read_manifest(dir.string()), false); },
               {"shard_00002.bin", "6 records", "5"});
  // A count that is negative or fractional is refused, not converted (-1 would become 2^64 - 1).
  for (const nlohmann::json& bad : {nlohmann::json(-1), nlohmann::json(3.5)}) {
    nlohmann::json edited = json;
    edited["splits"]["train"]["shards"][1]["records"] = bad;
    std::ofstream(dir / "manifest.json") << edited.dump();
    expect_error([&] { read_manifest(dir.string()); },
                 {"splits.train.shards[1].records", "is " + bad.dump(), "non-negative integer"});
  }
  json["splits"]["train"]["shards"][0].erase("xxh3");
  std::ofstream(dir / "manifest.json") << json.dump();
  expect_error([&] { read_manifest(dir.string()); }, {"splits.train.shards[0].xxh3", "missing"});
}

// `vimo data pack` with a shard size limit (--max-shard-mb): a shard closes at the first record that takes
// it to the limit, so every shard's records but its last start before the limit and every shard but a
// split's last reaches it (read from the files' own indexes); and the records round-trip, in order.
TEST(Pack, ShardsCloseAtTheSizeLimitAndRecordsRoundTrip) {
  std::mt19937_64 rng(vimo::testing::fresh_seed());
  const fs::path dir = test_dir();
  DatasetWriterOptions source_options;
  source_options.max_shard_records = 50;
  DatasetWriter source((dir / "source").string(), "keyed", source_options);
  std::map<std::string, std::vector<int64_t>> keys;  // per split, in order
  for (int64_t k = 0; k < 200; ++k) {
    const std::string split = rng() % 4 == 0 ? "test" : "train";
    source.append(split, keyed_record(k));
    keys[split].push_back(k);
  }
  source.add_file("notes.txt", "packed\n");
  source.finish();
  for (const Compression compression : {Compression::None, Compression::Zstd}) {
    DatasetWriterOptions options;
    options.max_shard_bytes = 400 + rng() % 800;  // a few records of 81 to 117 encoded bytes each
    options.compression = compression;
    const fs::path out = dir / (compression == Compression::None ? "plain" : "zstd");
    const PackReport report = repack_dataset((dir / "source").string(), out.string(), options);
    EXPECT_EQ(report.records, 200u);
    const DatasetManifest packed = read_manifest(out.string());
    EXPECT_NO_THROW(verify_dataset(packed, /*hashes=*/true));
    EXPECT_EQ(packed.files.count("notes.txt"), 1u);
    uint64_t shards = 0;
    for (const auto& [name, split] : packed.splits) {
      SCOPED_TRACE(name + " with a limit of " + std::to_string(options.max_shard_bytes));
      std::vector<int64_t> read;
      for (size_t s = 0; s < split.shards.size(); ++s) {
        const std::string path = packed.shard_path(name, s);
        const ShardReader reader(path);
        for (uint64_t i = 0; i < reader.size(); ++i) {
          const Record record = reader.read_record(i);
          const int64_t key = record.get("key").int64s().at(0);
          const Record expected = keyed_record(key);
          EXPECT_EQ(record.get("values").shape, expected.get("values").shape);
          EXPECT_EQ(record.get("values").floats(), expected.get("values").floats());
          read.push_back(key);
        }
        // The index and footer follow the last record: the footer's index offset is where the records end.
        const uint64_t records_end = fs::file_size(path) - 24 * reader.size() - 24;
        EXPECT_LT(indexed_record_offset(path, reader.size() - 1), options.max_shard_bytes) << path;
        if (s + 1 < split.shards.size()) {
          EXPECT_GE(records_end, options.max_shard_bytes) << path;
        }
      }
      EXPECT_EQ(read, keys.at(name));
      shards += split.shards.size();
    }
    EXPECT_GT(shards, 4u);  // the limit, not the source's 50 records per shard, cut them
    EXPECT_EQ(report.shards_out, shards);
  }
}

// An extra file damaged after its dataset was written (same size, one byte flipped: the pre-check compares
// sizes only) is refused, naming it and both hashes, instead of being copied with a fresh hash that verifies.
TEST(Pack, ADamagedExtraFileIsRefusedNotRehashed) {
  const fs::path dir = test_dir();
  DatasetWriter source((dir / "source").string(), "keyed");
  for (int64_t k = 0; k < 5; ++k) source.append("train", keyed_record(k));
  source.add_file("vocab.txt", "walk\nrun\njump\n");
  source.finish();
  const std::string listed = read_manifest((dir / "source").string()).files.at("vocab.txt").xxh3;
  repack_dataset((dir / "source").string(), (dir / "out").string(), {});
  std::ofstream(dir / "source" / "vocab.txt", std::ios::binary | std::ios::trunc) << "walk\nrun\njumq\n";
  expect_error([&] { repack_dataset((dir / "source").string(), (dir / "fresh").string(), {}); },
               {"vocab.txt", "holds 14 bytes with xxh3", "lists 14 bytes with xxh3 " + listed, "damaged"});
  EXPECT_FALSE(fs::exists(dir / "fresh"));
  // A pack that fails leaves the dataset an earlier pack wrote where it was, whole (Note [Replacing a dataset
  // directory]).
  expect_error([&] { repack_dataset((dir / "source").string(), (dir / "out").string(), {}); }, {"damaged"});
  EXPECT_NO_THROW(verify_dataset(read_manifest((dir / "out").string()), /*hashes=*/true));
}

// ---------------------------------------------------------------------------------------------------------
// Collation

TEST(Collate, PadsTheFirstExtentAndChecksTheRest) {
  std::vector<Record> records = {keyed_record(0), keyed_record(3), keyed_record(5)};  // lengths 1, 4, 2
  const CollatedBatch b = collate(records, {0, 3, 5}, {"r0", "r1", "r2"});
  EXPECT_EQ(b.field("values").sizes().vec(), (std::vector<int64_t>{3, 4, 3}));
  EXPECT_TRUE(b.lengths.at("values").equal(at::tensor({1, 4, 2}, at::kLong)));
  EXPECT_TRUE(b.mask("values")[2].equal(at::tensor({1, 1, 0, 0}, at::kLong).to(at::kBool)));
  EXPECT_TRUE(b.keys.equal(at::tensor({0, 3, 5}, at::kLong)));
  records[2].fields[1] = Field::from_floats("values", {2, 2}, {1, 2, 3, 4});
  expect_error(
      [&] {
        collate(records, {0, 3, 5}, {"r0", "r1", "r2"});
      },
      {"r2: field 'values' is float32 [2, 2], expected float32 [*, 3] (the batch's first record, r0)"});
  records[2].fields.pop_back();
  expect_error([&] { collate(records, {0, 3, 5}, {"r0", "r1", "r2"}); }, {"r2", "missing field 'values'"});
  // Bad data, which the loader may skip.
  EXPECT_THROW(collate(records, {0, 3, 5}, {"r0", "r1", "r2"}), CorruptDataError);
  expect_error([&] { b.field("nope"); }, {"'nope'", "key", "values"});
  // The loader's origins (file and record), formatted only for the error.
  Collator collator(2, nullptr);
  collator.add(RecordView::of(records[0]), 0, {"/d/shard_00001.bin", 4});
  expect_error(
      [&] {
        collator.add(RecordView::of(records[2]), 5, {"/d/shard_00002.bin", 17});
      },
      {"shard /d/shard_00002.bin: record 17", "missing field 'values'",
       "shard /d/shard_00001.bin: record 4"});
}

// Views and pooled memory give the same batch as owning records and fresh memory, padding included, even
// when the pooled block was left full of garbage by the previous batch.
TEST(Collate, ViewsIntoPooledMemoryEqualRecordsIntoFreshMemory) {
  const std::vector<Record> records = {keyed_record(2), keyed_record(7), keyed_record(4)};
  const std::vector<int64_t> keys = {2, 7, 4};
  const std::vector<std::string> where = {"r0", "r1", "r2"};
  const CollatedBatch fresh = collate(records, keys, where);
  std::vector<RecordView> views;
  for (const Record& r : records) views.push_back(RecordView::of(r));
  TensorPool pool(size_t{16} << 20);
  for (int round = 0; round < 3; ++round) {
    CollatedBatch pooled = collate(views, keys, where, &pool);
    for (const auto& [name, tensor] : fresh.fields) {
      EXPECT_TRUE(pooled.field(name).equal(tensor)) << name << " round " << round;
      if (fresh.lengths.count(name)) {
        EXPECT_TRUE(pooled.lengths.at(name).equal(fresh.lengths.at(name)));
      }
    }
    for (auto& [name, tensor] : pooled.fields) {
      if (tensor.is_floating_point())
        tensor.fill_(std::numeric_limits<float>::quiet_NaN());
      else
        tensor.fill_(99);  // garbage the next round's padding must not show
    }
  }
  EXPECT_GE(pool.reused(), 2 * static_cast<int64_t>(fresh.fields.size()));
}

TEST(TensorPool, ReusesFreedMemoryWithinItsLimitAndOutlivesItself) {
  at::Tensor survivor;
  {
    TensorPool pool(size_t{1} << 20);  // 1 MiB
    void* first = nullptr;
    {
      const at::Tensor a = pool.empty({100, 50}, at::kFloat);  // 20000 bytes: one 64 KiB block
      EXPECT_TRUE(a.is_contiguous());
      EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data_ptr()) % 64, 0u);
      first = a.data_ptr();
    }
    EXPECT_EQ(pool.cached_bytes(), size_t{64} << 10);
    const at::Tensor b = pool.empty({10000}, at::kByte);  // also rounds to 64 KiB: the same block
    EXPECT_EQ(b.data_ptr(), first);
    EXPECT_EQ(pool.reused(), 1);
    EXPECT_EQ(pool.cached_bytes(), 0u);
    {
      const at::Tensor big = pool.empty({2 << 20}, at::kByte);  // 2 MiB: over the limit when freed
    }
    EXPECT_EQ(pool.cached_bytes(), 0u);
    survivor = pool.empty({3, 3}, at::kDouble);
    survivor.fill_(1.5);
  }
  EXPECT_EQ(survivor.sum().item<double>(), 13.5);  // still valid after the pool is gone
  survivor = at::Tensor();                         // and frees its block without the pool
}

TEST(TensorPool, ThreadsAllocatingAndFreeingSeeOnlyTheirOwnValues) {
  TensorPool pool(size_t{8} << 20);
  std::vector<std::thread> threads;
  std::atomic<int> wrong = 0;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        at::Tensor x = pool.empty({1 + (i % 3) * 5000}, at::kInt);
        x.fill_(t * 1000 + i);
        std::this_thread::yield();
        if (!x.eq(t * 1000 + i).all().item<bool>()) ++wrong;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(pool.reused(), 0);
}

// ---------------------------------------------------------------------------------------------------------
// SampleOrder

// The loader state of a checkpoint (loader.json): it round-trips, and a bad one is an error naming the file
// and the key (a bare nlohmann exception named neither).
TEST(SamplerStateJson, RoundTripsAndNamesTheFileAndKeyOfABadOne) {
  const SamplerState state{std::numeric_limits<uint64_t>::max() - 3, 7, 12345};
  std::string order = "(none)";
  const SamplerState back =
      parse_sampler_state_json(sampler_state_json(state, "abc123"), "ckpt/loader.json", &order);
  EXPECT_EQ(back.seed, state.seed);
  EXPECT_EQ(back.epoch, state.epoch);
  EXPECT_EQ(back.samples_consumed, state.samples_consumed);
  EXPECT_EQ(order, "abc123");
  parse_sampler_state_json(R"({"seed": 1, "epoch": 0, "samples_consumed": 0})", "old.json", &order);
  EXPECT_EQ(order, "") << "a checkpoint without the fingerprint";
  for (const auto& [text, expected] : std::vector<std::pair<std::string, std::string>>{
           {"{", "ckpt/loader.json: not a JSON object of the loader state"},
           {"[1, 2]", "ckpt/loader.json: not a JSON object of the loader state"},
           {R"({"seed": 1, "epoch": 2})", "ckpt/loader.json: the key 'samples_consumed' is missing"},
           {R"({"seed": 1, "epoch": "2", "samples_consumed": 0})",
            "ckpt/loader.json: 'epoch' must be a non-negative integer, found \"2\""},
           {R"({"seed": 1, "epoch": 2, "samples_consumed": -5})",
            "ckpt/loader.json: 'samples_consumed' must be a non-negative integer, found -5"},
           {R"({"seed": 1.5, "epoch": 2, "samples_consumed": 0})",
            "ckpt/loader.json: 'seed' must be a non-negative integer, found 1.5"},
           {R"({"seed": 1, "epoch": 2, "samples_consumed": 0, "order": 7})",
            "ckpt/loader.json: 'order' must be a string, found 7"},
       }) {
    std::string error;
    try {
      parse_sampler_state_json(text, "ckpt/loader.json", &order);
    } catch (const std::runtime_error& e) {
      error = e.what();
    }
    EXPECT_EQ(error.substr(0, expected.size()), expected) << "for " << text << ": " << error;
  }
}

TEST(SampleOrder, EachEpochIsAPermutationThatDependsOnlyOnSeedAndEpoch) {
  const uint64_t seed = vimo::testing::fresh_seed();
  const std::vector<uint64_t> shards = {5, 0, 9, 3, 7};  // an empty shard too
  const SampleOrder a(shards, seed, 4), b(shards, seed, 4), c(shards, seed + 1, 4);
  std::vector<std::vector<int64_t>> epochs;
  for (int64_t e = 0; e < 3; ++e) {
    std::vector<int64_t> keys, keys_b, keys_c;
    for (int64_t p = 0; p < a.size(); ++p) {
      keys.push_back(a.at(e, p).key);
      keys_c.push_back(c.at(e, p).key);
    }
    for (int64_t p = a.size() - 1; p >= 0; --p) keys_b.push_back(b.at(e, p).key);  // any access order
    std::reverse(keys_b.begin(), keys_b.end());
    EXPECT_EQ(keys, keys_b);
    EXPECT_NE(keys, keys_c);
    std::vector<int64_t> sorted = keys;
    std::sort(sorted.begin(), sorted.end());
    for (int64_t k = 0; k < a.size(); ++k) ASSERT_EQ(sorted[static_cast<size_t>(k)], k);
    epochs.push_back(keys);
  }
  EXPECT_NE(epochs[0], epochs[1]);
  // (shard, record) and key agree with the manifest order.
  const SampleRef ref = a.at(1, 7);
  const int64_t starts[] = {0, 5, 5, 14, 17};
  EXPECT_EQ(ref.key, starts[ref.shard] + static_cast<int64_t>(ref.record));
}

TEST(SampleOrder, RangeIsAtForEachPositionAndWrapsPastTheEpoch) {
  const SampleOrder order({5, 0, 9, 3, 7}, vimo::testing::fresh_seed(), 4);
  for (const int64_t begin : {int64_t{0}, int64_t{3}, int64_t{21}}) {
    const std::vector<SampleRef> refs = order.range(1, begin, 10);  // 21 + 10 wraps past 24
    ASSERT_EQ(refs.size(), 10u);
    for (int64_t i = 0; i < 10; ++i) {
      const SampleRef want = order.at(1, (begin + i) % order.size());
      const SampleRef& got = refs[static_cast<size_t>(i)];
      EXPECT_EQ(got.key, want.key) << "position " << begin + i;
      EXPECT_EQ(got.shard, want.shard);
      EXPECT_EQ(got.record, want.record);
    }
  }
  EXPECT_TRUE(order.range(0, 5, 0).empty());
  expect_error([&] { (void)order.range(0, -1, 2); }, {">= 0", "begin -1"});
}

TEST(SampleOrder, BlocksMixShardsAndUnshuffledOrderIsTheManifestOrder) {
  const std::vector<uint64_t> shards(8, 16);
  const SampleOrder plain(shards, 3, 32, /*shuffle=*/false);
  for (int64_t p = 0; p < plain.size(); ++p) ASSERT_EQ(plain.at(0, p).key, p);
  // With blocks of 32 over shards of 16, a block's first 8 samples come from both of its shards (with
  // overwhelming probability: 2 * (1/2)^8 that they do not), unlike a shard-by-shard order.
  const SampleOrder mixed(shards, vimo::testing::fresh_seed(), 32);
  std::set<uint32_t> first;
  for (int64_t p = 0; p < 8; ++p) first.insert(mixed.at(0, p).shard);
  EXPECT_EQ(first.size(), 2u);
  // With blocks of 1, each shard's records stay in order and shards stay contiguous.
  const SampleOrder by_shard(shards, 5, 1);
  for (int64_t p = 0; p < by_shard.size(); ++p)
    ASSERT_EQ(by_shard.at(0, p).record, static_cast<uint64_t>(p % 16));
}

// ---------------------------------------------------------------------------------------------------------
// StreamingLoader

class LoaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = vimo::testing::seed_torch();
    dir_ = test_dir();
    write_keyed_dataset(dir_, 53, 6);  // 9 shards, the last with 5 records
  }
  uint64_t seed_ = 0;
  fs::path dir_;
};

TEST_F(LoaderTest, GlobalBatchesDoNotDependOnDpSizeOrWorkers) {
  const int64_t G = 12, steps = 10;  // 4 batches per epoch: crosses two epoch boundaries
  const auto one = read_global(dir_, G, 1, seed_, steps, nullptr, 0);
  EXPECT_EQ(read_global(dir_, G, 2, seed_, steps, nullptr), one);
  EXPECT_EQ(read_global(dir_, G, 4, seed_, steps, nullptr, 1), one);
  EXPECT_EQ(read_global(dir_, G, 3, seed_, steps, nullptr, 3), one);
  StreamingLoader loader(keyed_options(dir_, G, 0, 1, seed_));
  EXPECT_EQ(loader.batches_per_epoch(), 4);
  for (int64_t s = 0; s < steps; ++s)
    EXPECT_EQ(loader.global_keys(s / 4, s % 4), one[static_cast<size_t>(s)]);
  // Within an epoch no sample repeats; the next epoch has a new order.
  std::set<int64_t> epoch0;
  for (int s = 0; s < 4; ++s)
    epoch0.insert(one[static_cast<size_t>(s)].begin(), one[static_cast<size_t>(s)].end());
  EXPECT_EQ(epoch0.size(), 48u);
  EXPECT_NE(one[0], one[4]);
  EXPECT_NE(read_global(dir_, G, 1, seed_ + 1, 1, nullptr), std::vector<std::vector<int64_t>>{one[0]});
}

TEST_F(LoaderTest, ResumeTwiceOnOtherDpSizesGivesTheUninterruptedBatches) {
  const int64_t G = 8, steps = 17;  // 6 batches per epoch
  const auto straight = read_global(dir_, G, 2, seed_, steps, nullptr);
  SamplerState state;
  state.seed = seed_;
  auto part = read_global(dir_, G, 2, seed_, 5, &state);
  EXPECT_EQ(state.epoch, 0);
  EXPECT_EQ(state.samples_consumed, 40);
  const auto second = read_global(dir_, G, 4, seed_, 7, &state);  // resumed on 4 ranks, over the epoch end
  part.insert(part.end(), second.begin(), second.end());
  const auto third = read_global(dir_, G, 1, seed_, steps - 12, &state);  // and again on 1 rank
  part.insert(part.end(), third.begin(), third.end());
  EXPECT_EQ(part, straight);
  EXPECT_EQ(state.epoch, 2);
  EXPECT_EQ(state.samples_consumed, 5 * G);
}

TEST_F(LoaderTest, ResumeDropsPrefetchedBatches) {
  LoaderOptions o = keyed_options(dir_, 4, 0, 1, seed_);
  o.prefetch = 6;
  StreamingLoader loader(o);
  const std::vector<int64_t> first = checked_keys(loader.next());
  const SamplerState after_first = loader.state();
  for (int i = 0; i < 3; ++i) loader.next();
  loader.load_state(after_first);
  EXPECT_EQ(checked_keys(loader.next()), loader.global_keys(0, 1));
  EXPECT_NE(first, loader.global_keys(0, 1));
  SamplerState wrong = after_first;
  wrong.seed += 1;
  expect_error([&] { loader.load_state(wrong); }, {"seed", "differs"});
  wrong = after_first;
  wrong.samples_consumed = 3;
  expect_error([&] { loader.load_state(wrong); }, {"global batch", "4"});
}

TEST_F(LoaderTest, WithoutDropLastTheLastBatchWrapsToTheEpochStart) {
  LoaderOptions o = keyed_options(dir_, 20, 0, 1, seed_);
  o.drop_last = false;
  StreamingLoader loader(o);
  EXPECT_EQ(loader.batches_per_epoch(), 3);  // 53 samples: 20 + 20 + 13 (+ 7 from the start)
  std::vector<int64_t> keys;
  for (int i = 0; i < 3; ++i) {
    const std::vector<int64_t> k = checked_keys(loader.next());
    keys.insert(keys.end(), k.begin(), k.end());
  }
  ASSERT_EQ(keys.size(), 60u);
  EXPECT_EQ(std::vector<int64_t>(keys.begin() + 53, keys.end()),
            std::vector<int64_t>(keys.begin(), keys.begin() + 7));
  EXPECT_EQ(std::set<int64_t>(keys.begin(), keys.end()).size(), 53u);
  EXPECT_EQ(loader.state().epoch, 1);
}

// The fingerprint a checkpoint keeps names what the order depends on besides the seed (so that a resume
// with another setting is refused), and nothing else (so that a resume on another DP size is accepted).
TEST_F(LoaderTest, OrderFingerprintChangesWithWhatChangesTheOrderOnly) {
  const LoaderOptions base = keyed_options(dir_, 12, 0, 1, seed_);
  const std::string reference = StreamingLoader(base).order_fingerprint();
  LoaderOptions other_dp = keyed_options(dir_, 12, 1, 3, seed_);
  other_dp.workers = 0;
  EXPECT_EQ(StreamingLoader(other_dp).order_fingerprint(), reference);
  LoaderOptions padded = base;
  padded.drop_last = false;
  EXPECT_NE(StreamingLoader(padded).order_fingerprint(), reference);
  LoaderOptions blocks = base;
  blocks.shuffle_block = base.shuffle_block + 1;
  EXPECT_NE(StreamingLoader(blocks).order_fingerprint(), reference);
}

TEST_F(LoaderTest, EachRankReadsOnlyItsOwnRecords) {
  LoaderOptions o = keyed_options(dir_, 12, 1, 4, seed_);
  StreamingLoader loader(o);
  for (int i = 0; i < 3; ++i) loader.next();
  const LoaderStats stats = loader.stats();
  EXPECT_EQ(stats.batches, 3);
  // The three batches handed out plus at most `prefetch` read ahead, 3 records each.
  EXPECT_GE(stats.records, 9);
  EXPECT_LE(stats.records, 3 * (3 + o.prefetch));
}

TEST_F(LoaderTest, ConfigurationErrorsNameTheProblem) {
  expect_error([&] { StreamingLoader l(keyed_options(dir_, 10, 0, 4, seed_)); },
               {"global batch 10", "DP size 4"});
  expect_error([&] { StreamingLoader l(keyed_options(dir_, 64, 0, 1, seed_)); },
               {"global batch 64", "53 samples"});
  LoaderOptions o = keyed_options(dir_, 4, 0, 1, seed_);
  o.kind = "retrieval";
  expect_error([&] { StreamingLoader l(o); }, {"'keyed'", "expected 'retrieval'"});
  o = keyed_options(dir_, 4, 0, 1, seed_);
  o.split = "valid";
  expect_error([&] { StreamingLoader l(o); }, {"no split 'valid'", "train"});
}

// ---- Bad data ----

void flip_byte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  const char c = static_cast<char>(f.get());
  f.seekp(static_cast<std::streamoff>(offset));
  f.put(static_cast<char>(c ^ 0x5a));
}

// Reads a whole epoch with one rank and returns the keys read; throws what the loader throws.
std::vector<int64_t> read_epoch(const LoaderOptions& o, int64_t* skipped = nullptr) {
  StreamingLoader loader(o);
  std::vector<int64_t> keys;
  int64_t batch_skips = 0;
  for (int64_t s = 0; s < loader.batches_per_epoch(); ++s) {
    const LoaderBatch b = loader.next();
    keys.insert(keys.end(), b.keys.begin(), b.keys.end());
    batch_skips += b.corrupt_skipped;
  }
  // Batches read ahead into the next epoch also met the corrupt records; only handed-out ones count.
  EXPECT_EQ(loader.stats().corrupt_skipped, batch_skips);
  if (skipped) *skipped = batch_skips;
  return keys;
}

TEST_F(LoaderTest, CorruptRecordStopsByDefaultAndIsSkippedAndCountedOnRequest) {
  for (const Compression compression : {Compression::None, Compression::Zstd}) {
    write_keyed_dataset(dir_, 53, 6, compression);
    const std::string shard = (dir_ / "train" / "shard_00003.bin").string();
    const ShardReader reader(shard);
    const uint64_t record_offset = 16 + [&] {
      uint64_t offset = 0;
      for (uint64_t i = 0; i < 2; ++i) offset += reader.stored_size(i);
      return offset;
    }();  // record 2 of shard 3 = key 20
    flip_byte(shard, record_offset + reader.stored_size(2) / 2);
    LoaderOptions o = keyed_options(dir_, 53, 0, 1, seed_);
    expect_error([&] { read_epoch(o); },
                 {shard, "record 2", "offset " + std::to_string(record_offset), "checksum", "skip_corrupt"});
    o.skip_corrupt = true;
    int64_t skipped = 0;
    const std::vector<int64_t> keys = read_epoch(o, &skipped);
    EXPECT_EQ(skipped, 1);
    EXPECT_EQ(keys.size(), 52u);
    EXPECT_EQ(std::count(keys.begin(), keys.end(), 20), 0);
  }
}

// A record that lacks a field, or holds one with another dtype or shape, is bad data like a bad checksum: by
// default an error naming its file, record and offset; with skip_corrupt skipped and counted. It is measured
// against the split's first record, not its batch's: unshuffled in batches of 4, key 20 opens its batch, and
// it alone is skipped (Note [One schema per split] in data/loader.cpp).
TEST_F(LoaderTest, RecordsWithAMissingFieldOrAnotherDtypeOrShapeAreCorrupt) {
  struct Case {
    int64_t key;
    std::function<void(Record&)> change;
    std::string what;
  };
  const std::vector<Case> cases = {
      {20, [](Record& r) { r.fields.pop_back(); }, "missing field 'values', expected float32 [*, 3]"},
      {31,
       [](Record& r) {
         r.fields[1] = Field::from_bytes("values", DType::Float64, {4, 3}, std::vector<uint8_t>(96, 1));
       },
       "field 'values' is float64 [4, 3], expected float32 [*, 3]"},
      {45,
       [](Record& r) {
         r.fields[1] = Field::from_floats("values", {2, 2}, {1, 2, 3, 4});
       },
       "field 'values' is float32 [2, 2], expected float32 [*, 3]"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    write_keyed_dataset(dir_, 53, 6, Compression::None, [&](int64_t key, Record& r) {
      if (key == c.key) c.change(r);
    });
    const DatasetManifest manifest = read_manifest(dir_.string());
    const std::string shard = manifest.shard_path("train", static_cast<size_t>(c.key / 6));
    const auto record = static_cast<uint64_t>(c.key % 6);
    LoaderOptions o = keyed_options(dir_, 53, 0, 1, seed_);
    expect_error([&] { read_epoch(o); },
                 {"shard " + shard + ": record " + std::to_string(record) + " at offset " +
                      std::to_string(indexed_record_offset(shard, record)) + ": " + c.what +
                      " (the split's first record, shard " + manifest.shard_path("train", 0) +
                      ": record 0 at offset 16)",
                  "skip_corrupt"});
    o = keyed_options(dir_, 4, 0, 1, seed_);
    o.shuffle = false;
    o.skip_corrupt = true;
    std::vector<int64_t> expected(52);  // 13 batches of 4
    std::iota(expected.begin(), expected.end(), 0);
    expected.erase(expected.begin() + c.key);
    int64_t skipped = 0;
    EXPECT_EQ(read_epoch(o, &skipped), expected);
    EXPECT_EQ(skipped, 1);
  }
}

// Without a consumer's schema the split's first record sets it; when that record is corrupt, the next one
// does, and with skip_corrupt the corrupt one is skipped and counted like any other.
TEST_F(LoaderTest, ACorruptFirstRecordLeavesTheSchemaToTheNext) {
  const std::string shard = read_manifest(dir_.string()).shard_path("train", 0);
  flip_byte(shard, 16 + 10);  // inside record 0
  LoaderOptions o = keyed_options(dir_, 53, 0, 1, seed_);
  expect_error([&] { read_epoch(o); }, {shard + ": record 0 at offset 16", "checksum", "skip_corrupt"});
  o.skip_corrupt = true;
  int64_t skipped = 0;
  std::vector<int64_t> keys = read_epoch(o, &skipped);
  std::sort(keys.begin(), keys.end());
  std::vector<int64_t> expected(52);
  std::iota(expected.begin(), expected.end(), 1);
  EXPECT_EQ(keys, expected);
  EXPECT_EQ(skipped, 1);
}

// A consumer's schema: only its fields are collated, and every record is checked against it. Here it wants
// float64 values, which no record has: the first record read is named, and with skip_corrupt every record is
// skipped, each batch keeping the schema's fields with no rows.
TEST_F(LoaderTest, AConsumersSchemaIsCheckedForEveryRecordAndOnlyItsFieldsAreCollated) {
  LoaderOptions o = keyed_options(dir_, 4, 0, 1, seed_);
  o.schema = {{{"key", DType::Int64, {1}}}, "the test's schema"};
  {
    StreamingLoader loader(o);
    const LoaderBatch batch = loader.next();
    EXPECT_EQ(batch.keys, loader.global_keys(0, 0));
    EXPECT_TRUE(batch.tensors.field("key").select(1, 0).equal(at::tensor(batch.keys, at::kLong)));
    EXPECT_EQ(batch.tensors.fields.size(), 1u);
  }
  o.schema.fields.push_back({"values", DType::Float64, {kAnyExtent, 3}});
  StreamingLoader strict(o);
  const int64_t first = strict.global_keys(0, 0).front();
  const std::string shard = read_manifest(dir_.string()).shard_path("train", static_cast<size_t>(first / 6));
  expect_error([&] { strict.next(); },
               {"shard " + shard + ": record " + std::to_string(first % 6) + " at offset " +
                    std::to_string(indexed_record_offset(shard, static_cast<uint64_t>(first % 6))) +
                    ": field 'values' is float32 [" + std::to_string(1 + first % 4) +
                    ", 3], expected float64 [*, 3] (the test's schema)",
                "skip_corrupt"});
  o.skip_corrupt = true;
  StreamingLoader skipping(o);
  for (int step = 0; step < 3; ++step) {
    const LoaderBatch batch = skipping.next();
    EXPECT_EQ(batch.corrupt_skipped, 4);
    EXPECT_TRUE(batch.keys.empty());
    EXPECT_EQ(batch.tensors.field("key").sizes().vec(), (std::vector<int64_t>{0, 1}));
    EXPECT_EQ(batch.tensors.field("values").sizes().vec(), (std::vector<int64_t>{0, 0, 3}));
    EXPECT_EQ(batch.tensors.lengths.at("values").numel(), 0);
  }
  EXPECT_EQ(skipping.stats().corrupt_skipped, 12);
}

// With data.verify = first_read a loader keeps its shards open across epochs and hashes each mapped record on
// its first read only (Note [Verifying a mapped record once] in data/shard_reader.cpp): a record changed in
// place after the first epoch is still caught in the second, because the loader looks at each shard's times
// once per batch. The shard's time is set an hour back first, so the plain write in place surely moves it.
TEST_F(LoaderTest, WithFirstReadARecordChangedInPlaceBetweenEpochsIsCaught) {
  LoaderOptions o = keyed_options(dir_, 53, 0, 1, seed_);
  o.workers = 0;  // nothing read ahead: the second epoch is read after the change
  o.verify = Verification::FirstRead;
  const std::string shard = (dir_ / "train" / "shard_00005.bin").string();
  fs::last_write_time(shard, fs::last_write_time(shard) - std::chrono::hours(1));
  StreamingLoader loader(o);
  for (int64_t s = 0; s < loader.batches_per_epoch(); ++s) ASSERT_NO_THROW(loader.next());
  const ShardReader reader(shard);
  const uint64_t record_offset = 16 + reader.stored_size(0);  // record 1 of shard 5
  flip_byte(shard, record_offset + reader.stored_size(1) / 2);
  expect_error(
      [&] {
        for (int64_t s = 0; s < loader.batches_per_epoch(); ++s) loader.next();
      },
      {shard, "record 1", "offset " + std::to_string(record_offset), "checksum"});
}

TEST_F(LoaderTest, TruncatedShardAndManifestMismatchAreNamed) {
  const std::string shard = (dir_ / "train" / "shard_00004.bin").string();
  fs::resize_file(shard, fs::file_size(shard) - 30);
  LoaderOptions o = keyed_options(dir_, 53, 0, 1, seed_);
  expect_error([&] { read_epoch(o); }, {shard, "truncated"});
  o.skip_corrupt = true;  // a truncated shard's records are all skipped and counted
  int64_t skipped = 0;
  EXPECT_EQ(read_epoch(o, &skipped).size(), 47u);
  EXPECT_EQ(skipped, 6);

  // A shard replaced by another valid shard of a different size: the manifest no longer matches.
  write_keyed_dataset(dir_, 53, 6);
  fs::copy_file(dir_ / "train" / "shard_00008.bin", dir_ / "train" / "shard_00002.bin",
                fs::copy_options::overwrite_existing);
  o.skip_corrupt = false;
  expect_error([&] { read_epoch(o); }, {"shard_00002.bin", "manifest.json", "5 records", "6 records"});
}

TEST_F(LoaderTest, MissingShardIsAnErrorEvenWhenSkipping) {
  fs::remove(dir_ / "train" / "shard_00005.bin");
  LoaderOptions o = keyed_options(dir_, 4, 0, 1, seed_);
  o.skip_corrupt = true;
  expect_error([&] { StreamingLoader l(o); }, {"shard_00005.bin", "missing", "incomplete"});
}

TEST_F(LoaderTest, WrongMagicAndVersionAreNamed) {
  const std::string shard = (dir_ / "train" / "shard_00000.bin").string();
  flip_byte(shard, 9);  // inside the version
  LoaderOptions o = keyed_options(dir_, 53, 0, 1, seed_);
  expect_error([&] { read_epoch(o); }, {shard, "offset 8", "unsupported version"});
  flip_byte(shard, 9);
  flip_byte(shard, 2);
  expect_error([&] { read_epoch(o); }, {shard, "offset 0", "bad magic"});
}

}  // namespace
}  // namespace vimo::data
