// Tests that records past 4 GiB into a shard read back (FORMAT.md: uint64 offsets). The reader's file is
// sparse: its first record is a field of 4 GiB + 1 MiB of zeros left as a hole, so those tests need no disk
// space and no 4 GiB write; the records after it are real. It is built by hand from data/FORMAT.md, so it
// also checks the reader against the spec rather than against our writer. The writer's own test cannot leave
// a hole: it writes a 4.25 GiB shard through DatasetWriter (about 15 s and 4.25 GiB of disk, removed after).
#include <gtest/gtest.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "data/dataset_writer.h"
#include "data/manifest.h"
#include "data/shard.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kHoleBytes = (uint64_t{4} << 30) + (uint64_t{1} << 20);

template <typename T>
void put(std::vector<uint8_t>& out, T value) {
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  out.insert(out.end(), p, p + sizeof(T));
}

// FORMAT.md's record encoding of one uint8 field of `bytes` bytes, without the bytes themselves.
std::vector<uint8_t> padding_record_head(uint64_t bytes) {
  std::vector<uint8_t> head;
  put<uint32_t>(head, 1);  // field count
  put<uint16_t>(head, 3);  // name length
  head.insert(head.end(), {'p', 'a', 'd'});
  put<uint8_t>(head, static_cast<uint8_t>(DType::UInt8));
  put<uint8_t>(head, 1);  // rank
  put<int64_t>(head, static_cast<int64_t>(bytes));
  put<uint64_t>(head, bytes);
  return head;
}

// xxh3 of `head` followed by `zeros` zero bytes, as the reader computes it over the stored record.
uint64_t checksum_of_head_and_zeros(const std::vector<uint8_t>& head, uint64_t zeros) {
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  XXH3_64bits_update(state, head.data(), head.size());
  const std::vector<uint8_t> block(uint64_t{1} << 20, 0);
  for (uint64_t left = zeros; left > 0;) {
    const uint64_t n = std::min<uint64_t>(left, block.size());
    XXH3_64bits_update(state, block.data(), n);
    left -= n;
  }
  const uint64_t digest = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return digest;
}

Record random_record(std::mt19937_64& rng, int i) {
  Record record;
  Field values;
  values.name = "values_" + std::to_string(i);
  values.dtype = DType::Float32;
  values.shape = {static_cast<int64_t>(1 + rng() % 64), 3};
  values.bytes.resize(values.numel() * 4);
  for (uint8_t& byte : values.bytes) byte = static_cast<uint8_t>(rng());
  record.fields.push_back(values);
  record.fields.push_back(Field::from_string("caption", "record " + std::to_string(rng())));
  return record;
}

struct LargeShard {
  std::string path;
  std::vector<Record> tail;            // the records after the hole
  std::vector<uint64_t> tail_offsets;  // their file offsets (all past 4 GiB)
};

