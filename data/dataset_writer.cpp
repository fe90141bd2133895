// Implements DatasetWriter: one open ShardWriter per split, rolled over by size, the manifest last, and the
// swap of the finished directory into place (Note [Replacing a dataset directory] in dataset_writer.h).
#include "data/dataset_writer.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>  // renameat2, RENAME_EXCHANGE (glibc 2.28)
#include <cstring>
#include <filesystem>
#include <iostream>
#include <stdexcept>

namespace vimo::data {

namespace fs = std::filesystem;

namespace {

void fsync_directory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    throw std::runtime_error(fmt::format("cannot open {} to fsync: {}", dir.string(), std::strerror(errno)));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0)
    throw std::runtime_error(fmt::format("fsync {} failed: {}", dir.string(), std::strerror(errno)));
}

// The directory `dir` names, with a symbolic link resolved so that the swap replaces the dataset where it
// lies, not the link; "out/" and "out" are the same.
fs::path real_directory(const std::string& dir) {
  fs::path path = fs::absolute(fs::path(dir)).lexically_normal();
  if (!path.has_filename()) path = path.parent_path();
  return fs::weakly_canonical(path);
}

// Throws unless `dir` is absent, empty, or holds a dataset and nothing else: finish() replaces the whole
// directory, and must not delete files a user keeps there (Note [Replacing a dataset directory]).
void check_replaceable(const std::string& shown, const fs::path& dir) {
  if (!fs::exists(dir)) return;
  if (!fs::is_directory(dir)) {
    throw std::runtime_error(
        fmt::format("dataset {}: exists and is not a directory. HINT: choose another output "
                    "directory",
                    shown));
  }
  if (fs::is_empty(dir)) return;
  const auto refuse = [&](const std::string& why) {
    throw std::runtime_error(fmt::format(
        "dataset {}: {}; writing a dataset there replaces the whole directory and would delete it. HINT: "
        "choose a new or empty output directory, or move that away",
        shown, why));
  };
  if (!fs::exists(dir / "manifest.json"))
    refuse("holds files but no manifest.json, so it is not a vimo dataset");
  DatasetManifest old;
  try {
    old = read_manifest(dir.string());
  } catch (const std::runtime_error& e) {
    refuse(fmt::format("holds a manifest that does not read ({})", e.what()));
  }
  for (const fs::directory_entry& entry : fs::directory_iterator(dir)) {
    std::string name = entry.path().filename().string();
    // A leftover of an interrupted write_file_atomically belongs to the dataset as much as its file does.
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0) name.resize(name.size() - 4);
    const bool listed =
        name == "manifest.json" || old.files.count(name) || (entry.is_directory() && old.splits.count(name));
    if (!listed) refuse(fmt::format("holds {}, which its manifest does not list", entry.path().string()));
  }
}

}  // namespace

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
  const fs::path final_dir = real_directory(dir_);
  const fs::path parent = final_dir.parent_path();
  const std::string name = final_dir.filename().string();
  final_dir_ = final_dir.string();
  staging_dir_ = (parent / ("." + name + ".vimo-tmp")).string();
  old_dir_ = (parent / ("." + name + ".vimo-old")).string();
  fs::create_directories(parent);
  // Leftovers of a writer that was killed (Note [Replacing a dataset directory]).
  if (fs::exists(old_dir_)) {
    if (!fs::exists(final_dir_)) {
      std::cerr << "[vimo] restoring " << final_dir_ << " from " << old_dir_
                << ", left by a dataset swap cut between its two renames\n";
      fs::rename(old_dir_, final_dir_);
    } else {
      fs::remove_all(old_dir_);
    }
  }
  fs::remove_all(staging_dir_);
  fs::remove_all(old_dir_ + ".deleting");
  check_replaceable(dir_, final_dir);
  // A mount point cannot be renamed, nor a directory renamed onto it: the swap at the end would fail after
  // the whole import was written (into the parent's filesystem). Refuse before.
  struct stat own {
  }, above{};
  if (::stat(final_dir.c_str(), &own) == 0 && ::stat(parent.c_str(), &above) == 0 &&
      own.st_dev != above.st_dev) {
    throw std::runtime_error(
        fmt::format("dataset {}: is a mount point, which the finished dataset cannot be swapped in for (Note "
                    "[Replacing a "
                    "dataset directory]). HINT: write into a directory inside it, e.g. {}/dataset",
                    dir_, final_dir.string()));
  }
  fs::create_directories(staging_dir_);
}

