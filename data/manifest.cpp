// Implements the dataset manifest of manifest.h: reading with key-path errors, hashing and verification.
#include "data/manifest.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <type_traits>

#include "data/shard.h"

namespace vimo::data {

namespace fs = std::filesystem;

namespace {

// Typed access to one JSON key with errors that name the manifest file and the key path.
class ManifestReader {
 public:
  explicit ManifestReader(std::string file) : file_(std::move(file)) {}

  const nlohmann::json& at(const nlohmann::json& object, const std::string& key,
                           const std::string& path) const {
    if (!object.is_object()) fail(path, "expected an object");
    const auto it = object.find(key);
    if (it == object.end()) fail(join(path, key), "missing");
    return *it;
  }
  template <typename T>
  T get(const nlohmann::json& object, const std::string& key, const std::string& path) const {
    const nlohmann::json& value = at(object, key, path);
    // nlohmann converts -1 to 2^64 - 1 and 3.7 to 3 without a word: a count or size must be written as one.
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
      const bool fits = std::is_unsigned_v<T> ? value.is_number_unsigned() : value.is_number_integer();
      if (!fits) {
        fail(join(path, key), fmt::format("is {}, expected {} integer", value.dump(),
                                          std::is_unsigned_v<T> ? "a non-negative" : "an"));
      }
    }
    try {
      return value.get<T>();
    } catch (const nlohmann::json::exception&) {
      fail(join(path, key), fmt::format("has the wrong type (found {})", value.dump()));
    }
  }
  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw std::runtime_error(
        fmt::format("dataset manifest {}: key '{}' {}. HINT: the manifest is written by "
                    "vimo's importers; re-import the dataset",
                    file_, key, what));
  }
  static std::string join(const std::string& path, const std::string& key) {
    return path.empty() ? key : path + "." + key;
  }

 private:
  std::string file_;
};

}  // namespace

const SplitManifest& DatasetManifest::split(const std::string& name) const {
  const auto it = splits.find(name);
  if (it == splits.end()) {
    std::string names;
    for (const auto& [split_name, unused] : splits) names += (names.empty() ? "" : ", ") + split_name;
    throw std::runtime_error(fmt::format("dataset {} has no split '{}' (splits: {})", dir, name, names));
  }
  return it->second;
}

std::string DatasetManifest::shard_path(const std::string& split_name, size_t shard) const {
  return (fs::path(dir) / split_name / split(split_name).shards.at(shard).file).string();
}

std::string DatasetManifest::file_path(const std::string& name) const {
  if (!files.count(name)) {
    throw std::runtime_error(fmt::format("dataset {}: the manifest lists no file '{}'", dir, name));
  }
  return (fs::path(dir) / name).string();
}

nlohmann::json DatasetManifest::to_json() const {
  nlohmann::json out = {{"format", kManifestFormat},
                        {"version", kManifestVersion},
                        {"kind", kind},
                        {"shard_version", shard_version},
                        {"metadata", metadata}};
  nlohmann::json split_json = nlohmann::json::object();
  for (const auto& [name, split_manifest] : splits) {
    nlohmann::json shards = nlohmann::json::array();
    for (const ShardEntry& s : split_manifest.shards) {
      shards.push_back({{"file", s.file}, {"records", s.records}, {"bytes", s.bytes}, {"xxh3", s.xxh3}});
    }
    split_json[name] = {{"records", split_manifest.records}, {"shards", shards}};
  }
  out["splits"] = split_json;
  nlohmann::json file_json = nlohmann::json::object();
  for (const auto& [name, entry] : files) file_json[name] = {{"bytes", entry.bytes}, {"xxh3", entry.xxh3}};
  out["files"] = file_json;
  return out;
}

