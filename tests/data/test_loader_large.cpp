// Tests that the streaming loader reads records past 4 GiB into a shard: a dataset whose one shard is sparse,
// its first record a field of 4 GiB + 1 MiB of zeros left as a hole, followed by real keyed records. Shard
// and manifest are built by hand from data/FORMAT.md (the test needs no disk space and writes no 4 GiB). The
// loader must never read the hole's record (its checksum alone would read 4 GiB): the tests start at the next
// batch, as a resume does, with batches of one record and no read-ahead.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "data/loader.h"
#include "data/manifest.h"
#include "data/shard.h"
#include "tests/data/shard_file.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;
using vimo::testing::expect_error;

constexpr uint64_t kHoleBytes = (uint64_t{4} << 30) + (uint64_t{1} << 20);
constexpr uint64_t kHeaderBytes = 16, kFooterBytes = 24;

template <typename T>
void put(std::vector<uint8_t>& out, T value) {
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  out.insert(out.end(), p, p + sizeof(T));
}

std::vector<uint8_t> file_bytes(const std::string& path) {
  std::vector<uint8_t> bytes(fs::file_size(path));
  std::ifstream(path, std::ios::binary)
      .read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return bytes;
}

// A keyed record with random contents: "key" Int64 [1] and "values" Float32 [len, 3].
Record random_keyed_record(std::mt19937_64& rng, int64_t key) {
  std::vector<float> values(static_cast<size_t>(3 * (1 + rng() % 8)));
  for (float& v : values) v = std::uniform_real_distribution<float>(-1, 1)(rng);
  Record record;
  record.fields.push_back(Field::from_int64s("key", {1}, {key}));
  record.fields.push_back(Field::from_floats("values", {static_cast<int64_t>(values.size() / 3), 3}, values));
  return record;
}

struct SparseShard {
  std::vector<uint64_t> tail_offsets;  // of the records after the hole, all past 4 GiB
  uint64_t bytes = 0;
  std::string xxh3;  // of the whole file, as the manifest lists it
};

// header | record 0: one uint8 field 'pad' of kHoleBytes zeros, left a hole | `tail` | index | footer.
// The tail's encodings, checksums and sizes come from a small shard of our writer (`scratch`): its bytes
// between the header and the index are the records back to back.
SparseShard write_sparse_shard(const std::string& path, const std::string& scratch,
                               const std::vector<Record>& tail) {
  {
    ShardWriter writer(scratch);
    for (const Record& record : tail) writer.append(record);
    writer.finish();
  }
  const std::vector<uint8_t> small = file_bytes(scratch);
  const uint64_t count = tail.size();
  const uint64_t small_index = small.size() - kFooterBytes - 24 * count;
  std::vector<uint64_t> small_entries(3 * count);  // offsets, checksums, sizes
  std::memcpy(small_entries.data(), small.data() + small_index, 24 * count);

  std::vector<uint8_t> pad_head;  // FORMAT.md's encoding of the 'pad' field, without its bytes
  put<uint32_t>(pad_head, 1);
  put<uint16_t>(pad_head, 3);
  pad_head.insert(pad_head.end(), {'p', 'a', 'd'});
  put<uint8_t>(pad_head, static_cast<uint8_t>(DType::UInt8));
  put<uint8_t>(pad_head, 1);
  put<int64_t>(pad_head, static_cast<int64_t>(kHoleBytes));
  put<uint64_t>(pad_head, kHoleBytes);
  const uint64_t tail_start = kHeaderBytes + pad_head.size() + kHoleBytes;

  SparseShard shard;
  for (uint64_t i = 0; i < count; ++i)
    shard.tail_offsets.push_back(tail_start + small_entries[i] - kHeaderBytes);
  // xxh3 of the pad record's stored bytes and of the whole file, both over the hole's zeros once.
  XXH3_state_t* record_hash = XXH3_createState();
  XXH3_state_t* file_hash = XXH3_createState();
  XXH3_64bits_reset(record_hash);
  XXH3_64bits_reset(file_hash);
  XXH3_64bits_update(record_hash, pad_head.data(), pad_head.size());
  XXH3_64bits_update(file_hash, small.data(), kHeaderBytes);
  XXH3_64bits_update(file_hash, pad_head.data(), pad_head.size());
  const std::vector<uint8_t> zeros(uint64_t{1} << 20, 0);
  for (uint64_t left = kHoleBytes; left > 0; left -= zeros.size()) {
    XXH3_64bits_update(record_hash, zeros.data(), zeros.size());
    XXH3_64bits_update(file_hash, zeros.data(), zeros.size());
  }
  std::vector<uint8_t> rest(small.begin() + kHeaderBytes, small.begin() + small_index);  // the tail records
  put<uint64_t>(rest, kHeaderBytes);
  for (const uint64_t offset : shard.tail_offsets) put<uint64_t>(rest, offset);
  put<uint64_t>(rest, XXH3_64bits_digest(record_hash));
  for (uint64_t i = 0; i < count; ++i) put<uint64_t>(rest, small_entries[count + i]);
  put<uint64_t>(rest, pad_head.size() + kHoleBytes);
  for (uint64_t i = 0; i < count; ++i) put<uint64_t>(rest, small_entries[2 * count + i]);
  put<uint64_t>(rest, count + 1);
  put<uint64_t>(rest, tail_start + small_index - kHeaderBytes);  // the index offset
  rest.insert(rest.end(), small.end() - 8, small.end());         // the footer's magic
  XXH3_64bits_update(file_hash, rest.data(), rest.size());
  shard.xxh3 = fmt::format("{:016x}", XXH3_64bits_digest(file_hash));
  XXH3_freeState(record_hash);
  XXH3_freeState(file_hash);

  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(small.data()), kHeaderBytes);  // the same header
  out.write(reinterpret_cast<const char*>(pad_head.data()), static_cast<std::streamsize>(pad_head.size()));
  out.seekp(static_cast<std::streamoff>(tail_start));  // leaves the pad's bytes a hole
  out.write(reinterpret_cast<const char*>(rest.data()), static_cast<std::streamsize>(rest.size()));
  out.close();
  EXPECT_TRUE(out.good()) << "cannot write " << path;
  shard.bytes = tail_start + rest.size();
  return shard;
}

