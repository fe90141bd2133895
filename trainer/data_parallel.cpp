// Data-parallel helpers of the training loop (see data_parallel.h).
#include "trainer/data_parallel.h"

#include <fmt/format.h>

#include <stdexcept>

namespace vimo::trainer {

// Note [Checking DP replicas]: every rank applies the same averaged gradients to the same parameters with
// the same ops, so replicas stay bitwise equal; a mismatch means a bug or a broken rank, and training on
// would silently average unrelated models. Each check compares one float64 fingerprint across ranks.
void check_replicas_agree(models::GeminiMVR& model, const std::shared_ptr<comm::Communicator>& comm,
                          int64_t step) {
  if (!comm || comm->size() == 1) return;
  at::NoGradGuard no_grad;
  double sum = 0, weighted = 0;
  for (const at::Tensor& p : model->parameters()) {
    at::Tensor d = p.to(at::kDouble).reshape(-1);
    sum += d.sum().item<double>();
    weighted += (d * at::arange(d.numel(), d.options()).remainder(7.0)).sum().item<double>();
  }
  at::Tensor high = at::tensor({sum, weighted}, at::kDouble), low = high.clone();
  comm->allreduce(high, comm::ReduceOp::Max);
  comm->allreduce(low, comm::ReduceOp::Min);
  if (!at::equal(high, low)) {
    throw std::runtime_error(
        fmt::format("[rank {}] parameters differ across DP ranks after step {} (fingerprint "
                    "range [{:.17g}, {:.17g}]); stopping rather than training diverged replicas",
                    comm->rank(), step, low[0].item<double>(), high[0].item<double>()));
  }
}

void broadcast_parameters(models::GeminiMVR& model, const std::shared_ptr<comm::Communicator>& comm) {
  if (!comm || comm->size() == 1) return;
  at::NoGradGuard no_grad;
  for (at::Tensor p : model->parameters()) {
    at::Tensor buffer = p.detach().contiguous();
    comm->broadcast(buffer, 0);
    p.copy_(buffer);
  }
}

}  // namespace vimo::trainer