DatasetWriter::~DatasetWriter() {
  if (finished_) return;
  // An abandoned writer (an exception on bad input) deletes its staging copy; `dir` was never touched.
  try {
    splits_.clear();  // open ShardWriters remove their temporary files
    fs::remove_all(staging_dir_);
  } catch (const std::exception& e) {
    std::cerr << "[vimo] cannot remove " << staging_dir_ << ": " << e.what() << "\n";
  }
}

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
    fs::create_directories(fs::path(staging_dir_) / split_name);
  }
  Split& split = *slot;
  if (!split.writer) {
    split.writer_file = fmt::format("shard_{:05d}.bin", split.manifest.shards.size());
    split.writer =
        std::make_unique<ShardWriter>((fs::path(staging_dir_) / split_name / split.writer_file).string(),
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
  const std::string path = (fs::path(staging_dir_) / split.name / split.writer_file).string();
  ShardEntry entry{split.writer_file, split.writer->records_written(), fs::file_size(path), file_xxh3(path)};
  split.manifest.records += entry.records;
  split.manifest.shards.push_back(std::move(entry));
  split.writer.reset();
}

void DatasetWriter::add_file(const std::string& name, const std::string& bytes) {
  if (name.empty() || name.find('/') != std::string::npos || name == "manifest.json") {
    throw std::runtime_error(fmt::format("dataset {}: invalid extra file name '{}'", dir_, name));
  }
  const std::string path = (fs::path(staging_dir_) / name).string();
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
    manifest.splits[name] = split->manifest;
  }
  write_file_atomically((fs::path(staging_dir_) / "manifest.json").string(),
                        manifest.to_json().dump(2) + "\n");
  fsync_directory(staging_dir_);
  swap_in();
  finished_ = true;
}

// Note [Replacing a dataset directory] in dataset_writer.h.
void DatasetWriter::swap_in() {
  const auto fail = [&](const char* what) {
    const int error = errno;  // before the message is built
    throw std::runtime_error(fmt::format(
        "dataset {}: cannot {}: {}. HINT: the output must be a directory that can be renamed (not a "
        "mount point) in a directory you may write to",
        dir_, what, std::strerror(error)));
  };
  if (!fs::exists(final_dir_)) {
    if (std::rename(staging_dir_.c_str(), final_dir_.c_str()) != 0) fail("rename the new dataset into place");
  } else if (::renameat2(AT_FDCWD, staging_dir_.c_str(), AT_FDCWD, final_dir_.c_str(), RENAME_EXCHANGE) ==
             0) {
    fs::remove_all(staging_dir_);  // the old dataset, out of sight now
  } else if (errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) {
    if (std::rename(final_dir_.c_str(), old_dir_.c_str()) != 0) fail("rename the old dataset aside");
    if (std::rename(staging_dir_.c_str(), final_dir_.c_str()) != 0) {
      const int error = errno;
      std::rename(old_dir_.c_str(), final_dir_.c_str());  // the old dataset back in place
      errno = error;
      fail("rename the new dataset into place");
    }
    // Out of sight before it is deleted: a crash while deleting must not leave a half-deleted `.vimo-old`,
    // which the next writer would put back as <dir> if <dir> were gone by then.
    const std::string doomed = old_dir_ + ".deleting";
    fs::remove_all(doomed);
    if (std::rename(old_dir_.c_str(), doomed.c_str()) == 0) fs::remove_all(doomed);
  } else {
    fail("swap the new dataset in for the old one");
  }
  fsync_directory(fs::path(final_dir_).parent_path());
}

}  // namespace vimo::data
