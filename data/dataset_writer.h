// Defines DatasetWriter, which packs records into a dataset directory: size-limited shards per split, each
// finalized atomically, plus extra files, and the dataset manifest written last. Every importer and
// `vimo data pack` write through it. The layout is documented in data/FORMAT.md:
//   <dir>/manifest.json             written by finish(), after every shard and extra file is in place
//   <dir>/<split>/shard_00000.bin   shards of one split, in order
//   <dir>/<name>                    extra files (vocab.txt, mean.npy, tokenizer.model, ...)
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/manifest.h"
#include "data/shard.h"

namespace vimo::data {

struct DatasetWriterOptions {
  uint64_t max_shard_bytes = 256ull << 20;  // a shard is closed once it reaches this many bytes
  uint64_t max_shard_records = 0;           // ... or this many records (0: no record limit)
  Compression compression = Compression::None;
  int zstd_level = 3;
};

class DatasetWriter {
 public:
  // `kind` names the record schema ("retrieval", "motion", ...); it goes into the manifest and loaders check
  // it. Shards of an earlier dataset in `dir` are replaced; the old manifest is removed first so a crash
  // never leaves a manifest that lists shards of two runs.
  DatasetWriter(std::string dir, std::string kind, DatasetWriterOptions options = {});
  ~DatasetWriter();  // an unfinished writer leaves no manifest (and no partial shard under a final name)
  DatasetWriter(const DatasetWriter&) = delete;
  DatasetWriter& operator=(const DatasetWriter&) = delete;

  // Appends to `split` (created on first use), opening a new shard when the current one is full.
  void append(const std::string& split, const Record& record);
  // Writes `<dir>/<name>` atomically now and lists it (size and hash) in the manifest.
  void add_file(const std::string& name, const std::string& bytes);
  // Free-form metadata stored under "metadata" in the manifest (importer options, dimensions, ...).
  void set_metadata(const std::string& key, nlohmann::json value);
  // Closes every split's last shard, fsyncs, and writes manifest.json last (temp + fsync + rename).
  void finish();

  uint64_t records(const std::string& split) const;

 private:
  struct Split;
  void close_shard(Split& split);
  std::string dir_, kind_;
  DatasetWriterOptions options_;
  std::map<std::string, std::unique_ptr<Split>> splits_;
  std::map<std::string, FileEntry> files_;
  nlohmann::json metadata_ = nlohmann::json::object();
  bool finished_ = false;
};

}  // namespace vimo::data