// A "keyed" dataset at `dir` whose train split is that one sparse shard, with its manifest per FORMAT.md.
struct LargeDataset {
  fs::path dir;
  std::string shard;
  std::vector<Record> tail;  // records 1.. of the shard, keys 1..
  SparseShard layout;
};

LargeDataset write_large_dataset(const fs::path& dir, std::mt19937_64& rng) {
  LargeDataset data{dir, (dir / "train" / "shard_00000.bin").string(), {}, {}};
  fs::create_directories(dir / "train");
  for (int64_t key = 1; key <= 5; ++key) data.tail.push_back(random_keyed_record(rng, key));
  data.layout = write_sparse_shard(data.shard, (dir / "small.bin").string(), data.tail);
  const uint64_t records = data.tail.size() + 1;
  const nlohmann::json manifest = {{"format", "vimo-dataset"},
                                   {"version", 1},
                                   {"kind", "keyed"},
                                   {"shard_version", 2},
                                   {"splits",
                                    {{"train",
                                      {{"records", records},
                                       {"shards",
                                        {{{"file", "shard_00000.bin"},
                                          {"records", records},
                                          {"bytes", data.layout.bytes},
                                          {"xxh3", data.layout.xxh3}}}}}}}},
                                   {"files", nlohmann::json::object()},
                                   {"metadata", nlohmann::json::object()}};
  std::ofstream(dir / "manifest.json") << manifest.dump(2);
  return data;
}

// Batches of one record in manifest order, read on the calling thread only when asked for (no read-ahead
// into the next epoch, whose first record is the hole), starting after the hole's record.
LoaderOptions after_the_hole(const fs::path& dir) {
  LoaderOptions o;
  o.dir = dir.string();
  o.kind = "keyed";
  o.global_batch = 1;
  o.shuffle = false;
  o.workers = 0;
  // The consumer's fields: without them the loader would take the split's first record's, the hole's.
  o.schema = {{{"key", DType::Int64, {1}}, {"values", DType::Float32, {kAnyExtent, 3}}}, "the keyed schema"};
  return o;
}

