// Atomic checkpoint directories (see checkpoint.h and its Note [Atomic checkpoint directories]).
#include "checkpoints/checkpoint.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>  // renameat2, RENAME_EXCHANGE (glibc 2.28)
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace vimo::checkpoints {
namespace fs = std::filesystem;
namespace {

constexpr const char* kManifest = "manifest.json";
constexpr const char* kStateFile = "rank_00000.safetensors";
// Version 2 adds "rank_files" (Note [Every rank writes its own part]); version 1 had rank 0's file only.
constexpr int kFormatVersion = 2;

std::string rank_file_name(int rank) { return fmt::format("rank_{:05d}.safetensors", rank); }
// The token rank 0 leaves in the temporary directory for the other ranks to find (Note [Every rank writes its
// own part] in checkpoint.h); removed before the directory is published.
constexpr const char* kTokenFile = ".rank_00000.token";
// The mark a rank other than 0 leaves beside its file once that is durable: {"bytes": .., "xxh3": ".."}.
std::string rank_mark_name(int rank) { return fmt::format(".rank_{:05d}.done", rank); }

int64_t steady_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void fsync_path(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw std::runtime_error("cannot open " + path.string() + " to fsync: " + std::strerror(errno));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw std::runtime_error("fsync " + path.string() + " failed: " + std::strerror(errno));
}

void write_text_file(const fs::path& path, const std::string& text) {
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
    if (!out.flush()) throw std::runtime_error("writing " + path.string() + " failed (disk full?)");
  }
  fsync_path(path);
}

std::string read_text_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string file_checksum(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  std::vector<char> chunk(1 << 20);
  while (in) {
    in.read(chunk.data(), chunk.size());
    XXH3_64bits_update(state, chunk.data(), in.gcount());
  }
  const uint64_t digest = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return fmt::format("{:016x}", digest);
}

std::string step_name(int64_t step) { return fmt::format("step_{:08d}", step); }

// VIMO_CHECKPOINT_RENAME_EXCHANGE=0 makes re-saves take the two-rename path, as on a filesystem without
// RENAME_EXCHANGE: for one that claims the exchange but mishandles it, and for the crash test.
bool exchange_allowed() {
  const char* value = std::getenv("VIMO_CHECKPOINT_RENAME_EXCHANGE");
  return value == nullptr || std::string(value) != "0";
}

// The step of a step directory's path ("step_00000100" or its stand-in ".step_00000100.old"); steps past
// 99999999 have more digits, so directories sort by this number, not by name.
int64_t step_of(const std::string& path) {
  const std::string name = fs::path(path).filename().string();
  const size_t digits = name.find("step_") + 5;
  return std::strtoll(name.c_str() + digits, nullptr, 10);
}

// Throws naming `file` when `checksum` is not the one `manifest` gives it.
void check_checksum(const fs::path& file, const std::string& checksum, const nlohmann::json& manifest) {
  const std::string expected =
      manifest.at("files").at(file.filename().string()).at("xxh3").get<std::string>();
  if (checksum != expected) {
    throw std::runtime_error(
        fmt::format("{} checksum {} does not match the manifest's {}", file.string(), checksum, expected));
  }
}

// Throws std::runtime_error naming the file that does not match the manifest. Checks every file's size, and
// the checksums of every file (kAll), of the files every rank reads whole (kShared: rank 0's state file,
// loader.json, config.yaml), or of none (kNone); but not of `hashed_by_caller`, which the caller checksums as
// it reads it (check_checksum()).
nlohmann::json verify(const fs::path& directory, Checksums checksums = Checksums::kAll,
                      const std::string& hashed_by_caller = "") {
  const fs::path manifest_path = directory / kManifest;
  if (!fs::exists(manifest_path))
    throw std::runtime_error(manifest_path.string() + " is missing (incomplete save)");
  nlohmann::json manifest;
  try {
    manifest = nlohmann::json::parse(read_text_file(manifest_path));
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(manifest_path.string() + " is malformed: " + e.what());
  }
  if (const int version = manifest.value("version", 0); version < 1 || version > kFormatVersion) {
    throw std::runtime_error(manifest_path.string() + ": unsupported checkpoint version " +
                             manifest.value("version", nlohmann::json(0)).dump());
  }
  try {
    if (!manifest.at("files").is_object()) throw std::runtime_error("'files' is not an object");
    const int world_size = manifest.at("world_size").get<int>();
    manifest.at("step").get<int64_t>();
    const nlohmann::json rank_files = manifest.value("rank_files", nlohmann::json(1));
    if (!rank_files.is_number_integer() || rank_files.get<int64_t>() < 1 ||
        rank_files.get<int64_t>() > world_size)
      throw std::runtime_error(fmt::format("'rank_files' is {}, not a count from 1 to world_size {}",
                                           rank_files.dump(), world_size));
    for (int r = 0; r < rank_files.get<int>(); ++r) {
      if (!manifest["files"].contains(rank_file_name(r)))
        throw std::runtime_error(fmt::format("it gives {} rank files but does not list {}",
                                             rank_files.get<int>(), rank_file_name(r)));
    }
    for (const auto& [name, entry] : manifest["files"].items()) {
      entry.at("bytes").get<uint64_t>();
      entry.at("xxh3").get<std::string>();
    }
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(manifest_path.string() + " is malformed: " + e.what());
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(manifest_path.string() + " is malformed: " + e.what());
  }
  for (const auto& [name, entry] : manifest.at("files").items()) {
    const fs::path file = directory / name;
    if (!fs::exists(file)) throw std::runtime_error(file.string() + " listed in the manifest is missing");
    const uint64_t bytes = fs::file_size(file);
    if (bytes != entry.at("bytes").get<uint64_t>()) {
      throw std::runtime_error(fmt::format("{} has {} bytes, the manifest says {}", file.string(), bytes,
                                           entry.at("bytes").get<uint64_t>()));
    }
    if (checksums == Checksums::kNone || name == hashed_by_caller ||
        (checksums == Checksums::kShared && name != kStateFile && name != "loader.json" &&
         name != "config.yaml")) {
      continue;
    }
    check_checksum(file, file_checksum(file), manifest);
  }
  return manifest;
}

// Deletes `dir` (a step directory, or a .step_N.old standing in for one) without ever leaving it half-deleted
// under a name that list_step_directories shows: it is first renamed to a leftover name that no listing
// takes and clean_up_crashed_saves removes (".step_N.deleting.tmp", ".step_N.old.deleting.tmp"), so a kill in
// the middle of the deletion leaves only that. A half-deleted .step_N.old, say, would otherwise stand in for
// step N once step_N is gone (Note [A re-save cut between its two renames]).
void delete_out_of_sight(const fs::path& dir) {
  std::string name = dir.filename().string();
  if (name.front() != '.') name.insert(0, ".");
  const fs::path doomed = dir.parent_path() / (name + ".deleting.tmp");
  fs::remove_all(doomed);
  fs::rename(dir, doomed);
  fs::remove_all(doomed);
}

}  // namespace

