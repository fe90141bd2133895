// Failures of a sharded save under mpirun at 2 ranks (Note [Every rank writes its own part] in
// checkpoints/checkpoint.h): an out_dir that is not shared, a race between rank 0's publication and another
// rank's writer, a rank whose snapshot fails, a parameter of no elements. Found by an audit; each test hung
// or failed before the fix. A hang is turned into a failure by a deadline that ends the process.
#include <dlfcn.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>

#include "checkpoints/checkpoint.h"
#include "checkpoints/sharded_state.h"
#include "tests/comm/collective_reference.h"
#include "tests/test_support.h"
#include "trainer/optimizer.h"
#include "trainer/zero_optimizer.h"

// Interposes open(2) for the whole test binary (it precedes libc in symbol lookup): while
// g_delay_step_tmp_dir_open is set, a rank other than 0 that opens a directory named ".step_*.tmp" read-only
// (fsync_path's open) first sleeps 500 ms: the writer thread descheduled for a moment, as in a busy training
// process, at the point where it once fsynced the directory after publishing its mark.
static std::atomic<bool> g_delay_step_tmp_dir_open{false};
extern "C" int open(const char* path, int flags, ...) {
  using OpenFn = int (*)(const char*, int, ...);
  static const auto real_open = reinterpret_cast<OpenFn>(dlsym(RTLD_NEXT, "open"));
  mode_t mode = 0;
  if (flags & O_CREAT) {
    va_list args;
    va_start(args, flags);
    mode = static_cast<mode_t>(va_arg(args, int));
    va_end(args);
  }
  if (g_delay_step_tmp_dir_open.load() && (flags & O_ACCMODE) == O_RDONLY && !(flags & O_CREAT)) {
    const std::string name = std::filesystem::path(path).filename().string();
    const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
    if (rank && std::string(rank) != "0" && name.rfind(".step_", 0) == 0 && name.size() > 4 &&
        name.compare(name.size() - 4, 4, ".tmp") == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
  }
  return real_open(path, flags, mode);
}

namespace {
namespace fs = std::filesystem;
using vimo::checkpoints::CheckpointManager;
using vimo::checkpoints::TensorFile;
using vimo::checkpoints::TensorPiece;
using vimo::testing::mpi_world;

fs::path shared_dir(const std::string& name) {
  return vimo::testing::shared_test_dir("checkpoint_sharded_failures", name);
}

// Ends the process with a message when the scope is not left within `seconds`: a hang becomes a failure.
class Deadline {
 public:
  Deadline(int seconds, std::string what) : what_(std::move(what)) {
    thread_ = std::thread([this, seconds] {
      std::unique_lock<std::mutex> lock(mutex_);
      if (!cv_.wait_for(lock, std::chrono::seconds(seconds), [this] { return done_; })) {
        std::fprintf(stderr, "[rank %d] FAILED (hang): %s did not return within %d s\n", mpi_world()->rank(),
                     what_.c_str(), seconds);
        std::fflush(stderr);
        std::_Exit(1);
      }
    });
  }
  ~Deadline() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::string what_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

TensorFile replicated_state() {
  TensorFile state;
  state.tensors["model.w"] = at::arange(12, at::kFloat).view({3, 4});
  return state;
}

// This rank's half of an 8-element tensor.
TensorFile own_part() {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int64_t per_rank = (8 + ranks - 1) / ranks;
  const int64_t first = std::min<int64_t>(8, rank * per_rank), last = std::min<int64_t>(8, first + per_rank);
  std::map<std::string, TensorPiece> pieces;
  if (first < last) {
    pieces["optim.w.exp_avg"] = {at::arange(first, last, at::kFloat), first, {8}};
  }
  TensorFile own;
  vimo::checkpoints::add_pieces(own, pieces);
  return own;
}

// A train.out_dir that is not the same directory on every rank (node-local disks, a relative path in another
// working directory) fails the save on every rank, naming the rank that does not see rank 0's temporary
// directory, instead of each rank writing its part into a directory of its own while rank 0 waits for it.
TEST(ShardedCheckpointFailures, ARankWhosePartRankZeroCannotSeeFailsTheSaveInsteadOfHanging) {
  const int rank = mpi_world()->rank();
  const fs::path root = shared_dir("not_shared") / ("rank" + std::to_string(rank)) / "checkpoints";
  CheckpointManager manager(root.string(), 2, mpi_world());
  TensorFile own = own_part();
  bool failed = false;
  {
    Deadline deadline(20, "CheckpointManager::save with a directory that differs between ranks");
    try {
      manager.save(1, replicated_state(), "{}", "", &own);
    } catch (const std::exception& e) {
      failed = true;
      if (rank == 0) {
        EXPECT_NE(std::string(e.what()).find("rank"), std::string::npos) << e.what();
      }
    }
  }
  EXPECT_TRUE(failed) << "a save whose parts rank 0 cannot see succeeded";
  mpi_world()->barrier();
}

// Nothing of a rank's writer follows its mark: once the mark is there rank 0 may publish (rename) the
// directory, and a step that the other rank's writer then could not open would fail a save that was
// published whole. The writer is held up at its directory's fsync (see the interposer above) to widen the
// window.
TEST(ShardedCheckpointFailures, RankZeroPublishingBeforeAnotherRanksDirectoryFsyncIsNotAFailure) {
  const fs::path root = shared_dir("fsync_race") / "checkpoints";
  CheckpointManager manager(root.string(), 2, mpi_world());
  TensorFile own = own_part();
  std::string error;
  g_delay_step_tmp_dir_open = true;
  try {
    manager.save(1, replicated_state(), "{}", "", &own);
  } catch (const std::exception& e) {
    error = e.what();
  }
  g_delay_step_tmp_dir_open = false;
  const std::optional<std::string> newest = CheckpointManager::latest_valid(root.string());
  EXPECT_EQ(error, "") << "the save failed, yet " << newest.value_or("(nothing)")
                       << " is the newest valid checkpoint";
  if (!error.empty()) {
    EXPECT_FALSE(newest.has_value()) << "a failed save was published: " << *newest << " (error: " << error
                                     << ")";
  }
  mpi_world()->barrier();
}

// A rank whose snapshot fails (an allocation in clone(); an undefined tensor stands in for it here) fails the
// save on every rank before any rank writes, instead of leaving rank 0 to wait for its mark.
TEST(ShardedCheckpointFailures, ARankWhoseSnapshotFailsFailsTheSaveEverywhereInsteadOfHanging) {
  const int rank = mpi_world()->rank();
  const fs::path root = shared_dir("snapshot_fails") / "checkpoints";
  CheckpointManager manager(root.string(), 2, mpi_world());
  TensorFile own = own_part();
  if (rank == 1)
    own.tensors["optim.broken"] = at::Tensor();  // clone() throws here, as a failed allocation would
  bool failed = false;
  {
    Deadline deadline(20, "save_async + wait after rank 1's snapshot failed");
    try {
      manager.save_async(1, replicated_state(), "{}", "", &own);
    } catch (const std::exception&) {
      failed = true;
    }
    try {
      manager.wait();
    } catch (const std::exception&) {
      failed = true;
    }
  }
  EXPECT_TRUE(failed) << "rank " << rank << " never learnt that rank 1 could not save";
  EXPECT_FALSE(fs::exists(root / "step_00000001"));
  mpi_world()->barrier();
}

// A trainable parameter with no elements lies in no rank's shard; the checkpoint still names its moments
// (rank 0 writes an empty piece), so AdamW, which has them, resumes from a ZeRO-1 checkpoint.
TEST(ShardedCheckpointFailures, AZeroCheckpointNamesEveryParameterSoAdamWCanResumeFromIt) {
  const fs::path root = shared_dir("empty_parameter") / "checkpoints";
  std::vector<std::pair<std::string, at::Tensor>> parameters = {{"w", at::ones({4, 2}).requires_grad_()},
                                                                {"empty", at::ones({0}).requires_grad_()}};
  vimo::trainer::ZeroAdamW zero(parameters, mpi_world(), {});
  TensorFile own;
  vimo::checkpoints::add_pieces(own, zero.state_pieces());
  const std::string dir =
      CheckpointManager(root.string(), 2, mpi_world()).save(1, TensorFile{}, "{}", "", &own);
  const vimo::checkpoints::StateReader reader(CheckpointManager::load(dir));
  vimo::trainer::AdamW adamw(parameters, {});
  for (const auto& [key, moment] : adamw.state_tensors()) {
    EXPECT_TRUE(reader.contains(key))
        << key << " is missing from " << dir << ", which AdamW cannot resume from";
  }
  mpi_world()->barrier();
}

}  // namespace
