// libFuzzer target for the shard reader (data/shard_reader.cpp): any file must either open and yield records whose
// fields' byte counts match their shapes, or throw (CorruptDataError, std::runtime_error); never crash, read
// out of bounds, leak or allocate far beyond the file's size. Built standalone by tests/fuzz/run_fuzz.sh.
//
// ShardReader takes a path, so each input is written to a per-process temporary file (under $TMPDIR, else
// /dev/shm) and read back. Every input is tried twice: as given, and with the index's checksums recomputed
// over the record bytes they cover (see Note [Repaired checksums]).
#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "data/shard.h"

namespace {

constexpr size_t kHeaderSize = 16, kFooterSize = 24;

// The per-process temporary file, removed when the fuzzer exits normally.
struct TempFile {
  std::string path;
  TempFile() {
    const char* tmpdir = std::getenv("TMPDIR");
    const std::string dir = tmpdir && *tmpdir ? tmpdir : "/dev/shm";
    path = dir + "/vimo_fuzz_shard_" + std::to_string(::getpid()) + ".bin";
  }
  ~TempFile() { ::unlink(path.c_str()); }
  void write(const uint8_t* data, size_t size) const {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
      std::perror(path.c_str());
      std::abort();  // a harness failure, not a finding: the temp dir must be writable
    }
    size_t done = 0;
    while (done < size) {
      const ssize_t n = ::write(fd, data + done, size - done);
      if (n <= 0) {
        std::perror(path.c_str());
        std::abort();
      }
      done += static_cast<size_t>(n);
    }
    ::close(fd);
  }
};

uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Note [Repaired checksums]: a mutation of a record's bytes almost always breaks its xxh3 checksum, and the
// reader then stops before the record parser and the zstd path. When the footer and index are well formed,
// this copy of the input gets every checksum recomputed over the bytes between its offset and the next
// record (or the index), so mutations reach the code behind the checksum.
bool repair_checksums(std::vector<uint8_t>& file) {
  if (file.size() < kHeaderSize + kFooterSize) return false;
  const size_t footer = file.size() - kFooterSize;
  const uint64_t count = load64(&file[footer]), index = load64(&file[footer + 8]);
  if (index < kHeaderSize || index > footer || count > (footer - index) / 24 ||
      footer - index != count * 24) {
    return false;
  }
  bool changed = false;
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t begin = load64(&file[index + 8 * i]);
    const uint64_t end = i + 1 < count ? load64(&file[index + 8 * (i + 1)]) : index;
    if (begin < kHeaderSize || begin > end || end > index) continue;
    const uint64_t checksum = XXH3_64bits(&file[begin], end - begin);
    uint8_t* slot = &file[index + 8 * (count + i)];
    if (load64(slot) != checksum) {
      std::memcpy(slot, &checksum, sizeof(checksum));
      changed = true;
    }
  }
  return changed;
}

void read_everything(const TempFile& file, size_t input_size) {
  try {
    const vimo::data::ShardReader reader(file.path);
    for (uint64_t i = 0; i < reader.size(); ++i) {
      try {
        const vimo::data::Record record = reader.read_record(i);
        for (const vimo::data::Field& field : record.fields) {
          // The reader promises bytes == product(shape) * dtype_size; no decoded field can be larger than
          // what zstd could expand the whole file into.
          uint64_t expected = vimo::data::dtype_size(field.dtype);
          for (const int64_t extent : field.shape) expected *= static_cast<uint64_t>(extent);
          if (field.bytes.size() != expected) std::abort();
          if (reader.compression() == vimo::data::Compression::None && field.bytes.size() > input_size)
            std::abort();
        }
      } catch (const std::exception&) {  // a bad record; the next one may still be good
      }
    }
  } catch (const std::exception&) {  // the shard as a whole is bad
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const TempFile file;
  file.write(data, size);
  read_everything(file, size);

  std::vector<uint8_t> repaired(data, data + size);
  if (repair_checksums(repaired)) {
    file.write(repaired.data(), repaired.size());
    read_everything(file, size);
  }
  return 0;
}
