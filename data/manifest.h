// Defines the dataset manifest (`<dir>/manifest.json`, data/FORMAT.md): the splits with their shards'
// record counts, sizes and hashes, the extra files, and the importer's metadata; reading it with errors that
// name the key, and verifying the files on disk against it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace vimo::data {

inline constexpr const char* kManifestFormat = "vimo-dataset";
inline constexpr int kManifestVersion = 1;

// One finished shard.
struct ShardEntry {
  std::string file;      // relative to the split directory, e.g. "shard_00000.bin"
  uint64_t records = 0;  // record count
  uint64_t bytes = 0;    // file size
  std::string xxh3;      // xxh3-64 of the whole file, 16 hex digits
};

// An extra file at the dataset root (vocabulary, normalization statistics, tokenizer model).
struct FileEntry {
  uint64_t bytes = 0;
  std::string xxh3;
};

struct SplitManifest {
  uint64_t records = 0;
  std::vector<ShardEntry> shards;
};

struct DatasetManifest {
  std::string dir;   // where it was read from
  std::string kind;  // record schema: "retrieval", "motion", ...
  uint32_t shard_version = 0;
  std::map<std::string, SplitManifest> splits;
  std::map<std::string, FileEntry> files;
  nlohmann::json metadata = nlohmann::json::object();

  // Throws naming the dataset and the splits it has.
  const SplitManifest& split(const std::string& name) const;
  std::string shard_path(const std::string& split_name, size_t shard) const;
  std::string file_path(const std::string& name) const;  // throws unless listed
  nlohmann::json to_json() const;
};

// Reads and checks `<dir>/manifest.json`: format, version, kind, and that each split's record count is the
// sum of its shards'. Errors name the file and the JSON key path (e.g. "splits.train.shards[3].records").
DatasetManifest read_manifest(const std::string& dir);

// Writes `content` to `path` through `path.tmp`, fsync, rename and a directory fsync, so a crash leaves
// either the old file or the new one.
void write_file_atomically(const std::string& path, const std::string& content);

// xxh3-64 of a whole file, as 16 lowercase hex digits (streamed in 1 MiB blocks).
std::string file_xxh3(const std::string& path);

// Checks every shard and extra file against the manifest: present, same size, and (when `hashes`) same
// xxh3; shards also open and hold the listed record count. Throws on the first mismatch, naming the file and
// what differs. `progress(done, total)` is called after each file when given.
void verify_dataset(const DatasetManifest& manifest, bool hashes,
                    const std::function<void(size_t, size_t)>& progress = {});

}  // namespace vimo::data
