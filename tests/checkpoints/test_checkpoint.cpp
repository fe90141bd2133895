// Checkpoints: safetensors round trip and layout, atomic directories, fallback past corrupt or
// incomplete checkpoints, retention.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "checkpoints/checkpoint.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"

namespace {
namespace fs = std::filesystem;
using vimo::checkpoints::CheckpointManager;
using vimo::checkpoints::TensorFile;

fs::path fresh_dir(const std::string& name) { return vimo::testing::fresh_test_dir("checkpoint", name); }

TensorFile random_state() {
  TensorFile f;
  f.tensors["model.w"] = at::randn({3, 4});
  f.tensors["model.b"] = at::randn({4}, at::kDouble);
  f.tensors["model.h"] = at::randn({2, 2}).to(at::kBFloat16);
  f.tensors["optim.count"] = at::randint(0, 100, {5}, at::kLong);
  f.tensors["scalar"] = at::randn({});
  f.metadata = {{"step", "7"}, {"stage", "action"}};
  return f;
}

void expect_same(const TensorFile& a, const TensorFile& b) {
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, t] : a.tensors) {
    ASSERT_TRUE(b.tensors.count(name)) << name;
    EXPECT_EQ(t.scalar_type(), b.tensors.at(name).scalar_type()) << name;
    EXPECT_TRUE(at::equal(t, b.tensors.at(name))) << name;
  }
  EXPECT_EQ(a.metadata, b.metadata);
}

TEST(Safetensors, RoundTripAndLayout) {
  vimo::testing::seed_torch();
  const fs::path dir = fresh_dir("st");
  const TensorFile state = random_state();
  vimo::checkpoints::write_safetensors((dir / "x.safetensors").string(), state);
  expect_same(state, vimo::checkpoints::read_safetensors((dir / "x.safetensors").string()));
  // The layout Python's safetensors reads: u64 header length, JSON header, data; offsets cover the data.
  std::ifstream in(dir / "x.safetensors", std::ios::binary);
  uint64_t length = 0;
  in.read(reinterpret_cast<char*>(&length), 8);
  std::string header(length, '\0');
  in.read(header.data(), length);
  EXPECT_EQ(length % 8, 0u);
  auto json = nlohmann::json::parse(header);
  EXPECT_EQ(json["model.w"]["dtype"], "F32");
  EXPECT_EQ(json["model.h"]["dtype"], "BF16");
  EXPECT_EQ(json["model.w"]["shape"], nlohmann::json({3, 4}));
  EXPECT_EQ(json["__metadata__"]["step"], "7");
  uint64_t end = 0;
  for (auto& [k, v] : json.items())
    if (k != "__metadata__") end = std::max<uint64_t>(end, v["data_offsets"][1]);
  EXPECT_EQ(fs::file_size(dir / "x.safetensors"), 8 + length + end);
}

TEST(Safetensors, TruncatedFileNamesTheTensor) {
  const fs::path dir = fresh_dir("trunc");
  TensorFile f;
  f.tensors["big"] = at::randn({100});
  const std::string path = (dir / "t.safetensors").string();
  vimo::checkpoints::write_safetensors(path, f);
  fs::resize_file(path, fs::file_size(path) - 10);
  try {
    vimo::checkpoints::read_safetensors(path);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("big"), std::string::npos) << e.what();
  }
}

TEST(Checkpoint, SaveLoadRetainAndFallBackPastCorruption) {
  vimo::testing::seed_torch();
  const fs::path root = fresh_dir("mgr") / "checkpoints";
  CheckpointManager manager(root.string(), /*keep=*/2, nullptr);
  std::map<int64_t, TensorFile> saved;
  for (int64_t step : {10, 20, 30}) {
    saved[step] = random_state();
    manager.save(step, saved[step], "{\"epoch\": 1}", "train:\n  steps: 30\n");
  }
  // Retention: only the newest two remain, and no temporary directories.
  std::vector<std::string> left = vimo::checkpoints::list_step_directories(root.string());
  ASSERT_EQ(left.size(), 2u);
  for (const auto& entry : fs::directory_iterator(root))
    EXPECT_EQ(entry.path().filename().string().rfind(".", 0), std::string::npos);
  auto latest = CheckpointManager::latest_valid(root.string());
  ASSERT_TRUE(latest);
  auto loaded = CheckpointManager::load(*latest);
  EXPECT_EQ(loaded.step, 30);
  expect_same(saved[30], loaded.state);
  EXPECT_EQ(loaded.loader_json, "{\"epoch\": 1}");

  // Flip one byte of the newest state file: resume falls back to step 20 and load names the file.
  const fs::path state = fs::path(*latest) / "rank_00000.safetensors";
  {
    std::fstream f(state, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(state) - 3));
    char c = 0;
    f.read(&c, 1);
    f.seekp(static_cast<std::streamoff>(fs::file_size(state) - 3));
    c ^= 0x40;
    f.write(&c, 1);
  }
  try {
    CheckpointManager::load(*latest);
    FAIL() << "a corrupt checkpoint loaded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("rank_00000.safetensors"), std::string::npos) << e.what();
  }
  auto fallback = CheckpointManager::latest_valid(root.string());
  ASSERT_TRUE(fallback);
  EXPECT_EQ(CheckpointManager::load(*fallback).step, 20);
  expect_same(saved[20], CheckpointManager::load(*fallback).state);
}

