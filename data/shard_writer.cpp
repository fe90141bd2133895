// Implements ShardWriter (shard.h): records appended to a temporary file, published atomically.
#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>
#include <xxhash.h>
#include <zstd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <stdexcept>
#include <utility>

#include "data/shard.h"
#include "data/shard_layout.h"

namespace vimo::data {

using namespace shard_layout;

namespace {

// Note [Writing shards in large blocks]: the writer hands the kernel 1 MiB at a time (a stdio buffer of its
// own; glibc's default is one 4 KiB block, so each ~20 KB record went out as its own write()). Besides fewer
// syscalls, the size of the writes decides the size of the folios that the page cache keeps the new file
// in, and that decides what every later reader of the cached file pays (kernel 6.18, ext4, an 80 MB file
// read whole with read() and mapped and checksummed in 20 KB records in a shuffled order, a standalone test):
//   written in 4 KiB / 20 KB writes: read() 12-16 ms; the first pass through a fresh mapping 14-15 ms,
//                                    a second 9-12 ms; munmap 2.5-7 ms
//   written in 1 MiB writes:         read() 4-7 ms; first pass 9 ms, second 8.5-8.7 ms; munmap 0.4 ms
// With large folios a fresh mapping costs almost nothing over reading mapped memory (the loader's first
// epoch), and unmapping is 6-15x cheaper. A file that reaches the page cache from disk through readahead
// gets large folios the same way.
constexpr size_t kWriteBufferBytes = size_t{1} << 20;

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// ShardWriter

namespace {

// The record's encoding: field count, then per field its name, dtype, shape, byte count and bytes.
std::vector<uint8_t> encode_record(const Record& record, const std::string& context) {
  std::vector<uint8_t> bytes;
  put<uint32_t>(bytes, static_cast<uint32_t>(record.fields.size()));
  for (size_t f = 0; f < record.fields.size(); ++f) {
    const Field& field = record.fields[f];
    const std::string where = fmt::format("{}: field '{}'", context, field.name);
    for (size_t earlier = 0; earlier < f; ++earlier) {
      if (record.fields[earlier].name == field.name) {
        throw std::runtime_error(fmt::format(
            "{} appears twice (fields {} and {}): names must be unique in a record", where, earlier, f));
      }
    }
    if (field.name.size() > std::numeric_limits<uint16_t>::max()) {
      throw std::runtime_error(where + ": the name is longer than 65535 bytes");
    }
    if (!valid_dtype(static_cast<uint8_t>(field.dtype))) {
      throw std::runtime_error(
          fmt::format("{}: unknown dtype code {}", where, static_cast<int>(field.dtype)));
    }
    if (field.shape.size() > std::numeric_limits<uint8_t>::max()) {
      throw std::runtime_error(fmt::format("{}: rank {} exceeds 255", where, field.shape.size()));
    }
    const uint64_t expected = checked_byte_count(field.shape, field.dtype, where);
    if (expected != field.bytes.size()) {
      throw std::runtime_error(
          fmt::format("{}: shape needs {} bytes, found {}", where, expected, field.bytes.size()));
    }
    put<uint16_t>(bytes, static_cast<uint16_t>(field.name.size()));
    bytes.insert(bytes.end(), field.name.begin(), field.name.end());
    put<uint8_t>(bytes, static_cast<uint8_t>(field.dtype));
    put<uint8_t>(bytes, static_cast<uint8_t>(field.shape.size()));
    for (const int64_t extent : field.shape) put<int64_t>(bytes, extent);
    put<uint64_t>(bytes, field.bytes.size());
    bytes.insert(bytes.end(), field.bytes.begin(), field.bytes.end());
  }
  return bytes;
}

}  // namespace

ShardWriter::ShardWriter(std::string path, Compression compression, int zstd_level)
    : path_(std::move(path)), temp_path_(path_ + ".tmp"), compression_(compression), zstd_level_(zstd_level) {
  if (compression != Compression::None && compression != Compression::Zstd) {
    throw std::runtime_error(
        fmt::format("shard {}: unknown compression code {}", path_, static_cast<int>(compression)));
  }
  file_ = std::fopen(temp_path_.c_str(), "wb");
  if (!file_) {
    throw std::runtime_error(
        fmt::format("shard {}: cannot create {}: {}. HINT: check that the directory exists "
                    "and is writable",
                    path_, temp_path_, std::strerror(errno)));
  }
  write_buffer_ = std::make_unique<char[]>(kWriteBufferBytes);
  if (std::setvbuf(file_, write_buffer_.get(), _IOFBF, kWriteBufferBytes) != 0) {
    write_buffer_.reset();  // stdio keeps its own buffer; only slower
  }
  std::vector<uint8_t> header(kShardMagic, kShardMagic + sizeof(kShardMagic));
  put<uint32_t>(header, kShardVersion);
  put<uint16_t>(header, static_cast<uint16_t>(compression));
  put<uint16_t>(header, 0);  // reserved
  if (std::fwrite(header.data(), 1, header.size(), file_) != header.size()) {
    const std::string error = std::strerror(errno);
    std::fclose(file_);
    file_ = nullptr;
    std::remove(temp_path_.c_str());
    throw std::runtime_error(fmt::format("shard {}: cannot write the header: {}", path_, error));
  }
  position_ = header.size();
}

ShardWriter::~ShardWriter() {
  if (file_) {
    std::fclose(file_);
    std::remove(temp_path_.c_str());
  }
}

void ShardWriter::append(const Record& record) {
  if (!file_) throw std::runtime_error(fmt::format("shard {}: append after finish()", path_));
  const std::string context = fmt::format("shard {}: record {}", path_, offsets_.size());
  const std::vector<uint8_t> encoded = encode_record(record, context);
  std::vector<uint8_t> compressed;
  const std::vector<uint8_t>* stored = &encoded;
  if (compression_ == Compression::Zstd) {
    compressed.resize(ZSTD_compressBound(encoded.size()));
    const size_t n =
        ZSTD_compress(compressed.data(), compressed.size(), encoded.data(), encoded.size(), zstd_level_);
    if (ZSTD_isError(n)) {
      throw std::runtime_error(fmt::format("{}: zstd compression failed: {}", context, ZSTD_getErrorName(n)));
    }
    compressed.resize(n);
    stored = &compressed;
  }
  if (std::fwrite(stored->data(), 1, stored->size(), file_) != stored->size()) {
    // Buffered: the write that failed may hold this record and the ones before it (up to 1 MiB).
    throw std::runtime_error(fmt::format("{}: write failed (this record or the ones buffered before it): {}",
                                         context, std::strerror(errno)));
  }
  offsets_.push_back(position_);
  checksums_.push_back(XXH3_64bits(stored->data(), stored->size()));
  sizes_.push_back(encoded.size());
  position_ += stored->size();
}

// Note [Atomic shard publication]: the shard is written under `path.tmp`, flushed and fsync'ed, then
// renamed. rename() within one directory is atomic on POSIX, so readers see either no shard or a complete
// one; the directory is fsync'ed afterwards so the rename itself survives a power loss.
void ShardWriter::finish() {
  if (!file_) throw std::runtime_error(fmt::format("shard {}: finish() called twice", path_));
  const uint64_t index_offset = position_;
  std::vector<uint8_t> tail;
  tail.reserve(offsets_.size() * kIndexEntrySize + kFooterSize);
  for (const uint64_t offset : offsets_) put<uint64_t>(tail, offset);
  for (const uint64_t checksum : checksums_) put<uint64_t>(tail, checksum);
  for (const uint64_t size : sizes_) put<uint64_t>(tail, size);
  put<uint64_t>(tail, offsets_.size());
  put<uint64_t>(tail, index_offset);
  tail.insert(tail.end(), kShardMagic, kShardMagic + sizeof(kShardMagic));
  const bool written = std::fwrite(tail.data(), 1, tail.size(), file_) == tail.size() &&
                       std::fflush(file_) == 0 && ::fsync(::fileno(file_)) == 0;
  const std::string error = written ? "" : std::strerror(errno);
  const bool closed = std::fclose(file_) == 0;
  file_ = nullptr;
  if (!written || !closed) {
    std::remove(temp_path_.c_str());
    throw std::runtime_error(fmt::format("shard {}: cannot write the index and footer: {}", path_,
                                         written ? "close failed" : error));
  }
  position_ += tail.size();
  if (std::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    const std::string rename_error = std::strerror(errno);
    std::remove(temp_path_.c_str());
    throw std::runtime_error(
        fmt::format("shard {}: cannot rename {} into place: {}", path_, temp_path_, rename_error));
  }
  const std::filesystem::path parent = std::filesystem::path(path_).parent_path();
  const std::string dir = parent.empty() ? std::string(".") : parent.string();
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

}  // namespace vimo::data
