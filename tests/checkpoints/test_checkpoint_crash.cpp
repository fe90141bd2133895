// Checkpoints under a real crash: a forked child saves through CheckpointManager::save and is SIGKILLed at a
// random moment (before, during or after its save). The parent then resumes the way the trainer does
// (latest_valid, then load) and must find, bit for bit, either the checkpoint that was newest before the
// round or the child's whole new one: never a torn or mixed one, never none (Note [Atomic checkpoint
// directories] in checkpoints/checkpoint.h). Rounds alternate between the two paths save takes: the first
// save of a step, and a re-save of a step that already exists. The killed saves' leftovers stay in place, so
// every later save and load runs next to them.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"

namespace {
namespace fs = std::filesystem;
using vimo::checkpoints::Checkpoint;
using vimo::checkpoints::CheckpointManager;
using Clock = std::chrono::steady_clock;

constexpr int64_t kKeep = 2;  // A and B fit, so no round prunes; the final save of C prunes A
constexpr int64_t kStepA = 100, kStepB = 200, kStepC = 300;
constexpr int kRandomRounds = 16;
constexpr double kDelayRangeInSaveTimes = 1.5;  // random kills land before, during and after the save

// A training state, and the label that tells states apart in failure messages.
struct State {
  std::string label;
  vimo::checkpoints::TensorFile file;
  std::string loader_json;
};

// About 22 MiB of fresh random values, so that a save (write, fsync, checksum) lasts long enough for random
// kills to land inside it.
State large_random_state(const std::string& label) {
  State s;
  s.label = label;
  s.file.tensors["model.w"] = at::randn({1536, 2048});                         // F32, 12 MiB
  s.file.tensors["model.h"] = at::randn({1024, 1024}).to(at::kBFloat16);       // BF16, 2 MiB
  s.file.tensors["optim.exp_avg_sq"] = at::randn({512, 2048}, at::kDouble);    // F64, 8 MiB
  s.file.tensors["optim.count"] = at::randint(0, 1 << 30, {1024}, at::kLong);  // I64, 8 KiB
  s.file.metadata = {{"label", label}};
  s.loader_json = "{\"label\": \"" + label + "\"}";
  return s;
}

std::string config_yaml(const State& s) { return "label: " + s.label + "\n"; }

// Bitwise: same tensor names, dtypes, shapes and values, same metadata, loader state and config.
bool holds(const Checkpoint& loaded, const State& s) {
  if (loaded.state.tensors.size() != s.file.tensors.size()) return false;
  for (const auto& [name, expected] : s.file.tensors) {
    const auto it = loaded.state.tensors.find(name);
    if (it == loaded.state.tensors.end() || it->second.scalar_type() != expected.scalar_type() ||
        !it->second.sizes().equals(expected.sizes()) || !at::equal(it->second, expected)) {
      return false;
    }
  }
  return loaded.state.metadata == s.file.metadata && loaded.loader_json == s.loader_json &&
         loaded.config_yaml == config_yaml(s);
}

enum class Kill { BeforeSaveStarts, AfterDelay, AfterSaveExits };

struct ChildEnd {
  bool exited = false;  // ended on its own (the kill, if any, came too late) rather than by SIGKILL
  int exit_code = -1;
  double seconds = 0;  // from the child's go signal until it was reaped
};

// Forks a child that waits for a byte on a pipe, saves `state` as `step` under `root`, and _exits; kills it
// as `kill` says. Only the save runs in the child: no gtest, no LibTorch work beyond the save (the process
// has one intra-op thread, set before any fork), no destructors or atexit handlers of the parent's copy.
ChildEnd save_in_child(const std::string& root, int64_t step, const State& state, Kill kill,
                       std::chrono::microseconds delay) {
  int go[2];
  if (::pipe(go) != 0) throw std::runtime_error(std::string("pipe failed: ") + std::strerror(errno));
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(std::string("fork failed: ") + std::strerror(errno));
  if (pid == 0) {
    ::close(go[1]);
    char byte = 0;
    if (::read(go[0], &byte, 1) != 1) ::_exit(3);
    try {
      CheckpointManager(root, kKeep, nullptr).save(step, state.file, state.loader_json, config_yaml(state));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child %d: %s\n", ::getpid(), e.what());
      ::_exit(1);
    }
    ::_exit(0);
  }
  ::close(go[0]);
  const Clock::time_point start = Clock::now();
  if (kill == Kill::BeforeSaveStarts) {
    ::kill(pid, SIGKILL);
  } else {
    if (::write(go[1], "g", 1) != 1) throw std::runtime_error("cannot signal the saving child");
    if (kill == Kill::AfterDelay) {
      std::this_thread::sleep_for(delay);
      ::kill(pid, SIGKILL);  // a no-op when the child has already exited
    }
  }
  ::close(go[1]);
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid) throw std::runtime_error("waitpid on the saving child failed");
  ChildEnd end;
  end.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  end.exited = WIFEXITED(status);
  end.exit_code = end.exited ? WEXITSTATUS(status) : -1;
  return end;
}