TEST(Checkpoint, DirectoryWithoutManifestIsIgnored) {
  const fs::path root = fresh_dir("partial") / "checkpoints";
  CheckpointManager manager(root.string(), 3, nullptr);
  manager.save(5, random_state(), "{}", "");
  // A crash before the manifest: a step directory with data but no manifest (e.g. copied by hand).
  fs::create_directories(root / "step_00000009");
  std::ofstream(root / "step_00000009" / "rank_00000.safetensors") << "partial";
  EXPECT_EQ(CheckpointManager::load(*CheckpointManager::latest_valid(root.string())).step, 5);
  EXPECT_THROW(CheckpointManager::load((root / "step_00000009").string()), std::runtime_error);
}

TEST(Checkpoint, ResavingAStepReplacesItWhole) {
  const fs::path root = fresh_dir("resave") / "checkpoints";
  CheckpointManager manager(root.string(), 3, nullptr);
  TensorFile first = random_state(), second = random_state();
  manager.save(4, first, "{}", "");
  manager.save(4, second, "{}", "");
  expect_same(second, CheckpointManager::load((root / "step_00000004").string()).state);
}

// Note [A re-save cut between its two renames]: where the filesystem has no RENAME_EXCHANGE, a crash between
// the two renames leaves step N only as .step_N.old. Resume must find it, and the next save must put it back.
TEST(Checkpoint, AReSaveCutBetweenItsTwoRenamesIsFoundAndRestored) {
  const fs::path root = fresh_dir("cut_resave") / "checkpoints";
  CheckpointManager manager(root.string(), 3, nullptr);
  const TensorFile kept = random_state(), next = random_state();
  manager.save(4, kept, "{\"epoch\": 1}", "");
  fs::rename(root / "step_00000004", root / ".step_00000004.old");  // the state the crash leaves
  fs::create_directories(root / ".step_00000009.tmp");              // and a crashed save of another step
  std::ofstream(root / ".step_00000009.tmp" / "rank_00000.safetensors") << "partial";

  const auto found = CheckpointManager::latest_valid(root.string());
  ASSERT_TRUE(found);
  EXPECT_EQ(fs::path(*found).filename(), ".step_00000004.old");
  expect_same(kept, CheckpointManager::load(*found).state);
  EXPECT_EQ(CheckpointManager::load(*found).loader_json, "{\"epoch\": 1}");

  manager.save(5, next, "{}", "");
  EXPECT_FALSE(fs::exists(root / ".step_00000004.old"));
  EXPECT_FALSE(fs::exists(root / ".step_00000009.tmp"));
  expect_same(kept, CheckpointManager::load((root / "step_00000004").string()).state);
  EXPECT_EQ(*CheckpointManager::latest_valid(root.string()), (root / "step_00000005").string());
}

TEST(Checkpoint, AnOldCopyBesideItsStepIsNotListedAndIsRemovedByTheNextSave) {
  const fs::path root = fresh_dir("old_beside") / "checkpoints";
  CheckpointManager manager(root.string(), 3, nullptr);
  const TensorFile first = random_state(), second = random_state();
  manager.save(4, first, "{}", "");
  fs::copy(root / "step_00000004", root / ".step_00000004.old", fs::copy_options::recursive);
  ASSERT_EQ(vimo::checkpoints::list_step_directories(root.string()),
            std::vector<std::string>{(root / "step_00000004").string()});
  manager.save(7, second, "{}", "");
  EXPECT_FALSE(fs::exists(root / ".step_00000004.old"));
  EXPECT_EQ(vimo::checkpoints::list_step_directories(root.string()),
            (std::vector<std::string>{(root / "step_00000004").string(), (root / "step_00000007").string()}));
}

