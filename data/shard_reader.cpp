// Implements ShardReader (shard.h): validation on open, reads through a mapping or pread, a checksum per
// record, and the RecordView helpers.
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
#include <stdexcept>
#include <utility>

#include "data/shard.h"
#include "data/shard_layout.h"
#include "data/shard_mapping.h"

namespace vimo::data {

using namespace shard_layout;

namespace {

// Bounds-checked parser over one record's bytes; errors carry the absolute file offset.
// Reads a record's encoding field by field; every failure is a CorruptDataError naming the file, the record
// and the offset. It formats nothing until it fails: it runs once per record on the loader's hot path.
class RecordParser {
 public:
  RecordParser(std::span<const uint8_t> bytes, uint64_t file_offset, const std::string& file, int64_t record)
      : bytes_(bytes), file_offset_(file_offset), file_(file), record_(record) {}

  template <typename T>
  T get(const char* what) {
    T value;
    std::memcpy(&value, take(sizeof(T), what), sizeof(T));
    return value;
  }
  const uint8_t* take(uint64_t count, const char* what) {
    if (count > bytes_.size() - position_) {
      fail(fmt::format("{} needs {} bytes but the record has {} left", what, count,
                       bytes_.size() - position_));
    }
    const uint8_t* p = bytes_.data() + position_;
    position_ += count;
    return p;
  }
  // Offsets inside a compressed record are positions in its decoded bytes, after the record's file offset.
  [[noreturn]] void fail(const std::string& what) const {
    throw CorruptDataError(fmt::format("shard {}: record {} at offset {}: {}; {}", file_, record_,
                                       file_offset_ + position_, what, kRegenerateHint),
                           file_, record_, file_offset_ + position_);
  }
  bool done() const { return position_ == bytes_.size(); }
  uint64_t remaining() const { return bytes_.size() - position_; }

