// Defines AdamW with decoupled weight decay, the warmup-cosine learning-rate schedule, and global-norm
// gradient clipping.
//
// Hand-written rather than torch::optim::AdamW: the moments must be addressable by parameter name for
// checkpoints (torch::optim keys its state by TensorImpl address) and shardable for ZeRO-1 later. The
// unit test checks it against torch::optim::AdamW step for step.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace vimo::trainer {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
};

class AdamW {
 public:
  // `parameters` by name. Weight decay applies to tensors of rank >= 2 (matrices, embeddings), not to
  // biases, norms, positions... of rank <= 1 — except as `decay_all` says (the reference test uses it).
  AdamW(std::vector<std::pair<std::string, at::Tensor>> parameters, AdamWOptions options,
        bool decay_all = false);

  // One update with learning rate `lr` from the parameters' current .grad() (parameters without a
  // gradient are skipped and keep their moments).
  void step(double lr);
  void zero_grad();
  int64_t steps_taken() const { return step_; }

  // Moments as "optim.<name>.exp_avg" / ".exp_avg_sq" tensors, and back.
  std::map<std::string, at::Tensor> state_tensors() const;
  void load_state_tensors(const std::map<std::string, at::Tensor>& tensors, int64_t steps_taken);

 private:
  struct Slot {
    std::string name;
    at::Tensor param, exp_avg, exp_avg_sq;
    bool decay;
  };
  std::vector<Slot> slots_;
  AdamWOptions options_;
  int64_t step_ = 0;
};

// lr at optimizer step `step` (1-based): linear warmup from lr/warmup to lr over `warmup` steps, then
// cosine decay to lr * min_ratio at `total`.
double warmup_cosine_lr(int64_t step, int64_t total, int64_t warmup, double lr, double min_ratio);

// Scales the gradients so their global L2 norm is at most `max_norm` (0 = no clipping). Returns the
// norm before clipping.
double clip_gradients(const std::vector<at::Tensor>& parameters, double max_norm);

}  // namespace vimo::trainer
