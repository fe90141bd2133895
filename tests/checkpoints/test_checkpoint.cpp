// Checkpoints: safetensors round trip and layout, atomic directories, fallback past corrupt or
// incomplete checkpoints, retention.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "checkpoints/checkpoint.h"
#include "checkpoints/sharded_state.h"
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

// A background save that fails is reported by wait() (and so by the next save), naming the cause; one that
// cannot even make its directory fails in save_async(), before a thread starts.
TEST(Checkpoint, AFailedBackgroundSaveIsReportedByTheNextWait) {
  const fs::path dir = fresh_dir("background_failure");
  CheckpointManager manager((dir / "checkpoints").string(), 3, nullptr);
  TensorFile unwritable = random_state();
  unwritable.tensors["model.flags"] = at::ones({3}, at::kBool);  // a dtype safetensors files here cannot hold
  manager.save_async(1, unwritable, "{}", "");
  vimo::testing::expect_error([&] { manager.wait(); }, {"checkpoint save failed: ", "unsupported dtype"});
  EXPECT_EQ(manager.wait(), "");  // reported once
  EXPECT_FALSE(CheckpointManager::latest_valid((dir / "checkpoints").string()));

  std::ofstream(dir / "not_a_directory") << "x";  // the root's parent is a file: nothing can be made under it
  CheckpointManager nowhere((dir / "not_a_directory" / "checkpoints").string(), 3, nullptr);
  vimo::testing::expect_error([&] { nowhere.save_async(1, random_state(), "{}", ""); },
                              {"checkpoint save failed: ", "not_a_directory"});
  EXPECT_EQ(nowhere.wait(), "");
}

// Ranges read through a file's index are the tensor's flattened elements, in its dtype.
TEST(Safetensors, ElementRangesReadThroughTheIndexAreTheTensorsOwn) {
  vimo::testing::seed_torch();
  const fs::path dir = fresh_dir("ranges");
  TensorFile f;
  f.tensors["a"] = at::randn({7, 5});
  f.tensors["b"] = at::randn({13}, at::kDouble);
  f.tensors["c"] = at::randn({3, 2, 2}).to(at::kBFloat16);
  const std::string path = (dir / "r.safetensors").string();
  vimo::checkpoints::write_safetensors(path, f);
  const vimo::checkpoints::TensorFileIndex index = vimo::checkpoints::read_safetensors_index(path);
  ASSERT_EQ(index.tensors.size(), 3u);
  for (const auto& [name, t] : f.tensors) {
    const at::Tensor flat = t.reshape(-1);
    for (int trial = 0; trial < 10; ++trial) {
      const int64_t first = at::randint(0, flat.numel() + 1, {1}).item<int64_t>();
      const int64_t count = at::randint(0, flat.numel() - first + 1, {1}).item<int64_t>();
      const at::Tensor got = vimo::checkpoints::read_safetensors_elements(index, name, first, count);
      EXPECT_EQ(got.scalar_type(), t.scalar_type()) << name;
      EXPECT_TRUE(at::equal(got, flat.narrow(0, first, count)))
          << name << " [" << first << ", +" << count << ")";
    }
  }
  vimo::testing::expect_error([&] { vimo::checkpoints::read_safetensors_elements(index, "a", 30, 6); },
                              {path, "'a'", "[30, 36)", "35"});
}