// The names in `root` that are not step directories: what killed saves left behind.
std::vector<std::string> leftovers(const fs::path& root) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("step_", 0) != 0) names.push_back(name);
  }
  return names;
}

struct Round {
  bool resave;  // false: the child saves step B while only A exists; true: step B exists and is re-saved
  Kill kill;
};

// The parameter: whether re-saves may swap with renameat2(RENAME_EXCHANGE) (true, what local filesystems
// do) or take the two-rename path of filesystems without it (VIMO_CHECKPOINT_RENAME_EXCHANGE=0, inherited
// by the forked children; Note [A re-save cut between its two renames] in checkpoints/checkpoint.cpp).
class CheckpointCrash : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (!GetParam()) ::setenv("VIMO_CHECKPOINT_RENAME_EXCHANGE", "0", 1);
  }
  void TearDown() override { ::unsetenv("VIMO_CHECKPOINT_RENAME_EXCHANGE"); }
};

TEST_P(CheckpointCrash, KilledSaveLeavesThePreviousCheckpointOrTheWholeNewOne) {
  at::set_num_threads(1);  // before any fork: the children inherit no LibTorch worker threads
  const uint64_t seed = vimo::testing::seed_torch();
  std::mt19937_64 rng(seed);
  const fs::path scratch =
      vimo::testing::fresh_test_dir("checkpoint_crash", GetParam() ? "kill_exchange" : "kill_two_renames");
  const fs::path root = scratch / "checkpoints";
  CheckpointManager manager(root.string(), kKeep, nullptr);

  const State a = large_random_state("A");
  const std::string a_dir = manager.save(kStepA, a.file, a.loader_json, config_yaml(a));
  // What latest_valid must return before the next round: A, or the last whole save of step B.
  State newest = a;
  std::string newest_dir = a_dir;
  int64_t newest_step = kStepA;

  // Fixed rounds first (their outcomes are certain, and the first two measure the save), then random ones.
  std::vector<Round> rounds = {{false, Kill::AfterSaveExits},
                               {true, Kill::AfterSaveExits},
                               {false, Kill::BeforeSaveStarts},
                               {true, Kill::BeforeSaveStarts}};
  for (int i = 0; i < kRandomRounds; ++i) rounds.push_back({i % 2 == 1, Kill::AfterDelay});

  // The fastest measured child save, from go to reaped (one slow fsync is noise); the fixed rounds set it.
  double save_seconds = std::numeric_limits<double>::infinity();
  int outcomes[2][2] = {};  // [resave][new]
  int random_kills_after_exit = 0;
  int kills_next_to_partial_save = 0;  // killed rounds that found the previous state, a partial save on disk
  for (size_t r = 0; r < rounds.size(); ++r) {
    const Round& plan = rounds[r];
    // Set up the round's starting point with ordinary operations, next to the leftovers of earlier kills.
    if (!plan.resave && newest_dir != a_dir) {
      fs::remove_all(newest_dir);  // step B deleted by hand: A is the newest again
      newest = a, newest_dir = a_dir, newest_step = kStepA;
    } else if (plan.resave && newest_dir == a_dir) {
      newest = large_random_state("B" + std::to_string(r) + "-before");
      newest_dir = manager.save(kStepB, newest.file, newest.loader_json, config_yaml(newest));
      newest_step = kStepB;
    }
    const State next = large_random_state("B" + std::to_string(r));

    std::chrono::microseconds delay{0};
    if (plan.kill == Kill::AfterDelay) {
      std::uniform_real_distribution<double> seconds(0.0, kDelayRangeInSaveTimes * save_seconds);
      delay = std::chrono::microseconds(static_cast<int64_t>(seconds(rng) * 1e6));
    }
    const ChildEnd end = save_in_child(root.string(), kStepB, next, plan.kill, delay);
    std::ostringstream context;
    context << "round " << r << " (" << (plan.resave ? "re-save of step B" : "first save of step B")
            << ", child " << (end.exited ? "exited" : "killed") << " after " << end.seconds * 1e3 << " ms";
    if (plan.kill == Kill::AfterDelay) context << ", kill sent after " << delay.count() << " us";
    context << "; newest before: " << newest.label << ", child saved: " << next.label << ")";
    SCOPED_TRACE(context.str());
    if (end.exited) {
      ASSERT_EQ(end.exit_code, 0) << "the save failed next to the leftovers "
                                  << ::testing::PrintToString(leftovers(root));
    }
    if (plan.kill == Kill::AfterSaveExits) save_seconds = std::min(save_seconds, end.seconds);
    if (plan.kill == Kill::AfterDelay && end.exited) ++random_kills_after_exit;

    // Resume as the trainer does: the newest directory that verifies, then load it.
    const std::optional<std::string> found = CheckpointManager::latest_valid(root.string());
    ASSERT_TRUE(found) << "no valid checkpoint left: the previous one was lost";
    const Checkpoint loaded = CheckpointManager::load(*found);  // throws, naming the file, if torn
    const bool got_new = holds(loaded, next);
    const bool got_previous = holds(loaded, newest);
    ASSERT_TRUE(got_new || got_previous)
        << *found << " (step " << loaded.step << ") holds neither " << newest.label << " nor " << next.label
        << (holds(loaded, a) ? ": the previous checkpoint was lost, resume fell back to A"
                             : ": a torn or mixed checkpoint");
    if (got_new) {
      EXPECT_EQ(loaded.step, kStepB);
      EXPECT_TRUE(fs::exists(fs::path(*found) / "manifest.json"));
    } else {
      EXPECT_EQ(*found, newest_dir) << "the previous checkpoint was not the one found";
      EXPECT_EQ(loaded.step, newest_step);
    }
    if (end.exited) {
      EXPECT_TRUE(got_new) << "the child's save completed, yet " << newest.label << " was found";
    }
    if (plan.kill == Kill::BeforeSaveStarts) {
      EXPECT_TRUE(got_previous) << "the child was killed before it began, yet the checkpoint changed";
    }
    // No step directory is ever visible half-written, newest or not (no round prunes, see kKeep).
    for (const std::string& dir : vimo::checkpoints::list_step_directories(root.string())) {
      EXPECT_NO_THROW(CheckpointManager::load(dir)) << dir;
    }
    ++outcomes[plan.resave][got_new];
    if (!end.exited && got_previous && !leftovers(root).empty()) ++kills_next_to_partial_save;
    if (got_new) newest = next, newest_dir = *found, newest_step = kStepB;
  }

  // A normal save after all the kills succeeds and becomes the newest.
  const State c = large_random_state("C");
  const std::string c_dir = manager.save(kStepC, c.file, c.loader_json, config_yaml(c));
  const std::optional<std::string> found = CheckpointManager::latest_valid(root.string());
  ASSERT_TRUE(found);
  EXPECT_EQ(*found, c_dir);
  const Checkpoint loaded = CheckpointManager::load(*found);
  EXPECT_EQ(loaded.step, kStepC);
  EXPECT_TRUE(holds(loaded, c));

  const std::vector<std::string> left = leftovers(root);
  std::ostringstream report;
  report << "save takes " << save_seconds * 1e3 << " ms; first save of B: " << outcomes[0][0]
         << " rounds found A, " << outcomes[0][1] << " found B; re-save of B: " << outcomes[1][0]
         << " found the previous B, " << outcomes[1][1] << " the new one; " << random_kills_after_exit
         << " of " << kRandomRounds << " random kills came after the save exited; "
         << kills_next_to_partial_save
         << " kills found the previous state beside a partial save; leftovers after the save of C: "
         << ::testing::PrintToString(left);
  std::cout << "[ crash    ] " << report.str() << "\n";
  ::testing::Test::RecordProperty("first_save_found_A", outcomes[0][0]);
  ::testing::Test::RecordProperty("first_save_found_B", outcomes[0][1]);
  ::testing::Test::RecordProperty("resave_found_previous", outcomes[1][0]);
  ::testing::Test::RecordProperty("resave_found_new", outcomes[1][1]);
  ::testing::Test::RecordProperty("kills_next_to_partial_save", kills_next_to_partial_save);
  ::testing::Test::RecordProperty("save_ms", static_cast<int>(save_seconds * 1e3));
  if (!HasFailure()) fs::remove_all(scratch);  // ~70 MiB per run; kept when a check failed
}

INSTANTIATE_TEST_SUITE_P(ReSaves, CheckpointCrash, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "RenameExchange" : "TwoRenames";
                         });

}  // namespace
