// Defines the minimal shard format (writer and reader) used by the synthetic dataset. The full format,
// loader and importers have their own issue; this keeps the format's magic and version from day one.
//
// Layout (little-endian):
//   header  : magic "VIMOSHRD" (8 bytes), uint32 version (= kShardVersion), uint32 reserved (0)
//   records : back to back; each record is
//               uint32 field_count, then per field:
//                 uint16 name_length, name bytes, uint8 dtype, uint8 rank, int64 shape[rank],
//                 uint64 byte_count, raw bytes
//   index   : uint64 record_offset[record_count], uint64 record_checksum[record_count] (xxh3-64 of the
//             record's bytes)
//   footer  : uint64 record_count, uint64 index_offset, magic "VIMOSHRD" (8 bytes)
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace vimo::data {

inline constexpr char kShardMagic[8] = {'V', 'I', 'M', 'O', 'S', 'H', 'R', 'D'};
inline constexpr uint32_t kShardVersion = 1;

enum class DType : uint8_t { Float32 = 1, Int64 = 2, Int32 = 3, UInt8 = 4 };
size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);

// One named, typed array of a record.
struct Field {
  std::string name;
  DType dtype = DType::UInt8;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // product(shape) * dtype_size(dtype) bytes

  static Field from_floats(std::string name, std::vector<int64_t> shape, const std::vector<float>& values);
  static Field from_int64s(std::string name, std::vector<int64_t> shape, const std::vector<int64_t>& values);
  static Field from_string(std::string name, const std::string& text);  // UInt8, shape [len]
  std::vector<float> floats() const;    // throws unless dtype == Float32
  std::vector<int64_t> int64s() const;  // throws unless dtype == Int64
  std::string text() const;             // throws unless dtype == UInt8
  int64_t numel() const;
};

struct Record {
  std::vector<Field> fields;
  // Throws std::runtime_error naming the missing field.
  const Field& get(const std::string& name) const;
};

// Writes records to `path` through a temporary file; finish() fsyncs and renames it into place, so a
// crash never leaves a partial shard under the final name.
class ShardWriter {
 public:
  explicit ShardWriter(std::string path);
  ~ShardWriter();  // an unfinished writer removes its temporary file
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;
  void append(const Record& record);
  void finish();
  uint64_t records_written() const { return offsets_.size(); }
  uint64_t bytes_written() const { return position_; }

 private:
  std::string path_, temp_path_;
  std::FILE* file_ = nullptr;
  uint64_t position_ = 0;
  std::vector<uint64_t> offsets_, checksums_;
};

// Reads a shard written by ShardWriter. Validates magic, version, footer and index on open, and each
// record's checksum on read; errors name the file, the record and the byte offset.
class ShardReader {
 public:
  explicit ShardReader(std::string path);
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;
  uint64_t size() const { return offsets_.size(); }
  Record read_record(uint64_t index) const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
  uint64_t index_offset_ = 0;
  std::vector<uint64_t> offsets_, checksums_;
};

}  // namespace vimo::data
