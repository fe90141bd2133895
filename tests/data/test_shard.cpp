// Tests the shard format: round trips of random records, the named error for each kind of corruption,
// and crash safety of the writer.
#include <gtest/gtest.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "data/shard.h"
#include "data/shard_mapping.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;
using vimo::testing::expect_error;

fs::path test_dir() {
  return vimo::testing::fresh_test_dir("shard",
                                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
}

Record random_record(std::mt19937_64& rng) {
  Record record;
  const int fields = 1 + static_cast<int>(rng() % 5);
  for (int f = 0; f < fields; ++f) {
    Field field;
    field.name = "field_" + std::to_string(f) + std::string(rng() % 4, 'x');
    field.dtype = static_cast<DType>(1 + rng() % 7);  // every dtype code
    field.shape.resize(rng() % 4);                    // rank 0 (a scalar) to 3, extents may be 0
    for (int64_t& extent : field.shape) extent = static_cast<int64_t>(rng() % 5);
    field.bytes.resize(field.numel() * dtype_size(field.dtype));
    for (uint8_t& byte : field.bytes) byte = static_cast<uint8_t>(rng());
    record.fields.push_back(field);
  }
  record.fields.push_back(Field::from_string("empty", ""));
  return record;
}

// Writes `records` to `path` and returns each record's byte offset in the file.
std::vector<uint64_t> write_shard(const std::string& path, const std::vector<Record>& records,
                                  Compression compression = Compression::None) {
  ShardWriter writer(path, compression);
  std::vector<uint64_t> offsets;
  for (const Record& record : records) {
    offsets.push_back(writer.bytes_written());
    writer.append(record);
  }
  writer.finish();
  EXPECT_EQ(writer.records_written(), records.size());
  EXPECT_EQ(writer.bytes_written(), fs::file_size(path));
  return offsets;
}

void overwrite(const std::string& path, uint64_t offset, const std::vector<uint8_t>& bytes) {
  std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
  file.seekp(static_cast<std::streamoff>(offset));
  file.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// Index entries are 24 bytes (offset, checksum, encoded size); the footer is 24 bytes.
uint64_t index_offset_of(const std::string& path, size_t records) {
  return fs::file_size(path) - 24 - 24 * records;
}

struct ShardFixture {
  explicit ShardFixture(Compression compression = Compression::None) {
    const int count = 2 + static_cast<int>(rng() % 10);
    for (int i = 0; i < count; ++i) records.push_back(random_record(rng));
    offsets = write_shard(path, records, compression);
  }
  std::mt19937_64 rng{vimo::testing::seed_torch()};
  fs::path dir = test_dir();
  std::string path = (dir / "shard_00000.bin").string();
  std::vector<Record> records;
  std::vector<uint64_t> offsets;
};

// Flips one byte of record `victim` in place, with a plain write (it leaves the file's times to the kernel).
void flip_byte_of_record(ShardFixture& f, uint64_t victim, uint64_t stored_size) {
  const uint64_t at = f.offsets[victim] + f.rng() % stored_size;
  std::vector<uint8_t> byte(1);
  {
    std::ifstream in(f.path, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(at));
    in.read(reinterpret_cast<char*>(byte.data()), 1);
  }
  byte[0] ^= static_cast<uint8_t>(1 + f.rng() % 255);
  overwrite(f.path, at, byte);
}

// Every test that reads records runs on plain and on zstd-compressed shards.
class ShardBothCompressions : public ::testing::TestWithParam<Compression> {};
INSTANTIATE_TEST_SUITE_P(Shard, ShardBothCompressions,
                         ::testing::Values(Compression::None, Compression::Zstd),
                         [](const auto& info) { return info.param == Compression::None ? "plain" : "zstd"; });

TEST_P(ShardBothCompressions, RoundTripOfRandomRecordsIsByteExact) {
  ShardFixture f(GetParam());
  const ShardReader reader(f.path);
  ASSERT_EQ(reader.size(), f.records.size());
  for (uint64_t i = 0; i < reader.size(); ++i) {
    const Record read = reader.read_record(i);
    ASSERT_EQ(read.fields.size(), f.records[i].fields.size()) << "record " << i;
    for (size_t k = 0; k < read.fields.size(); ++k) {
      const Field &a = read.fields[k], &b = f.records[i].fields[k];
      EXPECT_EQ(a.name, b.name);
      EXPECT_EQ(a.dtype, b.dtype) << a.name;
      EXPECT_EQ(a.shape, b.shape) << a.name;
      EXPECT_EQ(a.bytes, b.bytes) << a.name;
    }
    EXPECT_EQ(read.get("empty").text(), "");
  }
  EXPECT_EQ(reader.compression(), GetParam());
  expect_error([&] { reader.read_record(reader.size()); },
               {f.path, "record " + std::to_string(reader.size())});
}

// read_view is the loader's path: it must see exactly what read_record sees, reusing one buffer across
// records of different sizes (so a stale byte from a longer record would show).
TEST_P(ShardBothCompressions, ReadViewMatchesTheWrittenRecordsInAReusedBuffer) {
  ShardFixture f(GetParam());
  const ShardReader reader(f.path);
  RecordBuffer buffer;
  std::vector<uint64_t> order(reader.size());
  for (uint64_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), f.rng);
  for (const uint64_t i : order) {
    const RecordView view = reader.read_view(i, buffer);
    ASSERT_EQ(view.fields.size(), f.records[i].fields.size()) << "record " << i;
    for (size_t k = 0; k < view.fields.size(); ++k) {
      const FieldView& a = view.fields[k];
      const Field& b = f.records[i].fields[k];
      EXPECT_EQ(a.name, b.name);
      EXPECT_EQ(a.dtype, b.dtype) << a.name;
      EXPECT_EQ(a.shape, b.shape) << a.name;
      EXPECT_EQ(std::vector<uint8_t>(a.bytes.begin(), a.bytes.end()), b.bytes) << a.name;
      EXPECT_EQ(view.find(b.name), &a);
    }
    EXPECT_EQ(view.find("no such field"), nullptr);
  }
  // One RecordView reused across records (the loader's way) gives the same fields as a fresh one each time.
  RecordView reused;
  for (const uint64_t i : order) {
    RecordBuffer fresh_buffer;
    const RecordView fresh = reader.read_view(i, fresh_buffer);
    reader.read_view(i, buffer, reused);
    ASSERT_EQ(reused.fields.size(), fresh.fields.size()) << "record " << i;
    for (size_t k = 0; k < fresh.fields.size(); ++k) {
      EXPECT_EQ(reused.fields[k].name, fresh.fields[k].name);
      EXPECT_EQ(reused.fields[k].dtype, fresh.fields[k].dtype);
      EXPECT_EQ(reused.fields[k].shape, fresh.fields[k].shape);
      EXPECT_TRUE(std::equal(reused.fields[k].bytes.begin(), reused.fields[k].bytes.end(),
                             fresh.fields[k].bytes.begin(), fresh.fields[k].bytes.end()));
    }
  }
  expect_error([&] { reader.read_view(reader.size(), buffer); },
               {f.path, "record " + std::to_string(reader.size())});
}

// A shard that shrinks while a reader has it mapped (cp over a dataset during training) must end the process
// with a message naming the file, not a bare SIGBUS. Run in a child process (a death test).
TEST_P(ShardBothCompressions, ShardTruncatedWhileOpenExitsNamingIt) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  ShardFixture f(GetParam());
  const ShardReader reader(f.path);
  RecordBuffer buffer;
  const uint64_t last = reader.size() - 1;
  ASSERT_NO_THROW(reader.read_view(last, buffer));
  ASSERT_EQ(::truncate(f.path.c_str(), 0), 0);
  EXPECT_EXIT(reader.read_view(last, buffer), ::testing::ExitedWithCode(kShardChangedExitCode),
              "shard .*shard_00000.bin became shorter while it was being read");
}