// Retention counts only complete checkpoints older than the one just saved: a torn directory of a later step
// (from before a resume that fell back past it) must not push the new checkpoint out.
TEST(Checkpoint, RetentionNeverRemovesTheCheckpointJustSaved) {
  const fs::path root = fresh_dir("retain_torn") / "checkpoints";
  CheckpointManager manager(root.string(), /*keep=*/1, nullptr);
  const TensorFile first = random_state(), second = random_state();
  manager.save(10, first, "{}", "");
  fs::create_directories(root / "step_00000030");  // torn: no manifest
  manager.save(20, second, "{}", "");
  EXPECT_FALSE(fs::exists(root / "step_00000010"));
  EXPECT_TRUE(fs::exists(root / "step_00000030"));
  const auto latest = CheckpointManager::latest_valid(root.string());
  ASSERT_TRUE(latest);
  EXPECT_EQ(*latest, (root / "step_00000020").string());
  expect_same(second, CheckpointManager::load(*latest).state);
}

// step_name pads to 8 digits; step 100000000 has 9 and must still sort after step 99999999.
TEST(Checkpoint, StepsPastEightDigitsSortByNumber) {
  const fs::path root = fresh_dir("nine_digits") / "checkpoints";
  CheckpointManager manager(root.string(), /*keep=*/1, nullptr);
  const TensorFile first = random_state(), second = random_state();
  manager.save(99999999, first, "{}", "");
  manager.save(100000000, second, "{}", "");
  EXPECT_EQ(vimo::checkpoints::list_step_directories(root.string()),
            std::vector<std::string>{(root / "step_100000000").string()});
  expect_same(second, CheckpointManager::load(*CheckpointManager::latest_valid(root.string())).state);
}

TEST(Checkpoint, AStandInThatDoesNotVerifyIsNotRestored) {
  const fs::path root = fresh_dir("bad_stand_in") / "checkpoints";
  CheckpointManager manager(root.string(), 3, nullptr);
  manager.save(4, random_state(), "{}", "");
  fs::rename(root / "step_00000004", root / ".step_00000004.old");
  fs::remove(root / ".step_00000004.old" / "manifest.json");  // half deleted
  EXPECT_FALSE(CheckpointManager::latest_valid(root.string()));
  manager.save(5, random_state(), "{}", "");
  EXPECT_FALSE(fs::exists(root / "step_00000004"));
  EXPECT_FALSE(fs::exists(root / ".step_00000004.old"));
  EXPECT_EQ(*CheckpointManager::latest_valid(root.string()), (root / "step_00000005").string());
}

// Note [Saving in the background]: save_async returns before the checkpoint is written, from a snapshot: the
// state changed in place right after it (as the next training step does) must not reach the file. 32 MiB of
// float32 take a writer tens of milliseconds, so without the snapshot the zeroing below lands in the file.
// Then the next save waits for this one, and wait() returns the directory.
TEST(Checkpoint, ASaveInTheBackgroundWritesTheStateAsItWasWhenAsked) {
  vimo::testing::seed_torch();
  const fs::path dir = fresh_dir("background");
  CheckpointManager manager((dir / "checkpoints").string(), 3, nullptr);
  TensorFile state = random_state();
  state.tensors["model.big"] = at::randn({8 * 1024 * 1024});
  TensorFile expected;
  expected.metadata = state.metadata;
  for (const auto& [name, t] : state.tensors) expected.tensors[name] = t.clone();
  const std::string target = manager.save_async(3, state, "{}", "");
  for (auto& [name, t] : state.tensors) t.zero_();  // the next step, in place
  EXPECT_EQ(manager.wait(), target);
  expect_same(CheckpointManager::load(target).state, expected);
  EXPECT_EQ(manager.wait(), "");  // none in flight
  // A second save_async waits for the first: both end up whole.
  manager.save_async(4, expected, "{}", "");
  manager.save_async(5, expected, "{}", "");
  manager.wait();
  expect_same(CheckpointManager::load((dir / "checkpoints" / "step_00000004").string()).state, expected);
  expect_same(CheckpointManager::load((dir / "checkpoints" / "step_00000005").string()).state, expected);
}

// A background save that fails is reported by wait() (and so by the next save), naming the cause.
TEST(Checkpoint, AFailedBackgroundSaveIsReportedByTheNextWait) {
  const fs::path dir = fresh_dir("background_failure");
  std::ofstream(dir / "not_a_directory") << "x";  // the root's parent is a file: nothing can be made under it
  CheckpointManager manager((dir / "not_a_directory" / "checkpoints").string(), 3, nullptr);
  manager.save_async(1, random_state(), "{}", "");
  try {
    manager.wait();
    ADD_FAILURE() << "wait() returned after a failed save";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("checkpoint save failed: "), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("not_a_directory"), std::string::npos) << e.what();
  }
  EXPECT_EQ(manager.wait(), "");  // reported once
}

}  // namespace
