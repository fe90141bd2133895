// Defines the vimo shard format (data/FORMAT.md is its specification): Field and Record, the crash-safe
// ShardWriter and the validating ShardReader, and CorruptDataError, the one error type for bad shard bytes.
//
// Layout (little-endian, version 2):
//   header  : magic "VIMOSHRD" (8 bytes), uint32 version (= kShardVersion), uint16 compression, uint16 0
//   records : back to back, each stored as its encoding below, or that encoding compressed as one zstd frame
//             when the header says Zstd. The encoding of a record is
//               uint32 field_count, then per field:
//                 uint16 name_length, name bytes, uint8 dtype, uint8 rank, int64 shape[rank],
//                 uint64 byte_count, raw bytes
//   index   : uint64 record_offset[n], uint64 record_checksum[n] (xxh3-64 of the record's stored bytes),
//             uint64 record_size[n] (bytes of the encoding, before compression)
//   footer  : uint64 record_count n, uint64 index_offset, magic "VIMOSHRD" (8 bytes)
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <memory>
#include <mutex>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace vimo::data {

inline constexpr char kShardMagic[8] = {'V', 'I', 'M', 'O', 'S', 'H', 'R', 'D'};
inline constexpr uint32_t kShardVersion = 2;

enum class DType : uint8_t {
  Float32 = 1,
  Int64 = 2,
  Int32 = 3,
  UInt8 = 4,
  Float16 = 5,
  BFloat16 = 6,
  Float64 = 7
};
// How a record's bytes are stored in a shard (one choice per shard, in the header).
enum class Compression : uint8_t { None = 0, Zstd = 1 };
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
  // Any dtype from raw little-endian bytes; throws unless bytes.size() matches the shape.
  static Field from_bytes(std::string name, DType dtype, std::vector<int64_t> shape,
                          std::vector<uint8_t> bytes);
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

// An allocator whose value-initialization is default-initialization, so resize() leaves bytes unset (they
// are overwritten right away by a read).
template <typename T>
struct DefaultInitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  using std::allocator<T>::allocator;
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

// Reusable storage for ShardReader::read_view: a record's bytes when they must be copied or decoded.
using RecordBuffer = std::vector<uint8_t, DefaultInitAllocator<uint8_t>>;

class ShardMapping;

// A field of a record, viewing the bytes of the RecordBuffer it was read into (no copy).
struct FieldView {
  std::string_view name;
  DType dtype = DType::UInt8;
  std::vector<int64_t> shape;
  std::span<const uint8_t> bytes;  // product(shape) * dtype_size(dtype) bytes
};

// A record's fields as views: valid while the buffer they view is alive and not reused.
struct RecordView {
  std::vector<FieldView> fields;
  // The field named `name`, or nullptr.
  const FieldView* find(std::string_view name) const;
  // Views of `record`'s fields (valid while `record` lives).
  static RecordView of(const Record& record);
};

// Bad bytes in a shard (checksum mismatch, truncation, malformed index or record). The message names the
// file, the record (when known) and the byte offset; the fields repeat them for callers that count skips.
class CorruptDataError : public std::runtime_error {
 public:
  CorruptDataError(const std::string& message, std::string file, int64_t record, uint64_t offset)
      : std::runtime_error(message), file(std::move(file)), record(record), offset(offset) {}
  std::string file;
  int64_t record;  // -1 when the shard as a whole is bad
  uint64_t offset;
};

// Writes records to `path` through a temporary file; finish() fsyncs and renames it into place, so a
// crash never leaves a partial shard under the final name.
class ShardWriter {
 public:
  explicit ShardWriter(std::string path, Compression compression = Compression::None, int zstd_level = 3);
  ~ShardWriter();  // an unfinished writer removes its temporary file
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;
  void append(const Record& record);
  void finish();
  uint64_t records_written() const { return offsets_.size(); }
  uint64_t bytes_written() const { return position_; }

