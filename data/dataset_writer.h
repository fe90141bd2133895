// Defines DatasetWriter, which packs records into a dataset directory: size-limited shards per split, each
// finalized atomically, plus extra files, and the dataset manifest written last. Every importer and
// `vimo data pack` write through it. The layout is documented in data/FORMAT.md:
//   <dir>/manifest.json             written by finish(), after every shard and extra file is in place
//   <dir>/<split>/shard_00000.bin   shards of one split, in order
//   <dir>/<name>                    extra files (vocab.txt, mean.npy, tokenizer.model, ...)
//
// Note [Replacing a dataset directory]: everything is written into the hidden sibling `.<dir>.vimo-tmp`, and
// finish() swaps that whole directory in for <dir> with one renameat2(RENAME_EXCHANGE) (on a filesystem
// without it, NFS or Lustre: <dir> is renamed to `.<dir>.vimo-old`, the new one to <dir>, and the old one is
// deleted). So an import that fails on bad input half-way, or is killed, leaves a dataset already in <dir>
// whole and verifiable (an importer used to delete the old manifest first, and a junk input file destroyed a
// good dataset). With the exchange, <dir> holds the old dataset or the new one at every instant; with two
// renames there is a moment with no <dir>, and a crash in it leaves the old dataset as `.vimo-old`, which the
// next writer for <dir> renames back (readers do not look for it). The next writer also deletes a leftover
// `.vimo-tmp`; the old copy is renamed out of sight before it is deleted, so no half-deleted copy is put
// back. A mount point cannot be swapped: a writer refuses one at the start. The swap replaces the whole
// directory, so a writer refuses at once a <dir> that holds anything besides a dataset (files its manifest
// does not list, or no manifest at all): it would delete them. One writer per directory at a time.
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
  // it. `dir` may be new, empty, or hold a dataset, which finish() replaces as a whole (Note [Replacing a
  // dataset directory]); anything else there is refused with an error naming it.
  DatasetWriter(std::string dir, std::string kind, DatasetWriterOptions options = {});
  ~DatasetWriter();  // an unfinished writer deletes what it wrote and leaves `dir` as it found it
  DatasetWriter(const DatasetWriter&) = delete;
  DatasetWriter& operator=(const DatasetWriter&) = delete;

  // Appends to `split` (created on first use), opening a new shard when the current one is full.
  void append(const std::string& split, const Record& record);
  // Writes `<dir>/<name>` atomically now and lists it (size and hash) in the manifest.
  void add_file(const std::string& name, const std::string& bytes);
  // Free-form metadata stored under "metadata" in the manifest (importer options, dimensions, ...).
  void set_metadata(const std::string& key, nlohmann::json value);
  // Closes every split's last shard, writes manifest.json last (temp + fsync + rename), and swaps the new
  // dataset in for `dir`.
  void finish();

  uint64_t records(const std::string& split) const;

 private:
  struct Split;
  void close_shard(Split& split);
  void swap_in();
  std::string dir_, kind_;
  // The real directory (symbolic links resolved) and its two hidden siblings.
  std::string final_dir_, staging_dir_, old_dir_;
  DatasetWriterOptions options_;
  std::map<std::string, std::unique_ptr<Split>> splits_;
  std::map<std::string, FileEntry> files_;
  nlohmann::json metadata_ = nlohmann::json::object();
  bool finished_ = false;
};

}  // namespace vimo::data