// header | padding record (4 GiB + 1 MiB hole) | tail records | index | footer
LargeShard write_sparse_shard(const fs::path& dir, std::mt19937_64& rng) {
  LargeShard shard;
  // The tail records' encodings come from a small shard of our writer: its bytes between the header and
  // the index are the records back to back, and its index holds their checksums and sizes.
  const std::string small = (dir / "small.bin").string();
  ShardWriter writer(small);
  std::vector<uint64_t> small_offsets;
  for (int i = 0; i < 3; ++i) {
    shard.tail.push_back(random_record(rng, i));
    small_offsets.push_back(writer.bytes_written());
    writer.append(shard.tail.back());
  }
  writer.finish();
  std::vector<uint8_t> small_bytes(fs::file_size(small));
  std::ifstream(small, std::ios::binary)
      .read(reinterpret_cast<char*>(small_bytes.data()), static_cast<std::streamsize>(small_bytes.size()));
  const uint64_t count = shard.tail.size();
  const uint64_t small_index = small_bytes.size() - 24 - 24 * count;
  std::vector<uint64_t> small_index_entries(3 * count);
  std::memcpy(small_index_entries.data(), small_bytes.data() + small_index, 24 * count);

  const std::vector<uint8_t> head = padding_record_head(kHoleBytes);
  const uint64_t header_size = 16;
  const uint64_t tail_start = header_size + head.size() + kHoleBytes;
  for (const uint64_t offset : small_offsets) shard.tail_offsets.push_back(tail_start + offset - header_size);
  const uint64_t index_offset = tail_start + (small_index - header_size);

  std::vector<uint8_t> index;
  put<uint64_t>(index, header_size);
  for (const uint64_t offset : shard.tail_offsets) put<uint64_t>(index, offset);
  put<uint64_t>(index, checksum_of_head_and_zeros(head, kHoleBytes));
  for (uint64_t i = 0; i < count; ++i) put<uint64_t>(index, small_index_entries[count + i]);
  put<uint64_t>(index, head.size() + kHoleBytes);
  for (uint64_t i = 0; i < count; ++i) put<uint64_t>(index, small_index_entries[2 * count + i]);
  put<uint64_t>(index, count + 1);
  put<uint64_t>(index, index_offset);
  index.insert(index.end(), small_bytes.end() - 8, small_bytes.end());  // the footer's magic

  shard.path = (dir / "large.bin").string();
  {
    std::ofstream out(shard.path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(small_bytes.data()), header_size);  // same header
    out.write(reinterpret_cast<const char*>(head.data()), static_cast<std::streamsize>(head.size()));
    out.seekp(static_cast<std::streamoff>(tail_start));  // leaves the padding's bytes a hole
    out.write(reinterpret_cast<const char*>(small_bytes.data() + header_size),
              static_cast<std::streamsize>(small_index - header_size));
    out.write(reinterpret_cast<const char*>(index.data()), static_cast<std::streamsize>(index.size()));
    EXPECT_TRUE(out.good()) << "cannot write " << shard.path;
  }
  return shard;
}

TEST(ShardOver4GiB, RecordsPastFourGiBReadBackExactly) {
  std::mt19937_64 rng(vimo::testing::seed_torch());
  const fs::path dir = vimo::testing::fresh_test_dir("shard_large", "read");
  const LargeShard shard = write_sparse_shard(dir, rng);
  ASSERT_GT(fs::file_size(shard.path), uint64_t{4} << 30);

  const ShardReader reader(shard.path);
  ASSERT_EQ(reader.size(), shard.tail.size() + 1);
  RecordBuffer buffer;
  for (uint64_t i = 0; i < shard.tail.size(); ++i) {
    ASSERT_GT(shard.tail_offsets[i], uint64_t{1} << 32);
    const Record read = reader.read_record(i + 1);
    const Record& want = shard.tail[i];
    ASSERT_EQ(read.fields.size(), want.fields.size()) << "record " << i + 1;
    for (size_t f = 0; f < want.fields.size(); ++f) {
      EXPECT_EQ(read.fields[f].name, want.fields[f].name);
      EXPECT_EQ(read.fields[f].shape, want.fields[f].shape);
      EXPECT_EQ(read.fields[f].bytes, want.fields[f].bytes) << "record " << i + 1 << " field " << f;
    }
  }
  fs::remove_all(dir);
}