std::vector<std::string> list_step_directories(const std::string& root) {
  std::vector<std::string> out;
  if (!fs::is_directory(root)) return out;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory()) continue;
    if (name.rfind("step_", 0) == 0) {
      out.push_back(entry.path().string());
    } else if (name.rfind(".step_", 0) == 0 && name.size() > 4 &&
               name.compare(name.size() - 4, 4, ".old") == 0 &&
               !fs::exists(fs::path(root) / name.substr(1, name.size() - 5))) {
      out.push_back(entry.path().string());  // Note [A re-save cut between its two renames]
    }
  }
  std::sort(out.begin(), out.end(), [](const std::string& a, const std::string& b) {
    return std::pair(step_of(a), a) < std::pair(step_of(b), b);
  });
  return out;
}

CheckpointManager::CheckpointManager(std::string root, int64_t keep, std::shared_ptr<comm::Communicator> comm)
    : root_(std::move(root)), keep_(keep), comm_(std::move(comm)) {}

// Note [A re-save cut between its two renames]
// Re-saving step N swaps the new copy in with one renameat2(RENAME_EXCHANGE). Where the filesystem has no
// exchange (NFS, some FUSE), the old copy is renamed to .step_N.old and then the new one to step_N; a crash
// between the two leaves step N only as .step_N.old, complete. So list_step_directories (and thus
// latest_valid and resume) takes a .step_N.old whose step_N does not exist as step N, and the next save
// renames it back before anything else. Other leftovers of crashed saves (.step_*.tmp, a .step_N.old beside
// its step_N) are deleted then: rank 0 does this before any rank writes, one save at a time.
void CheckpointManager::clean_up_crashed_saves() const {
  std::vector<fs::directory_entry> entries;  // listed first: the loop renames and deletes among them
  for (const auto& entry : fs::directory_iterator(root_)) entries.push_back(entry);
  for (const auto& entry : entries) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory() || name.rfind(".step_", 0) != 0 || name.size() < 5) continue;
    const std::string suffix = name.substr(name.size() - 4);
    if (suffix == ".old") {
      const fs::path step_dir = fs::path(root_) / name.substr(1, name.size() - 5);
      if (!fs::exists(step_dir)) {
        try {
          verify(entry.path());
          std::cerr << "[vimo] restoring " << step_dir.string() << " from " << entry.path().string()
                    << ", left by a re-save cut between its two renames\n";
          fs::rename(entry.path(), step_dir);
          continue;
        } catch (const std::runtime_error& e) {
          std::cerr << "[vimo] " << entry.path().string() << " does not verify (" << e.what() << ")\n";
        }
      }
    } else if (suffix != ".tmp") {
      continue;
    }
    std::cerr << "[vimo] removing " << entry.path().string() << ", left by a crashed checkpoint save\n";
    if (suffix == ".old") {
      delete_out_of_sight(entry.path());
    } else {
      fs::remove_all(entry.path());
    }
  }
  fsync_path(root_);
}