TEST(LoaderOver4GiB, ReadsTheRecordsPastFourGiBExactly) {
  std::mt19937_64 rng(vimo::testing::seed_torch());
  const fs::path dir = vimo::testing::fresh_test_dir("loader_large", "read");
  const LargeDataset data = write_large_dataset(dir, rng);
  ASSERT_GT(fs::file_size(data.shard), uint64_t{4} << 30);
  EXPECT_NO_THROW(verify_dataset(read_manifest(dir.string()), /*hashes=*/false));  // sizes and counts

  StreamingLoader loader(after_the_hole(dir));
  loader.load_state({0, 0, 1});
  for (size_t i = 0; i < data.tail.size(); ++i) {
    ASSERT_GT(data.layout.tail_offsets[i], uint64_t{1} << 32);
    const LoaderBatch batch = loader.next();
    ASSERT_EQ(batch.keys, std::vector<int64_t>{static_cast<int64_t>(i) + 1});
    const Field& values = data.tail[i].get("values");
    EXPECT_TRUE(
        batch.tensors.field("key").equal(at::tensor({static_cast<int64_t>(i) + 1}, at::kLong).view({1, 1})));
    EXPECT_TRUE(
        batch.tensors.field("values")[0].equal(at::tensor(values.floats()).view({values.shape[0], 3})));
    EXPECT_EQ(batch.tensors.fields.count("pad"), 0u);
  }
  EXPECT_EQ(loader.stats().records, static_cast<int64_t>(data.tail.size()));
  fs::remove_all(dir);
}

// A record past 4 GiB with a flipped byte, and one of another dtype: the loader names their full 64-bit
// offsets, or skips and counts them.
TEST(LoaderOver4GiB, BadRecordsPastFourGiBAreNamedWithTheirFullOffsetOrSkipped) {
  std::mt19937_64 rng(vimo::testing::seed_torch());
  const fs::path dir = vimo::testing::fresh_test_dir("loader_large", "bad");
  LargeDataset data = write_large_dataset(dir, rng);
  const uint64_t flipped = 1 + rng() % data.tail.size();  // records of the shard, keys alike
  {
    std::fstream file(data.shard, std::ios::in | std::ios::out | std::ios::binary);
    const auto at = static_cast<std::streamoff>(data.layout.tail_offsets[flipped - 1] + 6);
    file.seekg(at);
    const char byte = static_cast<char>(file.get() ^ 0x5a);
    file.seekp(at);
    file.put(byte);
  }
  const auto read_all = [&](const LoaderOptions& o, int64_t* skipped) {
    StreamingLoader loader(o);
    loader.load_state({0, 0, 1});
    std::vector<int64_t> keys;
    for (size_t i = 0; i < data.tail.size(); ++i) {
      const LoaderBatch batch = loader.next();
      keys.insert(keys.end(), batch.keys.begin(), batch.keys.end());
      *skipped += batch.corrupt_skipped;
    }
    return keys;
  };
  LoaderOptions o = after_the_hole(dir);
  int64_t skipped = 0;
  const uint64_t offset = vimo::testing::indexed_record_offset(data.shard, flipped);
  EXPECT_EQ(offset, data.layout.tail_offsets[flipped - 1]);
  expect_error([&] { read_all(o, &skipped); },
               {data.shard, "record " + std::to_string(flipped) + " at offset " + std::to_string(offset),
                "checksum", "skip_corrupt"});
  o.skip_corrupt = true;
  std::vector<int64_t> expected = {1, 2, 3, 4, 5};
  expected.erase(std::find(expected.begin(), expected.end(), static_cast<int64_t>(flipped)));
  EXPECT_EQ(read_all(o, &skipped), expected);
  EXPECT_EQ(skipped, 1);

  // The consumer wants float64 values: every record is of another dtype; the first read is named.
  o = after_the_hole(dir);
  o.schema.fields[1].dtype = DType::Float64;
  const uint64_t first = flipped == 1 ? 2 : 1;  // a record whose checksum holds
  StreamingLoader loader(o);
  loader.load_state({0, 0, static_cast<int64_t>(first)});
  const Field& values = data.tail[first - 1].get("values");
  expect_error([&] { loader.next(); },
               {"shard " + data.shard + ": record " + std::to_string(first) + " at offset " +
                    std::to_string(data.layout.tail_offsets[first - 1]) + ": field 'values' is float32 [" +
                    std::to_string(values.shape[0]) + ", 3], expected float64 [*, 3] (the keyed schema)",
                "skip_corrupt"});
  fs::remove_all(dir);
}

}  // namespace
}  // namespace vimo::data
