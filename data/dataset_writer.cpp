// Implements DatasetWriter: one open ShardWriter per split, rolled over by size, and the manifest last.
#include "data/dataset_writer.h"

#include <fmt/format.h>

#include <filesystem>
#include <set>
#include <stdexcept>

namespace vimo::data {

namespace fs = std::filesystem;

struct DatasetWriter::Split {
  std::string name;
  std::unique_ptr<ShardWriter> writer;  // the open shard, or null between shards
  std::string writer_file;
  SplitManifest manifest;
};

DatasetWriter::DatasetWriter(std::string dir, std::string kind, DatasetWriterOptions options)
    : dir_(std::move(dir)), kind_(std::move(kind)), options_(options) {
  if (kind_.empty())
    throw std::runtime_error(fmt::format("dataset {}: the record kind must not be empty", dir_));
  if (options_.max_shard_bytes == 0) {
    throw std::runtime_error(fmt::format("dataset {}: max_shard_bytes must be positive", dir_));
  }
  fs::create_directories(dir_);
  // A dataset is complete only once its manifest exists (written last): drop a stale one first, so a crash
  // below never leaves an old manifest next to a mix of old and new shards.
  fs::remove(fs::path(dir_) / "manifest.json");
}

DatasetWriter::~DatasetWriter() = default;  // open ShardWriters remove their temporary files

void DatasetWriter::append(const std::string& split_name, const Record& record) {
  if (finished_) throw std::runtime_error(fmt::format("dataset {}: append after finish()", dir_));
  if (split_name.empty() || split_name.find('/') != std::string::npos || split_name == "." ||
      split_name == "..") {
    throw std::runtime_error(fmt::format("dataset {}: invalid split name '{}'", dir_, split_name));
  }
  std::unique_ptr<Split>& slot = splits_[split_name];
  if (!slot) {
    slot = std::make_unique<Split>();
    slot->name = split_name;
    fs::create_directories(fs::path(dir_) / split_name);
  }
  Split& split = *slot;
  if (!split.writer) {
    split.writer_file = fmt::format("shard_{:05d}.bin", split.manifest.shards.size());
    split.writer = std::make_unique<ShardWriter>((fs::path(dir_) / split_name / split.writer_file).string(),
                                                 options_.compression, options_.zstd_level);
  }
  split.writer->append(record);
  if (split.writer->bytes_written() >= options_.max_shard_bytes ||
      (options_.max_shard_records && split.writer->records_written() >= options_.max_shard_records)) {
    close_shard(split);
  }
}

void DatasetWriter::close_shard(Split& split) {
  if (!split.writer) return;
  split.writer->finish();
  const std::string path = (fs::path(dir_) / split.name / split.writer_file).string();
  ShardEntry entry{split.writer_file, split.writer->records_written(), fs::file_size(path), file_xxh3(path)};
  split.manifest.records += entry.records;
  split.manifest.shards.push_back(std::move(entry));
  split.writer.reset();
}

void DatasetWriter::add_file(const std::string& name, const std::string& bytes) {
  if (name.empty() || name.find('/') != std::string::npos || name == "manifest.json") {
    throw std::runtime_error(fmt::format("dataset {}: invalid extra file name '{}'", dir_, name));
  }
  const std::string path = (fs::path(dir_) / name).string();
  write_file_atomically(path, bytes);
  files_[name] = {bytes.size(), file_xxh3(path)};
}

void DatasetWriter::set_metadata(const std::string& key, nlohmann::json value) {
  metadata_[key] = std::move(value);
}

uint64_t DatasetWriter::records(const std::string& split) const {
  const auto it = splits_.find(split);
  if (it == splits_.end()) return 0;
  return it->second->manifest.records + (it->second->writer ? it->second->writer->records_written() : 0);
}

void DatasetWriter::finish() {
  if (finished_) throw std::runtime_error(fmt::format("dataset {}: finish() called twice", dir_));
  DatasetManifest manifest;
  manifest.dir = dir_;
  manifest.kind = kind_;
  manifest.shard_version = kShardVersion;
  manifest.metadata = metadata_;
  manifest.files = files_;
  for (auto& [name, split] : splits_) {
    close_shard(*split);
    // Shards of an earlier, larger dataset in the same directory are no longer listed: remove them.
    std::set<std::string> listed;
    for (const ShardEntry& s : split->manifest.shards) listed.insert(s.file);
    for (const fs::directory_entry& entry : fs::directory_iterator(fs::path(dir_) / name)) {
      const std::string file = entry.path().filename().string();
      if (file.rfind("shard_", 0) == 0 && !listed.count(file)) fs::remove(entry.path());
    }
    manifest.splits[name] = split->manifest;
  }
  write_file_atomically((fs::path(dir_) / "manifest.json").string(), manifest.to_json().dump(2) + "\n");
  finished_ = true;
}

}  // namespace vimo::data
