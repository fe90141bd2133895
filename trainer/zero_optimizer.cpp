// ZeRO-1 AdamW (see zero_optimizer.h).
#include "trainer/zero_optimizer.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace vimo::trainer {

// Note [ZeRO-1 shards reuse AdamW]
// The update is AdamW's own code run on views: for each parameter that overlaps this rank's shard, a 1-D view
// of that overlap in shard_params_ is handed to an AdamW as if it were a parameter, with its .grad() a view
// of the same range of shard_grads_. AdamW then allocates moments of the view's size only, and its in-place
// update lands in shard_params_. Weight decay is decided per original parameter (rank >= 2), which a 1-D view
// would lose, so the views go to two AdamWs: one that decays everything and one that decays nothing.
// Elementwise math on a slice equals the same math on the whole tensor, so the result is AdamW's up to the
// summation order of the reduction (reduce-scatter here, all-reduce there).
ZeroAdamW::ZeroAdamW(std::vector<std::pair<std::string, at::Tensor>> parameters,
                     std::shared_ptr<comm::Communicator> comm, AdamWOptions options, bool decay_all)
    : parameters_(std::move(parameters)), comm_(std::move(comm)) {
  if (!comm_) throw std::invalid_argument("ZeroAdamW: the communicator is null");
  if (parameters_.empty()) throw std::invalid_argument("ZeroAdamW: no parameters");
  const at::TensorOptions flat_options = parameters_.front().second.options().requires_grad(false);
  for (const auto& [name, p] : parameters_) {
    if (p.scalar_type() != parameters_.front().second.scalar_type() || p.device() != flat_options.device()) {
      throw std::invalid_argument(fmt::format(
          "[rank {}] ZeroAdamW: parameter '{}' is {} on {}, but '{}' is {} on {}. HINT: one ZeroAdamW per "
          "dtype and device",
          comm_->rank(), name, c10::getDtypeNames(p.scalar_type()).first, p.device().str(),
          parameters_.front().first, c10::getDtypeNames(parameters_.front().second.scalar_type()).first,
          parameters_.front().second.device().str()));
    }
    offsets_.push_back(total_);
    total_ += p.numel();
  }
  const int64_t ranks = comm_->size();
  shard_ = (total_ + ranks - 1) / ranks;  // the flat vector is padded to ranks * shard_ elements
  const int64_t begin = comm_->rank() * shard_, end = begin + shard_;

  at::NoGradGuard no_grad;
  shard_params_ = at::zeros({shard_}, flat_options);  // [shard_]
  shard_grads_ = at::zeros({shard_}, flat_options);   // [shard_]
  std::vector<std::pair<std::string, at::Tensor>> decayed, undecayed;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    const auto& [name, p] = parameters_[i];
    const int64_t first = std::max(begin, offsets_[i]), last = std::min(end, offsets_[i] + p.numel());
    if (first >= last) continue;  // not in this rank's shard
    segments_.push_back({i, first, last});
    at::Tensor segment = shard_params_.narrow(0, first - begin, last - first);  // [last - first]
    segment.copy_(p.detach().reshape(-1).narrow(0, first - offsets_[i], last - first));
    segment.mutable_grad() = shard_grads_.narrow(0, first - begin, last - first);
    (decay_all || p.dim() >= 2 ? decayed : undecayed).emplace_back(name, segment);
  }
  decayed_ = std::make_unique<AdamW>(std::move(decayed), options, /*decay_all=*/true);
  AdamWOptions without_decay = options;
  without_decay.weight_decay = 0;
  undecayed_ = std::make_unique<AdamW>(std::move(undecayed), without_decay);
}

double ZeroAdamW::step(double lr, double max_norm) {
  at::NoGradGuard no_grad;
  const int64_t ranks = comm_->size();
  // The parameters are the truth between steps: weights loaded after construction (a resume, init_from) or
  // changed since the last step must be what this step updates, so this rank's shard is taken from them
  // again (1/DP of their bytes). The AdamWs' parameters view shard_params_, so copying into it updates them.
  const int64_t begin = comm_->rank() * shard_;
  for (const Segment& s : segments_) {
    const at::Tensor& p = parameters_[s.parameter].second;
    shard_params_.narrow(0, s.first - begin, s.last - s.first)
        .copy_(p.detach().reshape(-1).narrow(0, s.first - offsets_[s.parameter], s.last - s.first));
  }
  // One flat buffer reused every step: a fresh one would pay its page faults each time (see
  // Communicator::allgather_into).
  if (!flat_buffer_.defined()) flat_buffer_ = at::empty({ranks * shard_}, shard_grads_.options());
  flat_buffer_.zero_();  // padding and parameters without a gradient contribute zeros
  for (size_t i = 0; i < parameters_.size(); ++i) {
    const at::Tensor& p = parameters_[i].second;
    if (p.grad().defined()) flat_buffer_.narrow(0, offsets_[i], p.numel()).view(p.sizes()).copy_(p.grad());
  }
  // The blocking calls, for their check that every rank passes the same flat size (a step is not overlapped).
  comm_->reduce_scatter_into(flat_buffer_, shard_grads_, comm::ReduceOp::Avg);  // [shard_]
  // The averaged gradient's global norm from the shards' sums of squares (the padding holds zeros), in
  // float64 as clip_gradients sums; every rank gets the same norm and so the same scale.
  at::Tensor sum_of_squares = shard_grads_.to(at::kDouble).pow(2).sum().reshape({1});  // [1]
  comm_->allreduce(sum_of_squares, comm::ReduceOp::Sum);
  const double norm = std::sqrt(sum_of_squares.item<double>());
  if (max_norm > 0 && norm > max_norm) shard_grads_.mul_(max_norm / (norm + 1e-6));
  decayed_->step(lr);
  undecayed_->step(lr);
  comm_->allgather_into(shard_params_, flat_buffer_);  // [ranks * shard_]
  for (size_t i = 0; i < parameters_.size(); ++i) {
    at::Tensor p = parameters_[i].second;
    p.copy_(flat_buffer_.narrow(0, offsets_[i], p.numel()).view(p.sizes()));
  }
  return norm;
}