 private:
  std::string path_, temp_path_;
  Compression compression_;
  int zstd_level_;
  std::unique_ptr<char[]> write_buffer_;  // file_'s stdio buffer (Note [Writing shards in large blocks])
  std::FILE* file_ = nullptr;
  uint64_t position_ = 0;
  std::vector<uint64_t> offsets_, checksums_, sizes_;
};

// When a reader checks a record's checksum (Note [Verifying a mapped record once] in data/shard_reader.cpp).
enum class Verification {
  EveryRead,  // every read of every record: the default
  FirstRead,  // a record read through the mapping: its first read only, until the file's times move
};

// Reads a shard written by ShardWriter. Validates magic, version, footer and index on open, and each
// record's checksum on read (by default on every read; see Verification); errors name the file, the record
// and the byte offset (CorruptDataError for bad bytes, std::runtime_error for a file that cannot be opened
// or read). Reading is thread-safe.
class ShardReader {
 public:
  explicit ShardReader(std::string path, Verification verification = Verification::EveryRead);
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;
  uint64_t size() const { return offsets_.size(); }
  Record read_record(uint64_t index) const;
  // The same record without copying its fields: they view the reader's mapping of the file (plain shards;
  // valid while the reader lives, see Note [Reading shards through a mapping] in data/shard_mapping.cpp) or
  // `buffer` (zstd, or when the file could not be mapped; valid until the buffer's next use). Validates
  // exactly as read_record does. The loader's path: one buffer per thread, so reading allocates nothing once
  // warm.
  RecordView read_view(uint64_t index, RecordBuffer& buffer) const;
  // The same into `result`, whose field vectors are reused: no allocation per record once warm. When it
  // throws, `result` holds fields of no record in particular.
  void read_view(uint64_t index, RecordBuffer& buffer, RecordView& result) const;
  const std::string& path() const { return path_; }
  Compression compression() const { return compression_; }
  uint64_t file_size() const { return file_size_; }
  // Stored bytes of record `index` (what read_record reads from disk).
  uint64_t stored_size(uint64_t index) const;
  // Where record `index` starts in the file (from the index; `index` < size()).
  uint64_t record_offset(uint64_t index) const { return offsets_.at(index); }
  // With Verification::FirstRead a record read through the mapping is checksummed the first time only (Note
  // [Verifying a mapped record once] in data/shard_reader.cpp). This forgets every record's verification when
  // the file's modification or status-change time has moved since the reader opened it or last looked, so
  // that the next read of each record is checksummed again. The loader calls it once per shard per batch.
  // Does nothing with Verification::EveryRead. Thread-safe.
  void recheck_if_modified() const;
  // Asks the CPU to start loading the head of record `index` when it is mapped (a hint; does nothing else).
  void prefetch(uint64_t index) const;
  // Checksums computed by this reader (for tests and metrics).
  uint64_t checksums_computed() const { return checksums_computed_.load(std::memory_order_relaxed); }

 private:
  [[noreturn]] void fail(const std::string& what, int64_t record, uint64_t offset) const;
  std::string path_;
  int fd_ = -1;
  Compression compression_ = Compression::None;
  uint64_t file_size_ = 0, index_offset_ = 0;
  std::vector<uint64_t> offsets_, checksums_, sizes_;
  std::unique_ptr<ShardMapping> mapping_;  // the whole file, or null: records are then read with pread
  // Per mapped record, the generation in which its checksum matched (0: never); a record counts as verified
  // when that equals generation_, which recheck_if_modified() advances when the file changed.
  mutable std::unique_ptr<std::atomic<uint32_t>[]> verified_;
  mutable std::atomic<uint32_t> generation_{1};
  mutable std::mutex stat_mutex_;       // guards the two times below
  mutable timespec mtime_{}, ctime_{};  // the file's, when last looked at
  mutable std::atomic<uint64_t> checksums_computed_{0};
};

}  // namespace vimo::data
