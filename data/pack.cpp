// Implements repack_dataset: a ShardReader per input shard, one DatasetWriter for the output.
#include "data/pack.h"

#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>

#include "data/manifest.h"
#include "data/shard.h"

namespace vimo::data {

namespace fs = std::filesystem;

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
  for (const auto& [name, entry] : manifest.files) {
    std::ifstream in(manifest.file_path(name), std::ios::binary);
    writer.add_file(name, std::string(std::istreambuf_iterator<char>(in), {}));
  }
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