void ZeroAdamW::zero_grad() {
  for (auto& [name, p] : parameters_) {
    if (p.grad().defined()) p.mutable_grad() = at::Tensor();
  }
}

std::map<std::string, at::Tensor> ZeroAdamW::state_tensors() const {
  std::map<std::string, at::Tensor> state = decayed_->state_tensors();
  state.merge(undecayed_->state_tensors());
  return state;
}

std::map<std::string, at::Tensor> ZeroAdamW::full_state_tensors() const {
  at::NoGradGuard no_grad;
  const int64_t begin = comm_->rank() * shard_;
  const std::map<std::string, at::Tensor> mine = state_tensors();  // this rank's segments
  std::map<std::string, at::Tensor> whole;
  for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
    at::Tensor shard = at::zeros({shard_}, shard_params_.options());  // [shard_]
    for (const Segment& s : segments_) {
      shard.narrow(0, s.first - begin, s.last - s.first)
          .copy_(mine.at("optim." + parameters_[s.parameter].first + suffix));
    }
    at::Tensor flat = at::empty({comm_->size() * shard_}, shard.options());  // [ranks * shard_]
    comm_->allgather_into(shard, flat);
    for (size_t i = 0; i < parameters_.size(); ++i) {
      const at::Tensor& p = parameters_[i].second;
      whole["optim." + parameters_[i].first + suffix] =
          flat.narrow(0, offsets_[i], p.numel()).view(p.sizes()).clone();
    }
  }
  return whole;
}

std::map<std::string, checkpoints::TensorPiece> ZeroAdamW::state_pieces() const {
  const std::map<std::string, at::Tensor> mine = state_tensors();  // this rank's segments
  std::map<std::string, checkpoints::TensorPiece> pieces;
  for (const Segment& s : segments_) {
    const auto& [name, p] = parameters_[s.parameter];
    for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
      const std::string key = "optim." + name + suffix;
      pieces[key] = {mine.at(key), s.first - offsets_[s.parameter], p.sizes().vec()};
    }
  }
  // A parameter of no elements lies in no shard; rank 0 names it with an empty piece, so that the checkpoint
  // holds every moment AdamW has.
  if (comm_->rank() == 0) {
    for (const auto& [name, p] : parameters_) {
      if (p.numel() != 0) continue;
      for (const char* suffix : {".exp_avg", ".exp_avg_sq"})
        pieces["optim." + name + suffix] = {at::empty({0}, p.options().requires_grad(false)), 0,
                                            p.sizes().vec()};
    }
  }
  return pieces;
}

void ZeroAdamW::load_state(const checkpoints::StateReader& reader, int64_t steps_taken) {
  std::map<std::string, at::Tensor> mine;  // this rank's segments, as the two AdamWs name them
  for (const Segment& s : segments_) {
    const auto& [name, p] = parameters_[s.parameter];
    for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
      const std::string key = "optim." + name + suffix;
      if (!reader.contains(key))
        throw std::runtime_error("optimizer state '" + key + "' is missing from the checkpoint");
      if (!p.sizes().equals(reader.shape(key))) {
        throw std::runtime_error("optimizer state '" + key + "' has shape " +
                                 c10::str(at::IntArrayRef(reader.shape(key))) + ", the parameter has " +
                                 c10::str(p.sizes()));
      }
      mine[key] = reader.read(key, s.first - offsets_[s.parameter], s.last - s.first);
    }
  }
  decayed_->load_state_tensors(mine, steps_taken);
  undecayed_->load_state_tensors(mine, steps_taken);
}

void ZeroAdamW::load_full_state_tensors(const std::map<std::string, at::Tensor>& tensors,
                                        int64_t steps_taken) {
  load_state(checkpoints::StateReader(tensors), steps_taken);
}

int64_t ZeroAdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const auto& [name, t] : state_tensors()) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  return bytes;
}

}  // namespace vimo::trainer