// Note [Tensors saved in pieces]: tensors cut at random places into pieces spread over several files, beside
// tensors saved whole, read back in any range and whole as they were.
TEST(StateReader, ReadsAnyRangeAcrossPiecesInSeveralFiles) {
  vimo::testing::seed_torch();
  const fs::path dir = fresh_dir("pieces");
  const int files = 3;
  std::map<std::string, at::Tensor> whole = {{"optim.w.exp_avg", at::randn({9, 7})},
                                             {"optim.b.exp_avg", at::randn({11}, at::kDouble)},
                                             {"optim.h.exp_avg", at::randn({4, 3}).to(at::kBFloat16)},
                                             {"optim.one.exp_avg", at::randn({1})}};
  std::vector<TensorFile> parts(files);
  parts[0].tensors["model.kept_whole"] = at::randn({2, 3});
  for (const auto& [name, t] : whole) {
    // Cut points 0, two random ones (equal ones give empty pieces) and numel: one piece per file (a file
    // holds one piece of a tensor), to the files in a random order.
    std::vector<int64_t> cuts = {0, t.numel()};
    for (int i = 0; i + 1 < files; ++i) cuts.push_back(at::randint(0, t.numel() + 1, {1}).item<int64_t>());
    std::sort(cuts.begin(), cuts.end());
    const at::Tensor order = at::randperm(files, at::kLong);
    std::vector<std::map<std::string, vimo::checkpoints::TensorPiece>> pieces(files);
    for (int i = 0; i < files; ++i) {
      pieces[order[i].item<int64_t>()][name] = {t.reshape(-1).narrow(0, cuts[i], cuts[i + 1] - cuts[i]),
                                                cuts[i], t.sizes().vec()};
    }
    for (int f = 0; f < files; ++f) vimo::checkpoints::add_pieces(parts[f], pieces[f]);
  }
  std::vector<std::string> paths;
  for (int f = 0; f < files; ++f) {
    paths.push_back((dir / ("rank_" + std::to_string(f) + ".safetensors")).string());
    vimo::checkpoints::write_safetensors(paths.back(), parts[f]);
  }
  const vimo::checkpoints::StateReader reader(paths);
  whole["model.kept_whole"] = parts[0].tensors.at("model.kept_whole");
  for (const auto& [name, t] : whole) {
    ASSERT_TRUE(reader.contains(name)) << name;
    EXPECT_EQ(reader.shape(name), t.sizes().vec()) << name;
    const at::Tensor got = reader.read_whole(name);
    EXPECT_EQ(got.scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(at::equal(got, t)) << name;
    for (int trial = 0; trial < 10; ++trial) {
      const int64_t first = at::randint(0, t.numel() + 1, {1}).item<int64_t>();
      const int64_t count = at::randint(0, t.numel() - first + 1, {1}).item<int64_t>();
      EXPECT_TRUE(at::equal(reader.read(name, first, count), t.reshape(-1).narrow(0, first, count)))
          << name << " [" << first << ", +" << count << ")";
    }
  }
  EXPECT_FALSE(reader.contains("optim.absent.exp_avg"));
  vimo::testing::expect_error([&] { reader.shape("optim.absent.exp_avg"); },
                              {"'optim.absent.exp_avg' is missing from the checkpoint"});
}

// A tensor whose pieces leave a gap, overlap or disagree on its shape is an error naming it and the files.
TEST(StateReader, AGapAnOverlapOrADisagreementBetweenPiecesIsNamed) {
  const fs::path dir = fresh_dir("bad_pieces");
  const at::Tensor t = at::arange(10, at::kFloat);
  const auto write = [&](const std::string& name, int64_t offset, int64_t count, std::vector<int64_t> shape) {
    TensorFile f;
    vimo::checkpoints::add_pieces(f, {{"optim.x", {t.narrow(0, offset, count), offset, std::move(shape)}}});
    const std::string path = (dir / name).string();
    vimo::checkpoints::write_safetensors(path, f);
    return path;
  };
  const std::string first = write("a", 0, 4, {10}), gap = write("b", 6, 4, {10}),
                    overlap = write("c", 3, 7, {10}), other = write("d", 4, 6, {2, 5}),
                    short_end = write("e", 4, 5, {10});
  vimo::testing::expect_error(
      [&] {
        vimo::checkpoints::StateReader(std::vector<std::string>{first, gap});
      },
      {"'optim.x'", "no piece holding", "[4, 6)", first, gap});
  vimo::testing::expect_error(
      [&] {
        vimo::checkpoints::StateReader(std::vector<std::string>{first, overlap});
      },
      {"'optim.x'", "two copies of", "[3, 4)"});
  vimo::testing::expect_error(
      [&] {
        vimo::checkpoints::StateReader(std::vector<std::string>{first, other});
      },
      {"'optim.x'", "[10]", "[2, 5]", other});
  vimo::testing::expect_error(
      [&] {
        vimo::checkpoints::StateReader(std::vector<std::string>{first, short_end});
      },
      {"'optim.x'", "no piece holding", "[9, 10)"});
  TensorFile misfit;
  EXPECT_THROW(vimo::checkpoints::add_pieces(misfit, {{"optim.x", {t, 1, {10}}}}), std::invalid_argument);
}

// Bytes this process has read through read(2) and the like so far (rchar in /proc/self/io).
int64_t bytes_read_so_far() {
  std::ifstream io("/proc/self/io");
  std::string key;
  int64_t value = 0;
  while (io >> key >> value) {
    if (key == "rchar:") return value;
  }
  return -1;
}

// load() checksums rank 0's state file as it reads it: one pass over the file, not a pass to verify and
// another to read. A corrupted byte is still an error naming the file.
TEST(Checkpoint, LoadReadsTheStateFileOnceAndStillChecksumsIt) {
  vimo::testing::seed_torch();
  const fs::path root = fresh_dir("one_pass") / "checkpoints";
  TensorFile state = random_state();
  state.tensors["model.big"] = at::randn({4 * 1024 * 1024});  // 16 MiB
  const std::string dir = CheckpointManager(root.string(), 2, nullptr).save(1, state, "{}", "");
  const int64_t file_bytes = static_cast<int64_t>(fs::file_size(fs::path(dir) / "rank_00000.safetensors"));
  const int64_t before = bytes_read_so_far();
  expect_same(CheckpointManager::load(dir).state, state);
  const int64_t read = bytes_read_so_far() - before;
  EXPECT_GE(read, file_bytes);
  EXPECT_LT(read, file_bytes + file_bytes / 8) << "load() read the state file more than once";

  std::fstream file(fs::path(dir) / "rank_00000.safetensors",
                    std::ios::in | std::ios::out | std::ios::binary);
  file.seekg(-3, std::ios::end);
  const char byte = static_cast<char>(file.get() ^ 0x11);
  file.seekp(-3, std::ios::end);
  file.put(byte);
  file.close();
  vimo::testing::expect_error([&] { CheckpointManager::load(dir); }, {"rank_00000.safetensors", "checksum"});
  vimo::testing::expect_error([&] { CheckpointManager::load(dir, vimo::checkpoints::Checksums::kShared); },
                              {"rank_00000.safetensors", "checksum"});
}

}  // namespace