 private:
  std::span<const uint8_t> bytes_;
  uint64_t file_offset_;
  const std::string& file_;
  int64_t record_;
  uint64_t position_ = 0;
};

// Reads exactly `count` bytes at `offset` (pread: no shared file position, so reads are const and
// thread-safe), or throws naming the file, and the record when the bytes are record `record` (else -1).
void read_exactly(int fd, uint64_t offset, void* out, uint64_t count, const std::string& path,
                  const char* what, int64_t record = -1) {
  const uint64_t start = offset;
  const std::string where = record >= 0 ? fmt::format("record {} at offset {}", record, start)
                                        : fmt::format("the {} at offset {}", what, start);
  auto* p = static_cast<uint8_t*>(out);
  while (count > 0) {
    const ssize_t n = ::pread(fd, p, count, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) {
      throw CorruptDataError(fmt::format("shard {}: cannot read {}: unexpected end of file at offset {} (the "
                                         "file is truncated); {}",
                                         path, where, offset, kRegenerateHint),
                             path, record, start);
    }
    if (n < 0) {
      throw std::runtime_error(
          fmt::format("shard {}: cannot read {}: {}", path, where, std::strerror(errno)));
    }
    p += n;
    offset += static_cast<uint64_t>(n);
    count -= static_cast<uint64_t>(n);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// ShardReader

void ShardReader::fail(const std::string& what, int64_t record, uint64_t offset) const {
  const std::string where =
      record >= 0 ? fmt::format("shard {}: record {}", path_, record) : fmt::format("shard {}:", path_);
  throw CorruptDataError(fmt::format("{} at offset {}: {}; {}", where, offset, what, kRegenerateHint), path_,
                         record, offset);
}

ShardReader::ShardReader(std::string path, Verification verification) : path_(std::move(path)) {
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    throw std::runtime_error(
        fmt::format("shard {}: cannot open: {}. HINT: check the path, or regenerate the dataset", path_,
                    std::strerror(errno)));
  }
  // The constructor owns fd_ from here on; a throw below must close it since the destructor won't run.
  try {
    const off_t end = ::lseek(fd_, 0, SEEK_END);
    if (end < 0)
      throw std::runtime_error(fmt::format("shard {}: cannot seek: {}", path_, std::strerror(errno)));
    file_size_ = static_cast<uint64_t>(end);
    if (file_size_ < kHeaderSize + kFooterSize) {
      fail(fmt::format("the file is {} bytes, expected at least {} (header + footer): it is truncated",
                       file_size_, kHeaderSize + kFooterSize),
           -1, file_size_);
    }

    char header[kHeaderSize];
    read_exactly(fd_, 0, header, kHeaderSize, path_, "header");
    if (std::memcmp(header, kShardMagic, sizeof(kShardMagic)) != 0) {
      fail(fmt::format("bad magic (expected \"VIMOSHRD\", found \"{}\"): this is not a vimo shard",
                       printable_magic(header)),
           -1, 0);
    }
    uint32_t version = 0;
    std::memcpy(&version, header + sizeof(kShardMagic), sizeof(version));
    if (version != kShardVersion) {
      fail(fmt::format("unsupported version (expected {}, found {}). HINT: re-import or regenerate the "
                       "dataset with this vimo build",
                       kShardVersion, version),
           -1, 8);
    }
    uint16_t compression = 0;
    std::memcpy(&compression, header + 12, sizeof(compression));
    if (compression > static_cast<uint16_t>(Compression::Zstd)) {
      fail(fmt::format("unknown compression code {} (expected 0 = none or 1 = zstd)", compression), -1, 12);
    }
    compression_ = static_cast<Compression>(compression);

    const uint64_t footer_offset = file_size_ - kFooterSize;
    char footer[kFooterSize];
    read_exactly(fd_, footer_offset, footer, kFooterSize, path_, "footer");
    uint64_t record_count = 0;
    std::memcpy(&record_count, footer, sizeof(uint64_t));
    std::memcpy(&index_offset_, footer + sizeof(uint64_t), sizeof(uint64_t));
    if (std::memcmp(footer + 2 * sizeof(uint64_t), kShardMagic, sizeof(kShardMagic)) != 0) {
      fail(fmt::format("bad footer magic (expected \"VIMOSHRD\", found \"{}\"): the file is truncated or "
                       "corrupt",
                       printable_magic(footer + 2 * sizeof(uint64_t))),
           -1, footer_offset + 2 * sizeof(uint64_t));
    }
    // The index must sit exactly between the records and the footer.
    const uint64_t max_records = (footer_offset - kHeaderSize) / kIndexEntrySize;
    if (record_count > max_records || index_offset_ < kHeaderSize || index_offset_ > footer_offset ||
        footer_offset - index_offset_ != record_count * kIndexEntrySize) {
      fail(fmt::format("the footer says {} records with the index at offset {}, which does not end at the "
                       "footer (offset {})",
                       record_count, index_offset_, footer_offset),
           -1, footer_offset);
    }

    std::vector<uint64_t> index(3 * record_count);
    if (record_count)
      read_exactly(fd_, index_offset_, index.data(), record_count * kIndexEntrySize, path_, "index");
    const auto n = static_cast<std::ptrdiff_t>(record_count);
    offsets_.assign(index.begin(), index.begin() + n);
    checksums_.assign(index.begin() + n, index.begin() + 2 * n);
    sizes_.assign(index.begin() + 2 * n, index.end());
    for (uint64_t i = 0; i < record_count; ++i) {
      // Records are back to back from the header on, each stored in at least one byte.
      const uint64_t expected_first = kHeaderSize;
      if ((i == 0 && offsets_[0] != expected_first) || (i > 0 && offsets_[i] <= offsets_[i - 1]) ||
          offsets_[i] >= index_offset_) {
        fail(fmt::format(
                 "index entry {} points to offset {}, outside the records region [{}, {}) or not after "
                 "the previous record",
                 i, offsets_[i], kHeaderSize, index_offset_),
             static_cast<int64_t>(i), index_offset_ + i * sizeof(uint64_t));
      }
    }
    for (uint64_t i = 0; i < record_count; ++i) {
      // An uncompressed record's encoding is its stored bytes. A compressed one is bounded by what zstd can
      // expand to, so a corrupt or crafted size cannot make the reader allocate more than the bytes on disk
      // justify: the smallest zstd block (3-byte header + 1 RLE byte) decodes to at most 128 KiB, so a frame
      // expands at most kMaxZstdExpansion times (plus the frame header's few bytes).
      const uint64_t stored = stored_size(i);
      if ((compression_ == Compression::None && sizes_[i] != stored) || sizes_[i] < sizeof(uint32_t) ||
          sizes_[i] / kMaxZstdExpansion > stored) {
        fail(fmt::format(
                 "index says the record's encoding is {} bytes, which does not fit its {} stored bytes",
                 sizes_[i], stored_size(i)),
             static_cast<int64_t>(i), index_offset_ + (2 * record_count + i) * sizeof(uint64_t));
      }
    }
    // Records are read through a mapping when one can be made (Note [Reading shards through a mapping]).
    mapping_ = std::make_unique<ShardMapping>(fd_, file_size_, path_);
    if (mapping_->data() == nullptr) {
      mapping_.reset();
    } else if (verification == Verification::FirstRead) {
      verified_ = std::make_unique<std::atomic<uint32_t>[]>(record_count);  // value-initialized: 0
      struct stat st {};
      if (::fstat(fd_, &st) != 0)
        throw std::runtime_error(fmt::format("shard {}: cannot stat: {}", path_, std::strerror(errno)));
      mtime_ = st.st_mtim;
      ctime_ = st.st_ctim;
    }
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

ShardReader::~ShardReader() {
  if (fd_ >= 0) ::close(fd_);
}

uint64_t ShardReader::stored_size(uint64_t index) const {
  const uint64_t end = index + 1 < offsets_.size() ? offsets_[index + 1] : index_offset_;
  return end - offsets_[index];
}

RecordView ShardReader::read_view(uint64_t index, RecordBuffer& buffer) const {
  RecordView result;
  read_view(index, buffer, result);
  return result;
}

void ShardReader::read_view(uint64_t index, RecordBuffer& buffer, RecordView& result) const {
  if (index >= offsets_.size()) {
    throw std::runtime_error(fmt::format("shard {}: record {} requested, but the shard has {} records", path_,
                                         index, offsets_.size()));
  }
  const uint64_t begin = offsets_[index];
  const auto record = static_cast<int64_t>(index);
  // The stored bytes: in the mapping when there is one; otherwise read, a plain record straight into
  // `buffer` and a compressed one into this thread's scratch. Buffers are not zero-filled: pread and zstd
  // overwrite every byte (or we throw).
  std::span<const uint8_t> stored;
  if (mapping_) {
    stored = std::span<const uint8_t>(mapping_->data() + begin, stored_size(index));
  } else {
    thread_local RecordBuffer compressed;
    RecordBuffer& target = compression_ == Compression::Zstd ? compressed : buffer;
    target.resize(stored_size(index));
    read_exactly(fd_, begin, target.data(), target.size(), path_, "record", record);
    stored = std::span<const uint8_t>(target.data(), target.size());
  }
  // Note [Verifying a mapped record once]: by default (Verification::EveryRead) every read of a record is
  // checksummed. With Verification::FirstRead (`data.verify: first_read`), a record read through the mapping
  // is checksummed the first time this reader reads it, and later reads (the next epochs: the loader keeps
  // its shards open across epochs) skip the hash. That is where a later epoch spends most of its time: xxh3
  // over a record read from memory costs as much as read() copying it (`vimo bench data`: read() + xxh3 at
  // 0.43-0.54x of read() alone). The price is what it no longer catches. A later read returns the bytes that
  // matched only while nothing changed them:
  //   - a write to the file in place moves its modification and status-change times, which the loader looks
  //     at once per shard per batch (recheck_if_modified); every record is then checksummed again. It can
  //     miss a write in the same tick of the file system's clock as the change it last saw, a write that
  //     NFS's attribute cache hides for a while, and a write that lands after a batch's look reaches the
  //     batches already being read;
  //   - pages the kernel dropped (memory pressure, a dataset larger than memory, a network file system
  //     invalidating its cache) are read from storage again, and a fault of the storage or the network on
  //     that read is not caught.
  // That is why it is not the default: MosaicML streaming likewise checks a shard's hash once, when it
  // downloads it, for the speed. A shrinking file is caught by the mapping's SIGBUS guard either way.
  // Records read with pread (no mapping) are always checksummed. Generations rather than flags: a reader
  // that verified a record in an old generation, while another thread started a new one, does not mark it
  // verified in the new one.
  const uint32_t generation = generation_.load(std::memory_order_acquire);
  const bool verified = verified_ && verified_[index].load(std::memory_order_relaxed) == generation;
  if (!verified) {
    checksums_computed_.fetch_add(1, std::memory_order_relaxed);
    const uint64_t checksum = XXH3_64bits(stored.data(), stored.size());
    if (checksum != checksums_[index]) {
      fail(fmt::format("checksum mismatch (expected {}, found {})", hex(checksums_[index]), hex(checksum)),
           record, begin);
    }
  }
  if (compression_ == Compression::Zstd) {
    const unsigned long long content = ZSTD_getFrameContentSize(stored.data(), stored.size());
    if (content != sizes_[index]) {
      fail(fmt::format("the zstd frame holds {} bytes, the index says {}",
                       content == ZSTD_CONTENTSIZE_UNKNOWN || content == ZSTD_CONTENTSIZE_ERROR
                           ? std::string("an unknown number of")
                           : std::to_string(content),
                       sizes_[index]),
           record, begin);
    }
    buffer.resize(sizes_[index]);
    // One decompression context per thread: ZSTD_decompress would create and free one per record.
    thread_local const std::unique_ptr<ZSTD_DCtx, decltype(&ZSTD_freeDCtx)> context(ZSTD_createDCtx(),
                                                                                    &ZSTD_freeDCtx);
    const size_t n =
        ZSTD_decompressDCtx(context.get(), buffer.data(), buffer.size(), stored.data(), stored.size());
    if (ZSTD_isError(n) || n != buffer.size()) {
      fail(fmt::format("zstd cannot decode the record: {}",
                       ZSTD_isError(n) ? ZSTD_getErrorName(n) : "short frame"),
           record, begin);
    }
  }

  const std::span<const uint8_t> bytes =
      compression_ == Compression::Zstd ? std::span<const uint8_t>(buffer.data(), buffer.size()) : stored;
  RecordParser parser(bytes, begin, path_, record);
  const auto field_count = parser.get<uint32_t>("field count");
  // Each field takes at least 12 bytes (name length, dtype, rank, byte count): bound the reservation.
  if (field_count > parser.remaining() / 12) {
    parser.fail(
        fmt::format("field count {} does not fit in the record's {} bytes", field_count, bytes.size()));
  }
  // resize, not clear + push_back: a reused `result` keeps its fields' shape vectors and their capacity.
  result.fields.resize(field_count);
  for (uint32_t f = 0; f < field_count; ++f) {
    FieldView& field = result.fields[f];
    const auto name_length = parser.get<uint16_t>("field name length");
    const uint8_t* name = parser.take(name_length, "field name");
    field.name = std::string_view(reinterpret_cast<const char*>(name), name_length);
    for (uint32_t earlier = 0; earlier < f; ++earlier) {  // a handful of fields: no set needed
      if (result.fields[earlier].name == field.name) {
        parser.fail(fmt::format("field '{}' appears twice (fields {} and {})", field.name, earlier, f));
      }
    }
    const auto dtype = parser.get<uint8_t>("dtype");
    if (!valid_dtype(dtype))
      parser.fail(fmt::format("field '{}': unknown dtype code {} (expected 1-7)", field.name, dtype));
    field.dtype = static_cast<DType>(dtype);
    const auto rank = parser.get<uint8_t>("rank");
    field.shape.resize(rank);
    for (int64_t& extent : field.shape) extent = parser.get<int64_t>("shape");
    const auto byte_count = parser.get<uint64_t>("byte count");
    uint64_t expected = 0;
    try {
      expected = checked_byte_count(field.shape, field.dtype, "");  // named below, only when it fails
    } catch (const std::runtime_error& e) {
      parser.fail(fmt::format("field '{}'{}", field.name, e.what()));
    }
    if (byte_count != expected) {
      parser.fail(fmt::format("field '{}': byte count {} does not match its shape (expected {})", field.name,
                              byte_count, expected));
    }
    field.bytes = std::span<const uint8_t>(parser.take(byte_count, "field data"), byte_count);
  }
  if (!parser.done()) parser.fail(fmt::format("{} trailing bytes after the last field", parser.remaining()));
  if (verified_ && !verified) verified_[index].store(generation, std::memory_order_relaxed);
}

void ShardReader::prefetch(uint64_t index) const {
  if (!mapping_ || index >= offsets_.size()) return;
  const uint8_t* head = mapping_->data() + offsets_[index];
  for (int line = 0; line < 16; ++line) __builtin_prefetch(head + 64 * line);
}

void ShardReader::recheck_if_modified() const {
  if (!verified_) return;
  struct stat st {};
  if (::fstat(fd_, &st) != 0)
    throw std::runtime_error(fmt::format("shard {}: cannot stat: {}", path_, std::strerror(errno)));
  const auto same = [](const timespec& a, const timespec& b) {
    return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec;
  };
  std::lock_guard<std::mutex> lock(stat_mutex_);
  if (same(st.st_mtim, mtime_) && same(st.st_ctim, ctime_)) return;
  mtime_ = st.st_mtim;
  ctime_ = st.st_ctim;
  generation_.fetch_add(1, std::memory_order_acq_rel);
}

Record ShardReader::read_record(uint64_t index) const {
  RecordBuffer buffer;
  const RecordView view = read_view(index, buffer);
  Record result;
  result.fields.reserve(view.fields.size());
  for (const FieldView& v : view.fields) {
    Field field;
    field.name = std::string(v.name);
    field.dtype = v.dtype;
    field.shape = v.shape;
    field.bytes.assign(v.bytes.begin(), v.bytes.end());
    result.fields.push_back(std::move(field));
  }
  return result;
}

const FieldView* RecordView::find(std::string_view name) const {
  for (const FieldView& field : fields) {
    if (field.name == name) return &field;
  }
  return nullptr;
}

RecordView RecordView::of(const Record& record) {
  RecordView view;
  view.fields.reserve(record.fields.size());
  for (const Field& field : record.fields) {
    view.fields.push_back({field.name, field.dtype, field.shape, std::span<const uint8_t>(field.bytes)});
  }
  return view;
}

}  // namespace vimo::data