void CheckpointManager::write_checkpoint(int64_t step, const TensorFile& state,
                                         const std::string& loader_json, const std::string& config_yaml,
                                         int rank_files) const {
  const fs::path final_dir = fs::path(root_) / step_name(step);
  const fs::path temp_dir = fs::path(root_) / ("." + step_name(step) + ".tmp");  // made by save_async()
  write_safetensors((temp_dir / kStateFile).string(), state);
  write_text_file(temp_dir / "loader.json", loader_json);
  write_text_file(temp_dir / "config.yaml", config_yaml);
  nlohmann::ordered_json manifest = {{"format", "vimo-checkpoint"},
                                     {"version", kFormatVersion},
                                     {"step", step},
                                     {"world_size", comm_ ? comm_->size() : 1},
                                     {"rank_files", rank_files}};
  for (const char* name : {kStateFile, "loader.json", "config.yaml"}) {
    manifest["files"][name] = {{"bytes", fs::file_size(temp_dir / name)},
                               {"xxh3", file_checksum(temp_dir / name)}};
  }
  // The other ranks' parts (Note [Every rank writes its own part]): each is complete once its mark is there.
  for (int r = 1; r < rank_files; ++r) {
    const fs::path mark = temp_dir / rank_mark_name(r);
    while (!fs::exists(mark)) {
      if (steady_now_ns() >= give_up_at_ns_.load()) {
        std::vector<int> missing;
        for (int m = r; m < rank_files; ++m) {
          if (!fs::exists(temp_dir / rank_mark_name(m))) missing.push_back(m);
        }
        throw std::runtime_error(fmt::format("rank(s) {} did not write their part of {}",
                                             fmt::join(missing, ", "), final_dir.string()));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    try {
      const nlohmann::json done = nlohmann::json::parse(read_text_file(mark));
      manifest["files"][rank_file_name(r)] = {{"bytes", done.at("bytes").get<uint64_t>()},
                                              {"xxh3", done.at("xxh3").get<std::string>()}};
    } catch (const nlohmann::json::exception& e) {
      throw std::runtime_error(mark.string() + " is malformed: " + e.what());
    }
    fs::remove(mark);
  }
  fs::remove(temp_dir / kTokenFile);
  write_text_file(temp_dir / "manifest.json.tmp", manifest.dump(2));
  fs::rename(temp_dir / "manifest.json.tmp", temp_dir / kManifest);
  fsync_path(temp_dir);
  if (fs::exists(final_dir)) {
    // Re-saving a step (after resuming from it): one renameat2(RENAME_EXCHANGE) swaps the whole new copy
    // in, so step_NNNNNNNN names a complete checkpoint at every instant; the old copy ends up under the
    // temporary name. Filesystems without the exchange (EINVAL: NFS, some FUSE) fall back to two renames
    // (Note [A re-save cut between its two renames]).
    if (exchange_allowed() &&
        ::renameat2(AT_FDCWD, temp_dir.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
      fs::remove_all(temp_dir);
    } else if (!exchange_allowed() || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) {
      const fs::path old_dir = fs::path(root_) / ("." + step_name(step) + ".old");
      if (fs::exists(old_dir)) delete_out_of_sight(old_dir);
      fs::rename(final_dir, old_dir);
      fs::rename(temp_dir, final_dir);
      delete_out_of_sight(old_dir);
    } else {
      throw std::runtime_error(fmt::format("cannot swap {} into {}: {}", temp_dir.string(),
                                           final_dir.string(), std::strerror(errno)));
    }
  } else {
    fs::rename(temp_dir, final_dir);
  }
  fsync_path(root_);
  prune(step);
}

// Note [Saving in the background]
// A save must not hold training up for as long as writing, checksumming and fsyncing take (seconds for a
// large model on a shared filesystem). So save_async() copies the state's tensors into memory of its own on
// each rank that writes (a snapshot: the step after it changes the parameters and moments in place): rank 0
// its replicated state, and with a sharded state every rank its own part (Note [Every rank writes its own
// part] in checkpoint.h). A thread on each writes from that copy with the same atomic-directory protocol as
// before (Note [Atomic checkpoint directories]) while training goes on. The cost is one copy of what the rank
// writes in host memory while a save is in flight. One save is in flight at a time: the next save_async()
// waits for the one before. A failure is learnt by every rank at the next wait() (the next save, or the end
// of the run), and a crash while a thread writes leaves the previous checkpoint as a crash mid-save always
// did. The trainer waits before it reports a checkpoint as holding a stopped or preempted run, and before the
// run ends. Only the file system carries the other ranks' marks to rank 0's thread: a thread must not take
// part in collectives that the training thread is making at the same time.
std::string CheckpointManager::save(int64_t step, const TensorFile& state, const std::string& loader_json,
                                    const std::string& config_yaml, const TensorFile* own) {
  save_async(step, state, loader_json, config_yaml, own);
  return wait();
}

// Note [How long the ranks wait for a save]: the collectives of a save wait for the slowest rank's clean-up
// or write (rank 0's whole replicated state at the end of a run, say), which may take longer than the
// communicator's timeout for a collective (600 s by default) on a slow shared filesystem. They run with at
// least kSaveTimeoutS instead; a rank that dies meanwhile is still reported by the heartbeat watchdog.
class CheckpointManager::LongTimeout {
 public:
  explicit LongTimeout(comm::Communicator& comm) : comm_(comm), saved_(comm.timeout()) {
    comm_.set_timeout(std::max<std::chrono::milliseconds>(saved_, std::chrono::seconds(kSaveTimeoutS)));
  }
  ~LongTimeout() { comm_.set_timeout(saved_); }
  LongTimeout(const LongTimeout&) = delete;
  LongTimeout& operator=(const LongTimeout&) = delete;

 private:
  comm::Communicator& comm_;
  std::chrono::milliseconds saved_;
};

std::string CheckpointManager::save_async(int64_t step, const TensorFile& state,
                                          const std::string& loader_json, const std::string& config_yaml,
                                          const TensorFile* own) {
  wait();
  if (writer_.joinable()) {  // left by a wait() that an error cut short: nothing of it is published now
    give_up_at_ns_ = steady_now_ns();
    writer_.join();
  }
  const int ranks = comm_ ? comm_->size() : 1;
  const fs::path temp_dir = fs::path(root_) / ("." + step_name(step) + ".tmp");
  // Every rank snapshots what it writes. Rank 0 also clears what crashed saves left and makes the temporary
  // directory, with a token in it by which the other ranks know that they see that very directory (not a
  // node-local one of the same name). All of this before any rank writes.
  TensorFile snapshot;
  std::string problem;
  int64_t token = 0;
  try {
    if (rank() == 0) {
      snapshot.metadata = state.metadata;
      for (const auto& [name, tensor] : state.tensors) snapshot.tensors[name] = tensor.detach().clone();
    }
    if (own) {
      for (const auto& [name, tensor] : own->tensors) {
        if (!snapshot.tensors.emplace(name, tensor.detach().clone()).second)
          throw std::invalid_argument("'" + name + "' is both in the replicated state and in rank 0's part");
      }
      for (const auto& [key, value] : own->metadata) snapshot.metadata[key] = value;
    }
    if (rank() == 0) {
      fs::create_directories(root_);
      clean_up_crashed_saves();
      fs::create_directories(temp_dir);
      std::random_device random;
      token = static_cast<int64_t>((static_cast<uint64_t>(random()) << 31) ^ random());  // < 2^63
      write_text_file(temp_dir / kTokenFile, std::to_string(token));
    }
  } catch (const std::exception& e) {
    problem = e.what();
  }
  const int rank_files = own ? ranks : 1;
  if (ranks > 1) {
    // One all-gather orders rank 0's directory before the other ranks' writes, hands out its token, tells
    // every rank which ranks could not prepare, and checks that the ranks agree on whether each writes a
    // part.
    const LongTimeout long_timeout(*comm_);
    const at::Tensor all =
        comm_
            ->allgather(
                at::tensor(std::vector<int64_t>{own ? 1 : 0, problem.empty() ? 0 : 1, token}, at::kLong))
            .view({ranks, 3});  // [ranks, (has a part, failed, token)]
    std::vector<int> failed;
    int with_part = 0;
    for (int r = 0; r < ranks; ++r) {
      with_part += all[r][0].item<int64_t>() != 0 ? 1 : 0;
      if (all[r][1].item<int64_t>() != 0) failed.push_back(r);
    }
    if (!failed.empty()) {
      throw std::runtime_error(fmt::format(
          "checkpoint save failed: rank(s) {} cannot save {}{}", fmt::join(failed, ", "), temp_dir.string(),
          problem.empty() ? "" : fmt::format(" (rank {}: {})", rank(), problem)));
    }
    if (with_part != 0 && with_part != ranks) {
      throw std::invalid_argument(
          fmt::format("[rank {}] CheckpointManager::save_async: some ranks pass a part of their own and "
                      "others none (this "
                      "rank: {}); every rank passes one, or none does",
                      rank(), own ? "a part" : "none"));
    }
    token = all[0][2].item<int64_t>();
  } else if (!problem.empty()) {
    throw std::runtime_error("checkpoint save failed: " + problem);
  }
  pending_dir_ = (fs::path(root_) / step_name(step)).string();
  give_up_at_ns_ = std::numeric_limits<int64_t>::max();
  writer_error_.clear();
  if (rank() == 0) {
    writer_ = std::thread([this, step, snapshot = std::move(snapshot), loader_json, config_yaml, rank_files] {
      try {
        write_checkpoint(step, snapshot, loader_json, config_yaml, rank_files);
      } catch (const std::exception& e) {
        writer_error_ = e.what();
      }
    });
  } else if (own) {
    writer_ = std::thread([this, temp_dir, token, part = std::move(snapshot), r = rank()] {
      try {
        std::string seen;
        try {
          seen = read_text_file(temp_dir / kTokenFile);
        } catch (const std::exception&) {
        }
        if (seen != std::to_string(token)) {
          throw std::runtime_error(fmt::format(
              "this rank does not see rank 0's {} ({}). HINT: every rank must see the same train.out_dir (a "
              "shared filesystem, or an absolute path that is the same on every node)",
              temp_dir.string(), seen.empty() ? "it is missing here" : "another save's token is in it"));
        }
        const fs::path file = temp_dir / rank_file_name(r);
        write_safetensors(file.string(), part);
        fsync_path(temp_dir);  // before the mark: once the mark is there, rank 0 may rename the directory
        const nlohmann::json done = {{"bytes", fs::file_size(file)}, {"xxh3", file_checksum(file)}};
        const fs::path mark = temp_dir / rank_mark_name(r);
        write_text_file(mark.string() + ".tmp", done.dump());
        fs::rename(mark.string() + ".tmp", mark);  // the mark appears whole or not at all; nothing follows it
      } catch (const std::exception& e) {
        writer_error_ = fmt::format("rank {}: {}", r, e.what());
      }
    });
  }
  return pending_dir_;
}

std::string CheckpointManager::wait() {
  if (pending_dir_.empty()) return "";
  const std::string dir = std::exchange(pending_dir_, "");
  // The other ranks' writers end on their own; rank 0's waits for their parts, so it must learn when one will
  // never come, and once every part is done it waits a bounded time for the marks to show.
  if (rank() != 0 && writer_.joinable()) writer_.join();
  const std::string own_error = rank() != 0 ? std::exchange(writer_error_, "") : "";
  std::vector<int> failed;
  std::optional<LongTimeout> long_timeout;
  if (comm_ && comm_->size() > 1) {
    long_timeout.emplace(*comm_);
    const at::Tensor flags =
        comm_->allgather(at::full({1}, own_error.empty() ? 0 : 1, at::kLong));  // [ranks]
    for (int r = 1; r < comm_->size(); ++r) {
      if (flags[r].item<int64_t>() != 0) failed.push_back(r);
    }
  }
  give_up_at_ns_ = failed.empty() ? steady_now_ns() + kGiveUpAfterS * 1'000'000'000LL : steady_now_ns();
  std::string error;
  if (rank() == 0) {
    if (writer_.joinable()) writer_.join();
    error = std::exchange(writer_error_, "");
  }
  if (comm_ && comm_->size() > 1) {
    // The save is what rank 0 made of it: every rank learns whether it published the checkpoint.
    at::Tensor rank0_failed = at::full({1}, rank() == 0 && !error.empty() ? 1 : 0, at::kInt);
    comm_->broadcast(rank0_failed, 0);
    if (rank() != 0 && rank0_failed.item<int>() != 0) {
      error = !own_error.empty() ? own_error
              : !failed.empty()
                  ? fmt::format("rank(s) {} failed to write their part of {} (their errors say why)",
                                fmt::join(failed, ", "), dir)
                  : "rank 0 failed to save " + dir;
    }
  }
  if (!error.empty()) throw std::runtime_error("checkpoint save failed: " + error);
  return dir;
}

CheckpointManager::~CheckpointManager() {
  if (!writer_.joinable()) return;
  // A save in flight finishes, or fails, before the process can end; rank 0 gives the other ranks' parts
  // (which their destructors let finish) a bounded time.
  give_up_at_ns_ =
      std::min<int64_t>(give_up_at_ns_.load(), steady_now_ns() + kGiveUpAfterS * 1'000'000'000LL);
  writer_.join();
  if (!writer_error_.empty()) std::fprintf(stderr, "checkpoint save failed: %s\n", writer_error_.c_str());
}

// Keeps the checkpoint just saved and the newest keep - 1 complete ones before it. Directories of later
// steps (left by a run that resumed from an earlier checkpoint, because theirs did not verify) and ones
// without a manifest are left alone: neither may count toward `keep`, or a torn directory could push the
// new checkpoint out.
void CheckpointManager::prune(int64_t saved_step) const {
  std::vector<std::string> older;
  for (const std::string& dir : list_step_directories(root_)) {
    if (step_of(dir) < saved_step && fs::exists(fs::path(dir) / kManifest)) older.push_back(dir);
  }
  const size_t kept = static_cast<size_t>(std::max<int64_t>(keep_ - 1, 0));
  for (size_t i = 0; i + kept < older.size(); ++i) delete_out_of_sight(older[i]);
}

std::optional<std::string> CheckpointManager::latest_valid(const std::string& root) {
  std::vector<std::string> steps = list_step_directories(root);
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    try {
      verify(*it);
      return *it;
    } catch (const std::exception& e) {
      std::cerr << "[vimo] skipping checkpoint " << *it << ": " << e.what() << "\n";
    }
  }
  return std::nullopt;
}

// Note [One checkpoint for every rank]
// Each rank looking for the newest checkpoint on its own can find different ones: an out_dir that is local to
// each node (a relative path on node-local disks), or a file that one rank cannot read, leaves some ranks
// resuming from step N and others from an older step or from scratch. Plain AdamW then stops at the first
// check of the replicas, with a misleading message; ZeRO-1 trains on silently with a half-loaded model. So
// rank 0 picks the directory, broadcasts its path, and every rank verifies that very checkpoint; when any
// cannot, all fail together, naming those ranks and the path.
//
// Only rank 0 checksums the files here (it did, finding the newest checkpoint that verifies); the others
// check that they see every file at its size. Checksumming a whole checkpoint on every rank, and again when
// loading, made each rank read it twice over before reading its own part: on 64 ranks, 128 times the
// checkpoint from a shared filesystem. load() with Checksums::kShared then checksums the files each rank
// reads whole.
std::optional<std::string> CheckpointManager::agreed_latest_valid(
    const std::string& root, const std::shared_ptr<comm::Communicator>& comm) {
  if (!comm || comm->size() == 1) return latest_valid(root);
  std::string chosen = comm->rank() == 0 ? latest_valid(root).value_or("") : "";
  at::Tensor length = at::full({1}, static_cast<int64_t>(chosen.size()), at::kLong);
  comm->broadcast(length, 0);
  if (length.item<int64_t>() == 0) return std::nullopt;
  at::Tensor bytes = at::zeros({length.item<int64_t>()}, at::kByte);
  if (comm->rank() == 0) std::memcpy(bytes.data_ptr(), chosen.data(), chosen.size());
  comm->broadcast(bytes, 0);
  chosen.assign(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(bytes.numel()));
  std::string problem;
  try {
    if (comm->rank() != 0) verify(chosen, Checksums::kNone);
  } catch (const std::exception& e) {
    problem = e.what();
  }
  const at::Tensor failed =
      comm->allgather(at::full({1}, problem.empty() ? 0 : 1, at::kLong));  // [ranks]: 1 where it failed
  std::vector<int> ranks;
  for (int r = 0; r < comm->size(); ++r) {
    if (failed[r].item<int64_t>() != 0) ranks.push_back(r);
  }
  if (ranks.empty()) return chosen;
  throw std::runtime_error(fmt::format(
      "[rank {}] cannot resume: rank 0 resumes from {}, but rank(s) {} cannot read it{}. HINT: every rank "
      "must "
      "see the same train.out_dir (a shared filesystem, or an absolute path that is the same on every node)",
      comm->rank(), chosen, fmt::join(ranks, ", "), problem.empty() ? "" : " (here: " + problem + ")"));
}

Checkpoint CheckpointManager::load(const std::string& directory, Checksums checksums) {
  // Rank 0's state file is checksummed as it is read: one pass over it, not two.
  const nlohmann::json manifest =
      verify(directory, checksums, checksums == Checksums::kNone ? "" : kStateFile);
  Checkpoint checkpoint;
  checkpoint.directory = directory;
  checkpoint.step = manifest.at("step").get<int64_t>();
  checkpoint.world_size = manifest.at("world_size").get<int>();
  const int rank_files = manifest.value("rank_files", 1);  // checked by verify()
  for (int r = 0; r < rank_files; ++r)
    checkpoint.rank_files.push_back((fs::path(directory) / rank_file_name(r)).string());
  const fs::path state_file = fs::path(directory) / kStateFile;
  std::string checksum;
  checkpoint.state =
      read_safetensors(state_file.string(), checksums == Checksums::kNone ? nullptr : &checksum);
  if (checksums != Checksums::kNone) check_checksum(state_file, checksum, manifest);
  checkpoint.loader_json = read_text_file(fs::path(directory) / "loader.json");
  checkpoint.config_yaml = read_text_file(fs::path(directory) / "config.yaml");
  return checkpoint;
}

}  // namespace vimo::checkpoints
