// Defines what the TCP backend's communicator is built on, none of it part of vimo's API: Engine, the mesh of
// a communicator and the worker thread that runs its calls in order with the ring collectives, and OpState /
// TcpWork, a queued call and its handle. See Note [A TCP communicator] in comm/tcp_communicator.cpp.
#pragma once

#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "comm/collective_call.h"
#include "comm/communicator.h"
#include "comm/tcp_internal.h"

namespace vimo::comm::tcp_detail {

using detail::CallName;
using detail::ObservedWait;

// A call every rank gave up together (the agreement found a mismatch or a rejected input) or that failed on
// this rank alone with its stream intact (a receive of the wrong size): the communicator goes on. Any other
// failure inside a call leaves the ranks at different points of it, and breaks the communicator.
struct CallRejected : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A queued call: its state, which its caller or Work waits on, and what the worker runs.
struct OpState {
  OpState(CallName c, int64_t b, std::chrono::milliseconds t) : call(std::move(c)), bytes(b), timeout(t) {}
  CallName call;
  int64_t bytes;
  std::chrono::milliseconds timeout;  // from when the worker starts the call (Note [A TCP communicator])
  std::mutex mutex;
  std::condition_variable finished;
  std::atomic<bool> done{false};
  std::exception_ptr error;
  std::string broke;      // when this call left the communicator unusable: why (a later wait is refused)
  bool reported = false;  // whether a wait has thrown `error` already
};

// Waits for `state` (seen by the collective observer), then throws its error if it failed.
inline void wait_for(OpState& state) {
  {
    const ObservedWait observed(state.call.literal(), state.bytes);
    std::unique_lock<std::mutex> lock(state.mutex);
    state.finished.wait(lock, [&] { return state.done.load(); });
  }
  if (state.error) std::rethrow_exception(state.error);
}

class TcpWork final : public Work {
 public:
  TcpWork(std::shared_ptr<OpState> state, int rank) : state_(std::move(state)), rank_(rank) {}
  ~TcpWork() override {
    std::unique_lock<std::mutex> lock(state_->mutex);
    state_->finished.wait(lock, [&] { return state_->done.load(); });
    if (state_->error && !state_->reported) {  // dropped unwaited: say what failed, as MPI's Work does
      try {
        std::rethrow_exception(state_->error);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
      }
    }
  }
  // The first wait throws the call's error; once a failure made the communicator unusable, later waits are
  // refused, as on MPI.
  void wait() override {
    if (state_->done.load() && state_->reported && !state_->broke.empty()) {
      throw std::runtime_error(fmt::format(
          "[rank {}] {} refused: this communicator is unusable since an earlier call failed ({}). "
          "HINT: exit and resume from the last checkpoint",
          rank_, state_->call.text(), state_->broke));
    }
    state_->reported = true;
    wait_for(*state_);
  }
  bool is_completed() override { return state_->done.load(); }
  std::string description() const override { return state_->call.text(); }

 private:
  std::shared_ptr<OpState> state_;
  int rank_;
};

// The mesh and the worker thread that owns it, shared by a communicator and nothing else.
class Engine {
 public:
  explicit Engine(std::unique_ptr<Mesh> mesh)
      : mesh_(std::move(mesh)), rank_(mesh_->rank()), size_(mesh_->size()), worker_([this] { loop(); }) {}
  ~Engine() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    worker_.join();  // after running what is queued, so every Work finishes
  }
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }

  std::shared_ptr<OpState> submit(CallName call, int64_t bytes, std::chrono::milliseconds timeout,
                                  std::function<void(Clock::time_point)> run);

  // The rest runs on the worker only.
  Mesh& mesh() { return *mesh_; }

  // The tag of the next collective: Note [Frames, tags and mailboxes].
  int64_t next_tag() { return -1 - collectives_++; }
  uint64_t next_split() { return splits_++; }

  // Note [Agreeing on a collective before running it], through a ring all-gather of the signatures.
  void agree(const CallName& call, const std::string& problem, Clock::time_point deadline);

  // Each rank's `block` bytes at `mine` -> `all` [size, block], in rank order.
  void ring_allgather(const void* mine, void* all, size_t block, Clock::time_point deadline);

  // Reduces the contiguous 1-d `flat` over the ring so that this rank ends with chunk (rank + shift) % size
  // of `bounds` (size + 1 element offsets) reduced over all ranks; the other chunks hold partial results.
  void ring_reduce_scatter(at::Tensor& flat, const std::vector<int64_t>& bounds, ReduceOp op, int shift,
                           Clock::time_point deadline);

  // After ring_reduce_scatter with the same `shift`: copies every rank's reduced chunk to every rank.
  void ring_share_chunks(at::Tensor& flat, const std::vector<int64_t>& bounds, int shift,
                         Clock::time_point deadline);

  // Chunk offsets of `elements` split as evenly as possible into size() chunks.
  std::vector<int64_t> even_bounds(int64_t elements) const;

 private:
  struct Op {
    std::shared_ptr<OpState> state;
    std::function<void(Clock::time_point)> run;
  };

  int mod(int r) const { return ((r % size_) + size_) % size_; }
  int next() const { return mod(rank_ + 1); }
  int previous() const { return mod(rank_ - 1); }

  void loop();

  // Runs `op` to its deadline; returns its error, and marks the communicator broken when the failure left the
  // ranks out of step (Note [A TCP communicator]).
  std::exception_ptr execute(Op& op);

  std::unique_ptr<Mesh> mesh_;
  const int rank_;
  const int size_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Op> queue_;
  bool stopping_ = false;
  int64_t collectives_ = 0;  // worker only
  uint64_t splits_ = 0;      // worker only
  std::string broken_;       // worker only
  std::thread worker_;       // last: starts after everything it uses
};

}  // namespace vimo::comm::tcp_detail
