// Writes a seed corpus of valid shards into the directory given as argv[1], for the fuzz_shard target: plain
// and zstd, every dtype, rank-0 and empty fields, several records, and an empty shard. Each stays well under
// the fuzzer's -max_len so mutations start from whole files.
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "data/shard.h"

namespace {

using vimo::data::Compression;
using vimo::data::DType;
using vimo::data::Field;
using vimo::data::Record;

std::vector<uint8_t> ramp(size_t count, uint8_t start = 0) {
  std::vector<uint8_t> bytes(count);
  for (size_t i = 0; i < count; ++i) bytes[i] = static_cast<uint8_t>(start + 7 * i);
  return bytes;
}

// A small retrieval-like record: id, caption, token ids, frame features.
Record retrieval_record(int64_t id) {
  Record record;
  record.fields.push_back(Field::from_int64s("id", {1}, {id}));
  record.fields.push_back(Field::from_string("caption", "a person waves " + std::to_string(id)));
  record.fields.push_back(Field::from_int64s("text_ids", {4}, {1, 5 + id, 9, 2}));
  record.fields.push_back(Field::from_floats("frames", {2, 3}, {0.5f, -1, 2, 0, 0, 0}));
  return record;
}

// One field of every dtype, plus a rank-0 field, an empty field and a rank-3 field.
Record every_dtype_record() {
  Record record;
  record.fields.push_back(Field::from_bytes("f32", DType::Float32, {3}, ramp(12)));
  record.fields.push_back(Field::from_bytes("i64", DType::Int64, {2}, ramp(16, 1)));
  record.fields.push_back(Field::from_bytes("i32", DType::Int32, {2, 2}, ramp(16, 2)));
  record.fields.push_back(Field::from_bytes("u8", DType::UInt8, {5}, ramp(5, 3)));
  record.fields.push_back(Field::from_bytes("f16", DType::Float16, {3}, ramp(6, 4)));
  record.fields.push_back(Field::from_bytes("bf16", DType::BFloat16, {3}, ramp(6, 5)));
  record.fields.push_back(Field::from_bytes("f64", DType::Float64, {1}, ramp(8, 6)));
  record.fields.push_back(Field::from_bytes("scalar", DType::Float32, {}, ramp(4, 7)));
  record.fields.push_back(Field::from_bytes("empty", DType::Float32, {0, 4}, {}));
  record.fields.push_back(Field::from_bytes("cube", DType::UInt8, {2, 1, 2}, ramp(4, 8)));
  return record;
}

void write_shard(const std::string& path, Compression compression, const std::vector<Record>& records) {
  vimo::data::ShardWriter writer(path, compression);
  for (const Record& record : records) writer.append(record);
  writer.finish();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SEED_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  try {
    for (const auto& [suffix, compression] :
         {std::pair<std::string, Compression>{"plain", Compression::None}, {"zstd", Compression::Zstd}}) {
      write_shard(dir + "/empty_" + suffix + ".shard", compression, {});
      write_shard(dir + "/dtypes_" + suffix + ".shard", compression, {every_dtype_record()});
      write_shard(dir + "/retrieval3_" + suffix + ".shard", compression,
                  {retrieval_record(0), retrieval_record(1), retrieval_record(2)});
      write_shard(dir + "/no_fields_" + suffix + ".shard", compression, {Record{}});
      Record large;  // compresses well: exercises zstd's longer sequences
      large.fields.push_back(Field::from_bytes("zeros", DType::Float32, {256}, std::vector<uint8_t>(1024)));
      write_shard(dir + "/large_" + suffix + ".shard", compression, {large});
    }
    // 80 KB of zeros compress to a few bytes, in a frame whose content size takes 4 bytes (2 below 64 KiB):
    // mutating them, and the index's record size, reaches large declared sizes.
    Record sparse;
    sparse.fields.push_back(Field::from_bytes("zeros", DType::Float32, {20000}, std::vector<uint8_t>(80000)));
    write_shard(dir + "/sparse_zstd.shard", Compression::Zstd, {sparse});
  } catch (const std::exception& error) {
    std::fprintf(stderr, "make_shard_seeds: %s\n", error.what());
    return 1;
  }
  return 0;
}