TEST(ShardOver4GiB, ACorruptRecordPastFourGiBIsNamedWithItsFullOffset) {
  std::mt19937_64 rng(vimo::testing::seed_torch());
  const fs::path dir = vimo::testing::fresh_test_dir("shard_large", "corrupt");
  const LargeShard shard = write_sparse_shard(dir, rng);
  const uint64_t victim = 1 + rng() % shard.tail.size();  // record `victim` of the large shard
  const uint64_t at = shard.tail_offsets[victim - 1] + 4 + rng() % 8;
  {
    std::fstream file(shard.path, std::ios::in | std::ios::out | std::ios::binary);
    file.seekg(static_cast<std::streamoff>(at));
    char byte = 0;
    file.read(&byte, 1);
    byte = static_cast<char>(byte ^ 0x5a);
    file.seekp(static_cast<std::streamoff>(at));
    file.write(&byte, 1);
  }
  const ShardReader reader(shard.path);
  try {
    (void)reader.read_record(victim);
    ADD_FAILURE() << "a flipped byte at offset " << at << " was not caught";
  } catch (const CorruptDataError& e) {
    EXPECT_EQ(e.file, shard.path);
    EXPECT_EQ(e.record, static_cast<int64_t>(victim));
    EXPECT_EQ(e.offset, shard.tail_offsets[victim - 1]);  // not truncated to 32 bits
    EXPECT_NE(std::string(e.what()).find(std::to_string(shard.tail_offsets[victim - 1])), std::string::npos)
        << e.what();
  }
  fs::remove_all(dir);
}

// 17 records of 256 MiB through DatasetWriter into one shard of 4.25 GiB: the manifest lists its true size
// and hash, verify_dataset accepts it, and the records that start past 4 GiB read back byte for byte. Each
// record is one random block with its index written into its first bytes, so a record read from a wrong
// (truncated) offset cannot pass for the right one.
TEST(ShardOver4GiB, OurWriterWritesPastFourGiB) {
  std::mt19937_64 rng(vimo::testing::seed_torch());
  const fs::path dir = vimo::testing::fresh_test_dir("shard_large", "writer");
  struct RemovedAtTheEnd {  // also when an assertion returns early: 4.25 GiB must not stay behind
    fs::path dir;
    ~RemovedAtTheEnd() { fs::remove_all(dir); }
  } removed{dir};
  constexpr uint64_t kRecordBytes = uint64_t{256} << 20;
  constexpr uint64_t kRecords = 17;
  std::vector<uint8_t> block(kRecordBytes);
  for (size_t i = 0; i < block.size(); i += 8) {
    const uint64_t word = rng();
    std::memcpy(block.data() + i, &word, 8);
  }
  const auto record_of = [&](uint64_t index) {
    std::vector<uint8_t> bytes = block;
    std::memcpy(bytes.data(), &index, sizeof(index));
    Record record;
    record.fields.push_back(
        Field::from_bytes("payload", DType::UInt8, {static_cast<int64_t>(kRecordBytes)}, std::move(bytes)));
    return record;
  };
  {
    DatasetWriterOptions options;
    options.max_shard_bytes = uint64_t{8} << 30;  // one shard
    DatasetWriter writer(dir.string(), "large", options);
    for (uint64_t i = 0; i < kRecords; ++i) writer.append("train", record_of(i));
    writer.finish();
  }
  const DatasetManifest manifest = read_manifest(dir.string());
  const SplitManifest& train = manifest.split("train");
  ASSERT_EQ(train.shards.size(), 1u);
  const std::string path = manifest.shard_path("train", 0);
  EXPECT_EQ(train.shards[0].records, kRecords);
  EXPECT_EQ(train.shards[0].bytes, fs::file_size(path));
  EXPECT_GT(train.shards[0].bytes, kRecords * kRecordBytes);
  EXPECT_NO_THROW(verify_dataset(manifest, /*hashes=*/true));

  const ShardReader reader(path);
  ASSERT_EQ(reader.size(), kRecords);
  int past = 0;
  for (uint64_t i = 0; i < kRecords; ++i) {
    if (reader.record_offset(i) <= (uint64_t{1} << 32)) continue;
    ++past;
    const Record read = reader.read_record(i);
    const Record want = record_of(i);
    ASSERT_EQ(read.fields.size(), 1u) << "record " << i;
    EXPECT_EQ(read.fields[0].name, "payload");
    EXPECT_TRUE(read.fields[0].bytes == want.fields[0].bytes) << "record " << i << " differs";
  }
  EXPECT_EQ(past, 1) << "the last record, at 16 × 256 MiB plus headers, starts past 4 GiB";
}

}  // namespace
}  // namespace vimo::data