// With every mapping slot taken (512; the loader keeps 64 shards open), a reader falls back to pread. A
// record that a truncation then cut is named with its index and offset there too, as on the mapped path.
TEST(Shard, ARecordCutByTruncationIsNamedWhenReadWithoutAMapping) {
  ShardFixture f;
  std::vector<std::unique_ptr<ShardReader>> holding;  // every slot of the SIGBUS guard's table
  for (int i = 0; i < 512; ++i) holding.push_back(std::make_unique<ShardReader>(f.path));
  const ShardReader reader(f.path);
  holding.clear();
  const uint64_t last = reader.size() - 1;
  RecordBuffer buffer;
  const RecordView view = reader.read_view(last, buffer);
  ASSERT_FALSE(view.fields.empty());
  const uint8_t* data = view.fields[0].bytes.data();
  ASSERT_TRUE(data >= buffer.data() && data < buffer.data() + buffer.size())
      << "the record was not read into the buffer: the reader has a mapping, and truncating would SIGBUS";
  ASSERT_EQ(::truncate(f.path.c_str(), static_cast<off_t>(f.offsets[last] + 3)), 0);
  try {
    (void)reader.read_record(last);
    ADD_FAILURE() << "a record cut by truncation was read";
  } catch (const CorruptDataError& e) {
    EXPECT_EQ(e.file, f.path);
    EXPECT_EQ(e.record, static_cast<int64_t>(last));
    EXPECT_EQ(e.offset, f.offsets[last]);
    EXPECT_NE(std::string(e.what()).find("record " + std::to_string(last) + " at offset " +
                                         std::to_string(f.offsets[last])),
              std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
}

// Field names are unique within a record (FORMAT.md): the writer refuses a second field of one name, and
// the reader names a record that has one as corrupt. Such a record is made by renaming field "vb" to "va" in
// a written shard and fixing the record's checksum in the index.
TEST(Shard, AFieldNameTwiceInARecordIsRefusedAndReportedCorrupt) {
  const fs::path dir = test_dir();
  const std::string path = (dir / "twice.bin").string();
  Record twice;
  twice.fields = {Field::from_int64s("v", {1}, {1}), Field::from_floats("v", {1}, {2.0f})};
  ShardWriter writer(path);
  expect_error([&] { writer.append(twice); }, {"field 'v' appears twice (fields 0 and 1)"});

  Record two;
  two.fields = {Field::from_int64s("va", {1}, {1}), Field::from_floats("vb", {1}, {2.0f})};
  const uint64_t begin = write_shard(path, {two}).at(0);
  std::vector<uint8_t> file(fs::file_size(path));
  std::ifstream(path, std::ios::binary)
      .read(reinterpret_cast<char*>(file.data()), static_cast<std::streamsize>(file.size()));
  uint64_t index_offset = 0;  // footer: record count, index offset, magic
  std::memcpy(&index_offset, file.data() + file.size() - 16, sizeof(index_offset));
  const std::string_view record(reinterpret_cast<const char*>(file.data() + begin), index_offset - begin);
  const size_t renamed = record.find("vb");
  ASSERT_NE(renamed, std::string_view::npos);
  file[begin + renamed + 1] = 'a';
  const uint64_t checksum = XXH3_64bits(file.data() + begin, index_offset - begin);
  std::memcpy(file.data() + index_offset + 8, &checksum, sizeof(checksum));  // after 1 record offset
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(file.data()), static_cast<std::streamsize>(file.size()));
  const ShardReader reader(path);
  try {
    (void)reader.read_record(0);
    ADD_FAILURE() << "a record with two fields named 'va' was read";
  } catch (const CorruptDataError& e) {
    EXPECT_EQ(e.record, 0);
    EXPECT_NE(std::string(e.what()).find("field 'va' appears twice (fields 0 and 1)"), std::string::npos)
        << e.what();
  }
}

TEST(Shard, EmptyShardHasNoRecords) {
  const std::string path = (test_dir() / "empty.bin").string();
  write_shard(path, {});
  EXPECT_EQ(ShardReader(path).size(), 0u);
}

TEST(Shard, FieldHelpersCheckDtypeAndCounts) {
  std::mt19937_64 rng(vimo::testing::seed_torch());
  std::vector<float> values(6);
  for (float& v : values) v = static_cast<float>(rng() % 1000) / 7.0f;
  const Field floats = Field::from_floats("x", {2, 3}, values);
  EXPECT_EQ(floats.numel(), 6);
  EXPECT_EQ(floats.floats(), values);
  EXPECT_EQ(Field::from_int64s("i", {2}, {-5, 1LL << 40}).int64s(), (std::vector<int64_t>{-5, 1LL << 40}));
  EXPECT_EQ(Field::from_string("s", "a caption").text(), "a caption");
  expect_error([&] { floats.int64s(); }, {"'x'", "int64", "float32"});
  expect_error([&] { floats.text(); }, {"'x'", "uint8"});
  expect_error([&] { Field::from_floats("y", {4}, values); }, {"'y'", "4", "6"});
  Field short_field = floats;
  short_field.bytes.pop_back();
  expect_error([&] { short_field.floats(); }, {"'x'", "24", "23"});
  Record record;
  record.fields.push_back(floats);
  expect_error([&] { record.get("missing"); }, {"'missing'", "x"});
  // The writer refuses a field whose bytes disagree with its shape.
  ShardWriter writer((test_dir() / "bad.bin").string());
  Record bad;
  bad.fields.push_back(short_field);
  expect_error([&] { writer.append(bad); }, {"record 0", "'x'", "24", "23"});
}

TEST(Shard, ZstdShrinksCompressibleRecords) {
  const fs::path dir = test_dir();
  Record record;
  record.fields.push_back(Field::from_floats("zeros", {1024}, std::vector<float>(1024, 0.0f)));
  write_shard((dir / "plain.bin").string(), {record, record});
  write_shard((dir / "zstd.bin").string(), {record, record}, Compression::Zstd);
  EXPECT_LT(fs::file_size(dir / "zstd.bin") * 10, fs::file_size(dir / "plain.bin"));
  EXPECT_EQ(ShardReader((dir / "zstd.bin").string()).read_record(1).get("zeros").floats(),
            std::vector<float>(1024, 0.0f));
}

TEST_P(ShardBothCompressions, FlippedByteGivesChecksumErrorNamingTheRecord) {
  ShardFixture f(GetParam());
  const uint64_t victim = f.rng() % f.records.size();
  const uint64_t index_offset = index_offset_of(f.path, f.records.size());
  const uint64_t end = victim + 1 < f.offsets.size() ? f.offsets[victim + 1] : index_offset;
  flip_byte_of_record(f, victim, end - f.offsets[victim]);

  const ShardReader reader(f.path);
  for (uint64_t i = 0; i < reader.size(); ++i) {
    if (i != victim) {
      EXPECT_NO_THROW(reader.read_record(i)) << "record " << i;
      continue;
    }
    expect_error(
        [&] { reader.read_record(i); },
        {f.path, "record " + std::to_string(victim) + " at offset " + std::to_string(f.offsets[victim]),
         "checksum mismatch", "regenerate"});
    RecordBuffer buffer;
    expect_error(
        [&] { reader.read_view(i, buffer); },
        {f.path, "record " + std::to_string(victim) + " at offset " + std::to_string(f.offsets[victim]),
         "checksum mismatch"});
    try {
      reader.read_record(i);
    } catch (const CorruptDataError& e) {  // the type callers use to skip and count
      EXPECT_EQ(e.file, f.path);
      EXPECT_EQ(e.record, static_cast<int64_t>(victim));
      EXPECT_EQ(e.offset, f.offsets[victim]);
    }
  }
}

// Note [Verifying a mapped record once]: with Verification::FirstRead a mapped record is hashed on its first
// read only; a plain write in place moves the file's times, and after recheck_if_modified() every record is
// hashed again, so the changed one is caught. The file's time is first set an hour back, so that the write's
// own time differs from it whatever the file system clock's granularity.
TEST_P(ShardBothCompressions, AMappedRecordIsHashedOnceUntilTheFileChanges) {
  ShardFixture f(GetParam());
  fs::last_write_time(f.path, fs::last_write_time(f.path) - std::chrono::hours(1));
  const ShardReader reader(f.path, Verification::FirstRead);
  RecordBuffer buffer;
  for (int pass = 0; pass < 3; ++pass) {
    for (uint64_t i = 0; i < reader.size(); ++i) ASSERT_NO_THROW(reader.read_view(i, buffer)) << i;
    reader.recheck_if_modified();  // the file did not change: nothing is forgotten
  }
  ASSERT_EQ(reader.checksums_computed(), reader.size()) << "the mapped records were hashed more than once";

  const uint64_t victim = f.rng() % f.records.size();
  flip_byte_of_record(f, victim, reader.stored_size(victim));
  reader.recheck_if_modified();
  for (uint64_t i = 0; i < reader.size(); ++i) {
    if (i == victim) {
      expect_error([&] { reader.read_view(i, buffer); },
                   {f.path, "record " + std::to_string(victim), "checksum mismatch"});
    } else {
      EXPECT_NO_THROW(reader.read_view(i, buffer)) << "record " << i;
    }
  }
  EXPECT_EQ(reader.checksums_computed(), 2 * reader.size());
}

// The default, Verification::EveryRead, hashes every read: a change is caught at the next read even when
// the file's modification time is put back and nobody asks the reader to look at it.
TEST_P(ShardBothCompressions, EveryReadIsTheDefaultAndCatchesAChangeAtOnce) {
  ShardFixture f(GetParam());
  const ShardReader reader(f.path);
  RecordBuffer buffer;
  for (int pass = 0; pass < 2; ++pass) {
    for (uint64_t i = 0; i < reader.size(); ++i) ASSERT_NO_THROW(reader.read_view(i, buffer)) << i;
  }
  EXPECT_EQ(reader.checksums_computed(), 2 * reader.size());
  const uint64_t victim = f.rng() % f.records.size();
  const auto written = fs::last_write_time(f.path);
  flip_byte_of_record(f, victim, reader.stored_size(victim));
  fs::last_write_time(f.path, written);
  expect_error([&] { reader.read_view(victim, buffer); },
               {f.path, "record " + std::to_string(victim), "checksum mismatch"});
}

TEST_P(ShardBothCompressions, TruncatedFileIsRejected) {
  ShardFixture f(GetParam());
  const uint64_t size = fs::file_size(f.path);
  fs::resize_file(f.path, size - 1 - f.rng() % (size - 1));  // keeps 0 .. size-1 bytes
  expect_error([&] { ShardReader reader(f.path); }, {f.path, "truncated"});
  EXPECT_THROW(ShardReader reader(f.path), CorruptDataError);
}

TEST(Shard, WrongMagicIsRejected) {
  ShardFixture f;
  overwrite(f.path, f.rng() % 8, {'?'});
  expect_error([&] { ShardReader reader(f.path); },
               {f.path, "offset 0", "bad magic", "expected \"VIMOSHRD\""});
}

TEST(Shard, WrongVersionIsRejected) {
  ShardFixture f;
  const uint32_t version = kShardVersion + 1 + static_cast<uint32_t>(f.rng() % 100);
  const auto* p = reinterpret_cast<const uint8_t*>(&version);
  overwrite(f.path, 8, std::vector<uint8_t>(p, p + 4));
  expect_error([&] { ShardReader reader(f.path); },
               {f.path, "unsupported version", "expected 2, found " + std::to_string(version)});
}

TEST(Shard, CorruptIndexIsRejected) {
  ShardFixture f;
  const uint64_t victim = f.rng() % f.records.size();
  const uint64_t index_offset = index_offset_of(f.path, f.records.size());
  const uint64_t bogus = fs::file_size(f.path) + f.rng() % 1000;  // past the records region
  const auto* p = reinterpret_cast<const uint8_t*>(&bogus);
  overwrite(f.path, index_offset + 8 * victim, std::vector<uint8_t>(p, p + 8));
  expect_error([&] { ShardReader reader(f.path); }, {f.path, "record " + std::to_string(victim), "outside"});
}

TEST(Shard, CorruptEncodedSizeIsRejected) {
  ShardFixture f(Compression::Zstd);
  const uint64_t victim = f.rng() % f.records.size();
  const uint64_t bogus = uint64_t{1} << 50;  // a size the reader must refuse to allocate
  const auto* p = reinterpret_cast<const uint8_t*>(&bogus);
  overwrite(f.path, index_offset_of(f.path, f.records.size()) + 8 * (2 * f.records.size() + victim),
            std::vector<uint8_t>(p, p + 8));
  expect_error([&] { ShardReader reader(f.path); }, {f.path, "record " + std::to_string(victim), "encoding"});
}

TEST(Shard, MissingFileIsNamed) {
  const std::string path = (test_dir() / "nope.bin").string();
  expect_error([&] { ShardReader reader(path); }, {path, "cannot open", "No such file"});
}

TEST(Shard, UnfinishedWriterLeavesNoFile) {
  std::mt19937_64 rng(vimo::testing::seed_torch());
  const fs::path dir = test_dir();
  const std::string path = (dir / "shard_00000.bin").string();
  {
    ShardWriter writer(path);
    writer.append(random_record(rng));
    EXPECT_TRUE(fs::exists(path + ".tmp"));
    EXPECT_FALSE(fs::exists(path));
  }  // destroyed without finish(), as by an exception or a crash before publication
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  EXPECT_TRUE(fs::is_empty(dir));

  write_shard(path, {random_record(rng)});
  EXPECT_TRUE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

}  // namespace
}  // namespace vimo::data
