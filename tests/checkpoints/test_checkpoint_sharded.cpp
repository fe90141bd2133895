// Sharded checkpoints under mpirun (Note [Every rank writes its own part] in checkpoints/checkpoint.h): every
// rank writes its own pieces of tensors at once, rank 0 publishes the directory once every part is durable,
// and any range reads back from whichever files hold it; a rank that fails to write fails the save on every
// rank and leaves the previous checkpoint the newest.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "checkpoints/sharded_state.h"
#include "tests/comm/collective_reference.h"
#include "tests/test_support.h"

namespace {
namespace fs = std::filesystem;
using vimo::checkpoints::CheckpointManager;
using vimo::checkpoints::TensorFile;
using vimo::checkpoints::TensorPiece;
using vimo::testing::mpi_world;

fs::path shared_dir(const std::string& name) {
  return vimo::testing::shared_test_dir("checkpoint_sharded", name);
}

// Whole tensors, the same on every rank (made from the shared seed): some smaller than the number of ranks,
// so that some ranks hold none of them.
std::map<std::string, at::Tensor> whole_state(uint64_t seed) {
  at::manual_seed(seed);
  return {{"optim.w.exp_avg", at::randn({37, 5})},
          {"optim.b.exp_avg", at::randn({3}, at::kDouble)},
          {"optim.e.exp_avg", at::randn({2, 3, 4}).to(at::kBFloat16)},
          {"optim.one.exp_avg", at::randn({1})}};
}

// This rank's pieces: each tensor's flattened elements cut into `ranks` runs of ceil(numel / ranks), the last
// ones short or empty, as ZeroAdamW cuts its flat vector.
TensorFile own_part(const std::map<std::string, at::Tensor>& whole, int rank, int ranks) {
  std::map<std::string, TensorPiece> pieces;
  for (const auto& [name, t] : whole) {
    const int64_t per_rank = (t.numel() + ranks - 1) / ranks;
    const int64_t first = std::min(t.numel(), rank * per_rank), last = std::min(t.numel(), first + per_rank);
    if (first < last)
      pieces[name] = {t.reshape(-1).narrow(0, first, last - first).clone(), first, t.sizes().vec()};
  }
  TensorFile own;
  vimo::checkpoints::add_pieces(own, pieces);
  return own;
}

TensorFile replicated_state() {
  TensorFile state;
  state.tensors["model.w"] = at::arange(12, at::kFloat).view({3, 4});
  state.metadata = {{"step", "1"}};
  return state;
}

TEST(ShardedCheckpoint, EveryRankWritesItsPartAndAnyRangeReadsBackWhole) {
  const uint64_t seed = vimo::testing::shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const fs::path root = shared_dir("parts") / "checkpoints";
  const std::map<std::string, at::Tensor> whole = whole_state(seed);
  CheckpointManager manager(root.string(), 2, mpi_world());
  TensorFile own = own_part(whole, rank, ranks);
  const std::string target = manager.save_async(4, replicated_state(), "{}", "a: 1\n", &own);
  for (auto& [name, t] : own.tensors) t.zero_();  // the next step, in place: the snapshot must not see it
  ASSERT_EQ(manager.wait(), target);

  const vimo::checkpoints::Checkpoint loaded = CheckpointManager::load(target);
  ASSERT_EQ(loaded.rank_files.size(), static_cast<size_t>(ranks));
  EXPECT_TRUE(at::equal(loaded.state.tensors.at("model.w"), replicated_state().tensors.at("model.w")));
  // Each rank's file holds its own pieces and nothing of another's (rank 0's also the replicated state).
  const TensorFile mine = vimo::checkpoints::read_safetensors(loaded.rank_files[rank]);
  const TensorFile expected = own_part(whole, rank, ranks);
  EXPECT_EQ(mine.tensors.size(), expected.tensors.size() + (rank == 0 ? 1 : 0));
  for (const auto& [name, t] : expected.tensors) {
    ASSERT_TRUE(mine.tensors.count(name)) << name;
    EXPECT_TRUE(at::equal(mine.tensors.at(name), t)) << name;
  }
  // Any range, and every tensor whole, from the pieces of all ranks; no marks or temporary files are left.
  const vimo::checkpoints::StateReader reader(loaded);
  for (const auto& [name, t] : whole) {
    EXPECT_TRUE(at::equal(reader.read_whole(name), t)) << name;
    const int64_t first = at::randint(0, t.numel() + 1, {1}).item<int64_t>();
    const int64_t count = at::randint(0, t.numel() - first + 1, {1}).item<int64_t>();
    EXPECT_TRUE(at::equal(reader.read(name, first, count), t.reshape(-1).narrow(0, first, count))) << name;
  }
  for (const auto& entry : fs::directory_iterator(target))
    EXPECT_NE(entry.path().filename().string().front(), '.') << entry.path();
  mpi_world()->barrier();
}

// A rank whose part cannot be written (a dtype the file cannot hold) fails the save on every rank: that rank
// with its own error, the others naming it. The step is never published, and the previous checkpoint stays
// the newest; the next save cleans up and succeeds.
TEST(ShardedCheckpoint, ARankThatCannotWriteItsPartFailsTheSaveEverywhereAndKeepsThePreviousOne) {
  const uint64_t seed = vimo::testing::shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const fs::path root = shared_dir("failure") / "checkpoints";
  const std::map<std::string, at::Tensor> whole = whole_state(seed);
  CheckpointManager manager(root.string(), 3, mpi_world());
  TensorFile own = own_part(whole, rank, ranks);
  const std::string first = manager.save(1, replicated_state(), "{}", "", &own);

  const int failing = ranks - 1;
  TensorFile bad = own;
  if (rank == failing) bad.tensors["optim.flags"] = at::ones({2}, at::kBool);
  manager.save_async(2, replicated_state(), "{}", "", &bad);
  if (rank == failing) {
    vimo::testing::expect_error(
        [&] { manager.wait(); },
        {"checkpoint save failed: ", "rank " + std::to_string(failing), "unsupported dtype"});
  } else {
    vimo::testing::expect_error(
        [&] { manager.wait(); },
        {"checkpoint save failed: rank(s) " + std::to_string(failing), "step_00000002"});
  }
  EXPECT_EQ(CheckpointManager::latest_valid(root.string()), first);
  EXPECT_FALSE(fs::exists(root / "step_00000002"));

  const std::string third = manager.save(3, replicated_state(), "{}", "", &own);
  EXPECT_EQ(CheckpointManager::latest_valid(root.string()), third);
  EXPECT_FALSE(fs::exists(root / ".step_00000002.tmp"));
  mpi_world()->barrier();
}

// Every rank passes a part of its own, or none does: a mix is refused on every rank, naming this rank's side.
TEST(ShardedCheckpoint, RanksThatDisagreeOnWritingPartsAreRefused) {
  const int rank = mpi_world()->rank();
  const fs::path root = shared_dir("disagree") / "checkpoints";
  CheckpointManager manager(root.string(), 3, mpi_world());
  TensorFile own;
  try {
    manager.save_async(1, replicated_state(), "{}", "", rank == 0 ? &own : nullptr);
    ADD_FAILURE() << "a mixed save was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(rank == 0 ? "this rank: a part" : "this rank: none"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(manager.wait(), "");
  EXPECT_FALSE(CheckpointManager::latest_valid(root.string()));
  mpi_world()->barrier();
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

// Note [One checkpoint for every rank]: rank 0 checksums every file when it picks the checkpoint, so a file
// corrupted in place (same size) sends every rank back to the previous checkpoint; the other ranks only check
// sizes there, reading next to nothing of a large checkpoint, and load() with Checksums::kShared checksums
// only the files every rank reads whole.
TEST(ShardedCheckpoint, RankZeroAloneChecksumsTheWholeCheckpointWhenTheRanksAgreeOnIt) {
  const uint64_t seed = vimo::testing::shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const fs::path root = shared_dir("agree") / "checkpoints";
  std::map<std::string, at::Tensor> whole = whole_state(seed);
  whole["optim.big.exp_avg"] = at::randn({2 * 1024 * 1024});  // 8 MiB over the ranks' files
  CheckpointManager manager(root.string(), 3, mpi_world());
  const TensorFile own = own_part(whole, rank, ranks);
  const std::string first = manager.save(1, replicated_state(), "{}", "", &own);
  const std::string second = manager.save(2, replicated_state(), "{}", "", &own);

  const int64_t before = bytes_read_so_far();
  EXPECT_EQ(CheckpointManager::agreed_latest_valid(root.string(), mpi_world()), second);
  const int64_t agreement = bytes_read_so_far() - before;
  if (rank != 0) {
    EXPECT_LT(agreement, 64 * 1024) << "rank " << rank << " read the checkpoint to agree on it";
  }

  // Flip one byte of the last rank's file: same size, another checksum.
  const fs::path last = fs::path(second) / fmt::format("rank_{:05d}.safetensors", ranks - 1);
  mpi_world()->barrier();
  if (rank == 0) {
    std::fstream file(last, std::ios::in | std::ios::out | std::ios::binary);
    file.seekg(-1, std::ios::end);
    const char byte = static_cast<char>(file.get() ^ 0x5a);
    file.seekp(-1, std::ios::end);
    file.put(byte);
  }
  mpi_world()->barrier();
  EXPECT_EQ(CheckpointManager::agreed_latest_valid(root.string(), mpi_world()), first);
  EXPECT_NO_THROW(CheckpointManager::load(second, vimo::checkpoints::Checksums::kShared));
  vimo::testing::expect_error([&] { CheckpointManager::load(second); }, {last.string(), "checksum"});
  mpi_world()->barrier();
}

}  // namespace
