// Defines atomic, checksummed checkpoint directories and the manager that saves, finds, loads and
// retains them (DESIGN.md, "Checkpoints").
//
//   <root>/step_00000100/rank_00000.safetensors   model.* and optim.* tensors (+ metadata), from rank 0
//                        rank_00001.safetensors   ... sharded state only: rank 1's own part (and so on)
//                        loader.json               data sampler state
//                        config.yaml               the resolved config
//                        manifest.json             written last: step, world size, every file's size and xxh3
//
// Note [Atomic checkpoint directories]: files are written into a hidden temporary directory, each fsynced;
// the manifest is written last; the directory is fsynced and then renamed to step_NNNNNNNN, and the parent
// directory fsynced. rename(2) is atomic, so a crash at any point leaves either the complete new checkpoint
// or none, and never touches the previous one. Resume trusts only directories whose manifest verifies.
// Re-saving an existing step swaps the new copy in with renameat2(RENAME_EXCHANGE), or where that is
// missing with two renames (Note [A re-save cut between its two renames] in checkpoint.cpp). Leftovers of
// crashed saves are removed by the next save. tests/checkpoints/test_checkpoint_crash.cpp SIGKILLs saves.
//
// Note [Every rank writes its own part]: state that is replicated over the ranks (the model, AdamW's
// moments) is written once, by rank 0. State that each rank holds a part of (ZeRO-1's moments) is written by
// the rank that holds it, in pieces (Note [Tensors saved in pieces] in sharded_state.h), into the same
// temporary directory: no rank gathers the whole, and the ranks write at once. Rank 0 makes that directory
// and puts a random token in it; a rank that does not find the token there (an out_dir that is not shared)
// fails rather than write elsewhere. Each rank marks its file done (its size and xxh3 in a small marker file
// beside it) and rank 0 waits for every mark before it writes the manifest and renames the directory into
// place, so the atomicity above covers every rank's file. A rank whose write fails leaves no mark; the
// failure reaches every rank at the next wait(), where rank 0 stops waiting for marks (at the latest
// kGiveUpAfterS after every rank said its part was done). The outcome is rank 0's: a checkpoint it published
// is whole.
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "checkpoints/safetensors.h"
#include "comm/communicator.h"

namespace vimo::checkpoints {

// Which files a verification checksums; it checks every file's size in any case.
enum class Checksums {
  kAll,     // every file
  kShared,  // the files every rank reads whole: rank 0's state file, loader.json, config.yaml
  kNone,
};

struct Checkpoint {
  int64_t step = 0;
  int world_size = 1;
  TensorFile state;                     // rank 0's state file
  std::vector<std::string> rank_files;  // paths: rank 0's state file, then, if sharded, every other rank's
  std::string loader_json;              // sampler state
  std::string config_yaml;              // resolved config of the run that saved it
  std::string directory;
};

class CheckpointManager {
 public:
  // `root` holds the step directories; the newest `keep` are retained. `comm` may be null (one process).
  CheckpointManager(std::string root, int64_t keep, std::shared_ptr<comm::Communicator> comm);

  // Waits for a save in flight (its error, if any, is logged: wait() reports it); rank 0 waits at most
  // kGiveUpAfterS for the other ranks' parts.
  ~CheckpointManager();
  static constexpr int kGiveUpAfterS = 120;
  // The least timeout of a save's collectives (Note [How long the ranks wait for a save] in checkpoint.cpp).
  static constexpr int kSaveTimeoutS = 3600;
  CheckpointManager(const CheckpointManager&) = delete;
  CheckpointManager& operator=(const CheckpointManager&) = delete;

  // Collective: rank 0 writes `state` (DP-replicated state needs one copy); with `own`, every rank writes its
  // own part too (Note [Every rank writes its own part]). Every rank returns once the checkpoint is durable.
  // Returns the checkpoint directory. save_async() then wait().
  std::string save(int64_t step, const TensorFile& state, const std::string& loader_json,
                   const std::string& config_yaml, const TensorFile* own = nullptr);

  // Note [Saving in the background]: collective. Waits for the save before it (wait()), copies `state`'s
  // tensors (rank 0) and `own`'s (every rank) into host memory of their own (a snapshot: training may change
  // the originals as soon as this returns), and writes the checkpoint from those copies on a thread of each
  // writing rank while training goes on. `state` matters on rank 0 only. `own` is this rank's part of a
  // sharded state (pieces, add_pieces() in sharded_state.h), saved as rank_0000R.safetensors (on rank 0, in
  // the same file as `state`); every rank passes one, possibly empty, or none does. One save is in flight at
  // a time. Returns the directory the checkpoint will have.
  std::string save_async(int64_t step, const TensorFile& state, const std::string& loader_json,
                         const std::string& config_yaml, const TensorFile* own = nullptr);

  // Collective: waits until the save in flight (if any) is durable, and throws on every rank if it failed.
  // Returns its directory ("" when none was in flight).
  std::string wait();

  // The newest step directory under `root` that verifies, skipping (and logging to stderr) corrupt ones.
  static std::optional<std::string> latest_valid(const std::string& root);

  // The same chosen once for every rank of `comm` (null: one process), a collective: rank 0 picks it, and
  // every rank checks that it reads that very directory. Throws on every rank, naming the ranks that cannot,
  // otherwise (Note [One checkpoint for every rank]). nullopt when rank 0 finds none.
  static std::optional<std::string> agreed_latest_valid(const std::string& root,
                                                        const std::shared_ptr<comm::Communicator>& comm);

  // Verifies the manifest's sizes and checksums and reads the checkpoint; throws naming the file on error.
  // After agreed_latest_valid(), which checksummed every file on rank 0, Checksums::kShared checksums only
  // the files that every rank reads whole, and checks the other ranks' files' sizes.
  static Checkpoint load(const std::string& directory, Checksums checksums = Checksums::kAll);

  const std::string& root() const { return root_; }

 private:
  void prune(int64_t saved_step) const;
  void clean_up_crashed_saves() const;
  // Writes, renames into place and prunes; rank 0's part of a save. Throws on error.
  // `rank_files` state files: rank 0's (`state`) and, past 1, the other ranks', waited for by their marks.
  void write_checkpoint(int64_t step, const TensorFile& state, const std::string& loader_json,
                        const std::string& config_yaml, int rank_files) const;
  int rank() const { return comm_ ? comm_->rank() : 0; }
  class LongTimeout;
  std::string root_;
  int64_t keep_;
  std::shared_ptr<comm::Communicator> comm_;
  std::thread writer_;        // the save in flight: rank 0's whole save, or another rank's own part
  std::string writer_error_;  // set by writer_ before it ends
  std::string pending_dir_;   // the directory of the save in flight, on every rank; "" when none
  // Rank 0's writer stops waiting for the other ranks' parts at this steady_clock time (ns): never, until
  // wait() learns that a rank failed, or the destructor runs.
  std::atomic<int64_t> give_up_at_ns_{std::numeric_limits<int64_t>::max()};
};

// The step directories under `root` (valid or not), oldest first, including a .step_N.old that stands in
// for a missing step_N (Note [A re-save cut between its two renames] in checkpoint.cpp).
std::vector<std::string> list_step_directories(const std::string& root);

}  // namespace vimo::checkpoints
