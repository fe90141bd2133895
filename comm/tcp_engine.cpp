// Defines the TCP backend's Engine (comm/tcp_engine.h): its worker thread, the failures that break a
// communicator and those that do not, and the ring collectives. See Note [A TCP communicator] in
// comm/tcp_communicator.cpp.
#include "comm/tcp_engine.h"

#include <ATen/core/grad_mode.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstring>

namespace vimo::comm::tcp_detail {

using detail::kSignatureLength;
using detail::Signature;

namespace {

void reduce_into(at::Tensor dst, const at::Tensor& src, ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg:
      dst.add_(src);
      break;
    case ReduceOp::Max:
      at::maximum_out(dst, dst, src);
      break;
    case ReduceOp::Min:
      at::minimum_out(dst, dst, src);
      break;
  }
}

}  // namespace

std::shared_ptr<OpState> Engine::submit(CallName call, int64_t bytes, std::chrono::milliseconds timeout,
                                        std::function<void(Clock::time_point)> run) {
  auto state = std::make_shared<OpState>(std::move(call), bytes, timeout);
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back({state, std::move(run)});
  }
  wake_.notify_one();
  return state;
}

void Engine::agree(const CallName& call, const std::string& problem, Clock::time_point deadline) {
  Signature mine = call.signature();
  mine[detail::kInputAccepted] = problem.empty() ? 1 : 0;
  std::vector<int64_t> all(static_cast<size_t>(size_) * kSignatureLength);
  ring_allgather(mine.data(), all.data(), sizeof(mine), deadline);
  try {
    detail::judge_signatures(rank_, call, mine, all, problem);
  } catch (const std::runtime_error& e) {
    throw CallRejected(e.what());
  }
}

void Engine::ring_allgather(const void* mine, void* all, size_t block, Clock::time_point deadline) {
  auto* out = static_cast<uint8_t*>(all);
  if (out + static_cast<ptrdiff_t>(rank_ * block) != mine) std::memcpy(out + rank_ * block, mine, block);
  const int64_t tag = next_tag();
  for (int step = 0; step + 1 < size_; ++step) {
    const int send = mod(rank_ - step), receive = mod(rank_ - step - 1);
    const Send s{next(), tag, out + send * block, block};
    const Recv r{previous(), tag, out + receive * block, block};
    mesh_->exchange({&s, 1}, {&r, 1}, deadline);
  }
}

void Engine::ring_reduce_scatter(at::Tensor& flat, const std::vector<int64_t>& bounds, ReduceOp op, int shift,
                                 Clock::time_point deadline) {
  int64_t longest = 0;
  for (int c = 0; c < size_; ++c) longest = std::max(longest, bounds[c + 1] - bounds[c]);
  const at::Tensor scratch = at::empty({longest}, flat.options());
  const auto element = static_cast<size_t>(flat.element_size());
  auto* base = static_cast<uint8_t*>(flat.data_ptr());
  const int64_t tag = next_tag();
  for (int step = 0; step + 1 < size_; ++step) {
    const int send = mod(rank_ + shift - 1 - step), receive = mod(rank_ + shift - 2 - step);
    const int64_t receive_length = bounds[receive + 1] - bounds[receive];
    const Send s{next(), tag, base + bounds[send] * element,
                 static_cast<size_t>(bounds[send + 1] - bounds[send]) * element};
    const Recv r{previous(), tag, scratch.data_ptr(), static_cast<size_t>(receive_length) * element};
    mesh_->exchange({&s, 1}, {&r, 1}, deadline);
    reduce_into(flat.narrow(0, bounds[receive], receive_length), scratch.narrow(0, 0, receive_length), op);
  }
}

void Engine::ring_share_chunks(at::Tensor& flat, const std::vector<int64_t>& bounds, int shift,
                               Clock::time_point deadline) {
  const auto element = static_cast<size_t>(flat.element_size());
  auto* base = static_cast<uint8_t*>(flat.data_ptr());
  const int64_t tag = next_tag();
  for (int step = 0; step + 1 < size_; ++step) {
    const int send = mod(rank_ + shift - step), receive = mod(rank_ + shift - step - 1);
    const Send s{next(), tag, base + bounds[send] * element,
                 static_cast<size_t>(bounds[send + 1] - bounds[send]) * element};
    const Recv r{previous(), tag, base + bounds[receive] * element,
                 static_cast<size_t>(bounds[receive + 1] - bounds[receive]) * element};
    mesh_->exchange({&s, 1}, {&r, 1}, deadline);
  }
}

std::vector<int64_t> Engine::even_bounds(int64_t elements) const {
  std::vector<int64_t> bounds(static_cast<size_t>(size_) + 1);
  for (int c = 0; c <= size_; ++c) bounds[c] = elements * c / size_;
  return bounds;
}

void Engine::loop() {
  const at::NoGradGuard no_grad;  // communication is never part of a graph (grad mode is per thread)
  while (true) {
    Op op;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;
      op = std::move(queue_.front());
      queue_.pop_front();
    }
    OpState& state = *op.state;
    std::exception_ptr error;
    if (!broken_.empty()) {
      error = std::make_exception_ptr(std::runtime_error(fmt::format(
          "[rank {}] {} refused: this communicator is unusable since an earlier call failed ({}). "
          "HINT: exit and resume from the last checkpoint",
          rank_, state.call.text(), broken_)));
    } else {
      error = execute(op);
    }
    {
      const std::lock_guard<std::mutex> lock(state.mutex);
      state.error = error;
      if (error && !broken_.empty()) state.broke = broken_;
      state.done = true;
    }
    state.finished.notify_all();
  }
}

std::exception_ptr Engine::execute(Op& op) {
  OpState& state = *op.state;
  std::exception_ptr error;
  try {
    op.run(Clock::now() + state.timeout);
  } catch (const MeshTimeout& e) {
    // A collective cut short leaves the ranks at different points of it: only a receive that got
    // nothing can be given up alone.
    const bool collective = state.call.signature()[detail::kCollective] != 0;
    std::string consequence;
    if (collective) {
      consequence = fmt::format(
          "Over TCP, {}; the ranks are now at different points of the collective, so "
          "the communicator is unusable",
          e.what());
    } else if (!e.usable) {
      consequence = fmt::format("Over TCP, {}; a send was cut in the middle, so the communicator is unusable",
                                e.what());
    } else {
      consequence = fmt::format(
          "Over TCP, {}; the receive is given up and the communicator stays usable (a message that "
          "arrives later is kept for the next receive of its tag)",
          e.what());
    }
    if (collective || !e.usable) broken_ = fmt::format("{} timed out: {}", state.call.text(), e.what());
    error = std::make_exception_ptr(std::runtime_error(
        detail::describe_timeout(rank_, state.call.text(), state.bytes, state.timeout, size_, consequence)));
  } catch (const CallRejected& e) {
    error = std::make_exception_ptr(std::runtime_error(e.what()));
  } catch (const std::exception& e) {  // MeshFailure, or anything else that cut a call short
    broken_ = e.what();
    error = std::make_exception_ptr(
        std::runtime_error(fmt::format("[rank {}] {} failed: {}. The TCP communicator is unusable now", rank_,
                                       state.call.text(), e.what())));
  }
  return error;
}

}  // namespace vimo::comm::tcp_detail
