// Implements repack_dataset: a ShardReader per input shard, one DatasetWriter for the output.
#include "data/pack.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>

#include "data/manifest.h"
#include "data/shard.h"

namespace vimo::data {

namespace fs = std::filesystem;

namespace {

// The bytes of the source's extra file `name`, checked against what its manifest lists: a copy must not turn
// a file that cannot be read, or one damaged since, into a freshly hashed one that verifies.
std::string checked_extra_file(const DatasetManifest& manifest, const std::string& name,
                               const FileEntry& entry) {
  const std::string path = manifest.file_path(name);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw std::runtime_error(fmt::format("vimo data pack: cannot open {}: {}", path, std::strerror(errno)));
  }
  std::string bytes(std::istreambuf_iterator<char>(in), {});
  if (in.bad()) {
    throw std::runtime_error(fmt::format("vimo data pack: cannot read {}: {}", path, std::strerror(errno)));
  }
  const std::string hash = fmt::format("{:016x}", XXH3_64bits(bytes.data(), bytes.size()));
  if (bytes.size() != entry.bytes || hash != entry.xxh3) {
    throw std::runtime_error(fmt::format(
        "vimo data pack: {} holds {} bytes with xxh3 {}, but the manifest of {} lists {} bytes with xxh3 {}: "
        "the source dataset is damaged. HINT: restore the file or import the dataset again",
        path, bytes.size(), hash, manifest.dir, entry.bytes, entry.xxh3));
  }
  return bytes;
}

}  // namespace

PackReport repack_dataset(const std::string& source, const std::string& out,
                          const DatasetWriterOptions& options,
                          const std::function<void(uint64_t, uint64_t)>& progress) {
  std::error_code error;
  if (fs::equivalent(source, out, error)) {
    throw std::runtime_error(
        fmt::format("vimo data pack: the output {} is the source dataset; choose another "
                    "directory",
                    out));
  }
  const DatasetManifest manifest = read_manifest(source);
  verify_dataset(manifest, /*hashes=*/false);  // sizes and record counts before a long copy
  PackReport report;
  uint64_t total = 0;
  for (const auto& [name, split] : manifest.splits) total += split.records;
  DatasetWriter writer(out, manifest.kind, options);
  for (const auto& [name, split] : manifest.splits) {
    for (size_t s = 0; s < split.shards.size(); ++s) {
      const ShardReader reader(manifest.shard_path(name, s));
      for (uint64_t i = 0; i < reader.size(); ++i) {
        writer.append(name, reader.read_record(i));
        if (progress && ++report.records % 4096 == 0) progress(report.records, total);
      }
      report.shards_in += 1;
      report.bytes_in += reader.file_size();
    }
  }
  report.records = total;
  for (const auto& [name, entry] : manifest.files)
    writer.add_file(name, checked_extra_file(manifest, name, entry));
  for (const auto& [key, value] : manifest.metadata.items()) writer.set_metadata(key, value);
  writer.finish();
  const DatasetManifest written = read_manifest(out);
  for (const auto& [name, split] : written.splits) {
    report.shards_out += split.shards.size();
    for (const ShardEntry& shard : split.shards) report.bytes_out += shard.bytes;
  }
  return report;
}

}  // namespace vimo::data