DatasetManifest read_manifest(const std::string& dir) {
  const std::string file = (fs::path(dir) / "manifest.json").string();
  std::ifstream in(file);
  if (!in) {
    throw std::runtime_error(
        fmt::format("dataset {}: cannot open {}. HINT: a dataset is complete only once its "
                    "manifest exists; import or generate it (vimo data synth / import)",
                    dir, file));
  }
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(fmt::format("dataset manifest {}: not valid JSON: {}", file, e.what()));
  }
  const ManifestReader r(file);
  if (r.get<std::string>(json, "format", "") != kManifestFormat) {
    r.fail("format", fmt::format("is {}, expected \"{}\"", json["format"].dump(), kManifestFormat));
  }
  if (r.get<int>(json, "version", "") != kManifestVersion) {
    r.fail("version",
           fmt::format("is {}, this build reads version {}", json["version"].dump(), kManifestVersion));
  }
  DatasetManifest m;
  m.dir = dir;
  m.kind = r.get<std::string>(json, "kind", "");
  m.shard_version = r.get<uint32_t>(json, "shard_version", "");
  if (m.shard_version != kShardVersion) {
    r.fail("shard_version", fmt::format("is {}, this build reads shard version {}: re-import the dataset",
                                        m.shard_version, kShardVersion));
  }
  if (json.contains("metadata")) m.metadata = json["metadata"];
  const nlohmann::json& splits = r.at(json, "splits", "");
  if (!splits.is_object()) r.fail("splits", "is not an object");
  for (const auto& [name, split_json] : splits.items()) {
    const std::string path = "splits." + name;
    SplitManifest split;
    split.records = r.get<uint64_t>(split_json, "records", path);
    const nlohmann::json& shards = r.at(split_json, "shards", path);
    if (!shards.is_array()) r.fail(path + ".shards", "is not an array");
    uint64_t total = 0;
    for (size_t i = 0; i < shards.size(); ++i) {
      const std::string shard_path = fmt::format("{}.shards[{}]", path, i);
      ShardEntry entry{r.get<std::string>(shards[i], "file", shard_path),
                       r.get<uint64_t>(shards[i], "records", shard_path),
                       r.get<uint64_t>(shards[i], "bytes", shard_path),
                       r.get<std::string>(shards[i], "xxh3", shard_path)};
      if (entry.file.empty() || entry.file.find('/') != std::string::npos || entry.file == "..") {
        r.fail(shard_path + ".file",
               fmt::format("is \"{}\", expected a file name inside the split", entry.file));
      }
      total += entry.records;
      split.shards.push_back(std::move(entry));
    }
    if (total != split.records) {
      r.fail(path + ".records", fmt::format("is {} but its shards hold {} records", split.records, total));
    }
    m.splits[name] = std::move(split);
  }
  if (json.contains("files")) {
    for (const auto& [name, entry] : json["files"].items()) {
      m.files[name] = {r.get<uint64_t>(entry, "bytes", "files." + name),
                       r.get<std::string>(entry, "xxh3", "files." + name)};
    }
  }
  return m;
}

void write_file_atomically(const std::string& path, const std::string& content) {
  const std::string temp = path + ".tmp";
  std::FILE* file = std::fopen(temp.c_str(), "wb");
  if (!file) throw std::runtime_error(fmt::format("cannot create {}: {}", temp, std::strerror(errno)));
  const bool ok = std::fwrite(content.data(), 1, content.size(), file) == content.size() &&
                  std::fflush(file) == 0 && ::fsync(::fileno(file)) == 0;
  const std::string error = ok ? "" : std::strerror(errno);
  if (std::fclose(file) != 0 || !ok || std::rename(temp.c_str(), path.c_str()) != 0) {
    const std::string reason = error.empty() ? std::strerror(errno) : error;
    std::remove(temp.c_str());
    throw std::runtime_error(fmt::format("cannot write {}: {}", path, reason));
  }
  const fs::path parent = fs::path(path).parent_path();
  const std::string dir = parent.empty() ? std::string(".") : parent.string();
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

std::string file_xxh3(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(fmt::format("cannot open {}: {}", path, std::strerror(errno)));
  const std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), &XXH3_freeState);
  XXH3_64bits_reset(state.get());
  std::vector<char> block(1 << 20);
  while (true) {
    const ssize_t n = ::read(fd, block.data(), block.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const std::string error = std::strerror(errno);
      ::close(fd);
      throw std::runtime_error(fmt::format("cannot read {}: {}", path, error));
    }
    if (n == 0) break;
    XXH3_64bits_update(state.get(), block.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  return fmt::format("{:016x}", XXH3_64bits_digest(state.get()));
}

void verify_dataset(const DatasetManifest& manifest, bool hashes,
                    const std::function<void(size_t, size_t)>& progress) {
  size_t total = manifest.files.size(), done = 0;
  for (const auto& [name, split] : manifest.splits) total += split.shards.size();
  const auto check_file = [&](const std::string& path, uint64_t bytes, const std::string& xxh3) {
    std::error_code error;
    const uint64_t size = fs::file_size(path, error);
    if (error) {
      throw std::runtime_error(
          fmt::format("dataset {}: {} is listed in the manifest but cannot be read: {}. HINT: "
                      "the dataset is incomplete; copy the missing file or re-import",
                      manifest.dir, path, error.message()));
    }
    if (size != bytes) {
      throw std::runtime_error(
          fmt::format("dataset {}: {} is {} bytes, the manifest says {}: the file was changed "
                      "or truncated",
                      manifest.dir, path, size, bytes));
    }
    if (hashes) {
      const std::string found = file_xxh3(path);
      if (found != xxh3) {
        throw std::runtime_error(
            fmt::format("dataset {}: {} has xxh3 {}, the manifest says {}: the file is corrupt", manifest.dir,
                        path, found, xxh3));
      }
    }
  };
  for (const auto& [name, split] : manifest.splits) {
    for (size_t i = 0; i < split.shards.size(); ++i) {
      const std::string path = manifest.shard_path(name, i);
      check_file(path, split.shards[i].bytes, split.shards[i].xxh3);
      const ShardReader reader(path);
      if (reader.size() != split.shards[i].records) {
        throw std::runtime_error(fmt::format("dataset {}: {} holds {} records, the manifest says {}",
                                             manifest.dir, path, reader.size(), split.shards[i].records));
      }
      if (progress) progress(++done, total);
    }
  }
  for (const auto& [name, entry] : manifest.files) {
    check_file(manifest.file_path(name), entry.bytes, entry.xxh3);
    if (progress) progress(++done, total);
  }
}

}  // namespace vimo::data
