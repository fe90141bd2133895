// Defines vimo::trainer::ZeroAdamW: AdamW sharded over the data-parallel ranks in the manner of ZeRO stage 1
// (DeepSpeed) / Megatron's distributed optimizer. The parameters are viewed as one flat vector, padded to a
// multiple of the DP size and cut into one contiguous shard per rank; a step reduce-scatters the gradients
// (each rank receives the average of its shard only), runs AdamW on its shard with moments that exist only
// for that shard, and all-gathers the updated shards back into every rank's full parameters. Communication
// equals one all-reduce; optimizer state per rank is 1/DP of the unsharded optimizer's.
//
//   ZeroAdamW optimizer(model->named_parameters(), dp_comm, {});
//   loss.backward();                      // no GradientReducer: the step does the reduction
//   optimizer.step(lr, /*max_norm=*/1.0);  // clipping too: only the step sees the averaged gradient
//   optimizer.zero_grad();
//
// Checkpoints hold each rank's moments as pieces of AdamW's whole moments (state_pieces(), Note [Tensors
// saved in pieces] in checkpoints/sharded_state.h), written by every rank at once; load_state() reads this
// rank's range from whichever pieces hold it, so a checkpoint moves between ZeroAdamW and AdamW and between
// DP sizes.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "checkpoints/sharded_state.h"
#include "comm/communicator.h"
#include "trainer/optimizer.h"

namespace vimo::trainer {

class ZeroAdamW {
 public:
  // `parameters`: the same names, shapes and values on every rank of `comm`, all of one dtype and device.
  // Weight decay follows AdamW: tensors of rank >= 2 only, unless `decay_all`.
  ZeroAdamW(std::vector<std::pair<std::string, at::Tensor>> parameters,
            std::shared_ptr<comm::Communicator> comm, AdamWOptions options, bool decay_all = false);

  // Averages the local .grad()s over the ranks (a parameter without one counts as zero, as in
  // GradientReducer, so it still decays and its moments still move), updates this rank's shard, and writes
  // the updated parameters on every rank. Collective: every rank calls it. The .grad()s are left as they were
  // (local).
  // With max_norm > 0 the averaged gradient is first scaled so that its global L2 norm is at most max_norm,
  // as clip_gradients does after a GradientReducer. Returns that norm before clipping.
  double step(double lr, double max_norm = 0);
  void zero_grad();
  int64_t steps_taken() const { return decayed_->steps_taken(); }

  // This rank's moments, "optim.<name>.exp_avg" / ".exp_avg_sq" for the part of each parameter in its shard.
  std::map<std::string, at::Tensor> state_tensors() const;
  // The same as pieces of the whole moments that AdamW::state_tensors() names and shapes, for
  // CheckpointManager::save_async's `own` (add_pieces()).
  std::map<std::string, checkpoints::TensorPiece> state_pieces() const;
  // The whole moments, gathered from every rank, as AdamW::state_tensors() names and shapes them (same on
  // every rank). Collective.
  std::map<std::string, at::Tensor> full_state_tensors() const;
  // Keeps this rank's part of the moments `reader` holds (whole, as AdamW saves them, or in pieces from a
  // ZeroAdamW over any number of ranks); a missing name or a wrong shape is an error naming it.
  void load_state(const checkpoints::StateReader& reader, int64_t steps_taken);
  // The same from whole moments (full_state_tensors() or AdamW::state_tensors()).
  void load_full_state_tensors(const std::map<std::string, at::Tensor>& tensors, int64_t steps_taken);
  // Bytes of those moment tensors: about 1/DP of AdamW's over the same parameters.
  int64_t state_bytes() const;
  // Elements of the flat parameter vector per rank: ceil(total / DP), the last shard padded.
  int64_t shard_elements() const { return shard_; }

 private:
  std::vector<std::pair<std::string, at::Tensor>> parameters_;
  std::shared_ptr<comm::Communicator> comm_;
  // A parameter's part of this rank's shard: flat positions [first, last), both within the shard.
  struct Segment {
    size_t parameter = 0;
    int64_t first = 0, last = 0;
  };
  std::vector<Segment> segments_;
  std::vector<int64_t> offsets_;      // of each parameter in the flat vector
  int64_t total_ = 0;                 // elements of all parameters
  int64_t shard_ = 0;                 // elements per rank: ceil(total / DP)
  at::Tensor shard_params_;           // [shard_]: this rank's slice of the flat parameters, the one updated
  at::Tensor shard_grads_;            // [shard_]: the averaged gradient of that slice
  at::Tensor flat_buffer_;            // [ranks * shard_]: gradients going out, then parameters coming back
  std::unique_ptr<AdamW> decayed_;    // over the per-parameter views of shard_params_ with weight decay
  std::unique_ptr<AdamW> undecayed_;  // ... and those without (weight_decay 0)
};

}  // namespace vimo::trainer
