// Defines vimo::comm::GradientReducer, data parallelism's gradient averaging in the style of PyTorch DDP's
// Reducer: parameters grouped into buckets of a configurable size (a small first one), each bucket's
// gradients copied into one flat buffer by an autograd hook as they become ready (unless .grad() already is a
// view of it), and all-reduced asynchronously while backward goes on; finalize() waits and leaves each
// .grad() a view of its average in the bucket. Also
// ReducerOptions, ReducerStats (how much of the communication backward hid) and NoSyncGuard for gradient
// accumulation.
//
//   GradientReducer reducer(params, comm, {.bucket_mib = 25, .first_bucket_mib = 1});
//   for each step:  loss.backward(); reducer.finalize(); optimizer.step(); ...
//   accumulation:   { NoSyncGuard no_sync(reducer); micro_loss.backward(); }  ...  last.backward();
//   finalize()
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"

namespace vimo::comm {

class ShmAllreduce;  // comm/shm_allreduce.h

struct ReducerOptions {
  double bucket_mib = 25.0;       // a bucket closes once it holds this many MiB of gradients
  double first_bucket_mib = 1.0;  // ... the first one (launched first) already at this many
  // MPI backend only: while buckets are in flight, a helper thread polls them this often, so that MPI moves
  // their data between autograd hooks (Note [A progress thread for MPI]). 0: no thread.
  int progress_interval_us = 100;
  // MPI backend, every rank on this host: the CPU float32 / float64 buckets live in one shared-memory
  // segment and are all-reduced through it instead of through MPI (Note [A shared-memory all-reduce for one
  // host] in comm/shm_allreduce.cpp); buckets of other dtypes keep MPI. Where the segment cannot be made,
  // the reducer uses MPI for all and says why in transport().
  bool shared_memory = true;
  // Each parameter's .grad() becomes a view of its slot in the bucket, so finalize() leaves the averages in
  // place instead of copying them back, and a gradient accumulated into .grad() in place is already in its
  // bucket (Note [Gradients as views of their bucket] in comm/gradient_reducer.cpp). DDP's
  // gradient_as_bucket_view. Off: .grad() keeps its own memory and finalize() copies the averages into it.
  bool gradient_as_bucket_view = true;
};

// Running totals over synchronised steps; see Note [Overlap statistics] in comm/gradient_reducer.cpp.
struct ReducerStats {
  int64_t steps = 0;                         // synchronised steps finalized
  int64_t buckets_launched = 0;              // all-reduces started
  int64_t buckets_launched_in_backward = 0;  // ... of which before finalize() was called
  int64_t bytes_reduced = 0;                 // payload of those all-reduces
  // Σ first launch → every bucket done. Not the reduction's cost: the first bucket launches early in
  // backward, so the span holds backward's own time as well (Note [Overlap statistics]).
  double span_s = 0;
  double exposed_s = 0;  // Σ finalize() called → every bucket done (what the step waited for after backward)
  double last_launch_to_done_s = 0;          // Σ last launch → every bucket done
  int64_t buckets_done_before_finalize = 0;  // seen complete before finalize() was called
  int64_t progress_polls = 0;                // rounds of the progress thread that found buckets in flight
};

class GradientReducer {
 public:
  // `params`: the trainable leaves (requires_grad), in the same order and with the same shapes and dtypes on
  // every rank of `comm`, typically model->parameters() in registration order. A collective: checks with
  // `comm` that every rank built the same buckets, and throws on every rank otherwise.
  GradientReducer(std::vector<at::Tensor> params, std::shared_ptr<Communicator> comm,
                  ReducerOptions options = {});
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // After backward: launches the buckets still waiting (see Note [Parameters without a gradient]), waits for
  // every bucket, and sets each parameter's .grad() to the average over the ranks: a view of its bucket
  // (ReducerOptions::gradient_as_bucket_view), valid until the next synchronised backward writes the bucket
  // again. Every parameter has a defined .grad() afterwards. A no-op while synchronisation is off. Call it
  // after every synchronised backward, before any other collective on the reducer's communicator: a rank
  // whose buckets are not all complete launches the rest here, so a collective between backward and
  // finalize() could be paired with another rank's bucket.
  void finalize();

  // Off: backward passes only accumulate into .grad() locally (no communication), as on the non-final
  // micro-steps of gradient accumulation; the next synchronised backward + finalize() then averages the
  // accumulated sums. Must not change between a backward and its finalize().
  void set_require_sync(bool require_sync);
  bool require_sync() const;

  // The buckets, in launch order: each a list of indices into `params`. Bucket 0 holds the last parameters.
  const std::vector<std::vector<size_t>>& bucket_parameters() const { return bucket_params_; }
  // The order in which the last synchronised step launched its buckets (always 0, 1, 2, ...).
  std::vector<int> last_launch_order() const;
  ReducerStats stats() const;
  // How the buckets are all-reduced: "shared memory (N ranks on this host)" (followed by "for K of M buckets,
  // mpi for ..." when some are of other dtypes), or the communicator's backend name followed by why shared
  // memory is not used ("mpi (shared memory off)").
  const std::string& transport() const { return transport_; }

 private:
  struct Bucket {
    std::vector<size_t> params;    // indices into params_, in slot order
    std::vector<int64_t> offsets;  // element offset of each slot in `flat`
    at::Tensor flat;               // [total elements of its params], their dtype and device
    size_t pending = 0;            // slots without a gradient yet in this step
    std::shared_ptr<Work> work;    // the all-reduce in flight, or null
    bool done = false;             // `work` was seen complete (by a hook or the progress thread)
    bool shared = false;           // `flat` lives in shm_'s segment and is all-reduced through it
  };
  struct HookRegistrations;  // the autograd hooks (comm/gradient_reducer.cpp)
  using Clock = std::chrono::steady_clock;

  void build_buckets(const ReducerOptions& options);
  void use_shared_memory(const ReducerOptions& options);
  void check_same_buckets_everywhere();
  void on_gradient_ready(size_t param);
  void make_slots();
  void check_first_gradient(size_t param) const;  // throws if it already got one since finalize()
  void copy_into_bucket(size_t param, const at::Tensor& grad);
  void launch_ready_buckets();
  void poke_progress();
  void run_progress_thread();
  void reset_step();

  std::vector<at::Tensor> params_;
  std::shared_ptr<Communicator> comm_;
  // Declared before buckets_, whose flat buffers and Works may point into its segment: destroyed after them.
  std::unique_ptr<ShmAllreduce> shm_;
  std::string transport_;
  std::vector<Bucket> buckets_;
  std::vector<std::vector<size_t>> bucket_params_;
  std::vector<std::pair<size_t, size_t>> slot_of_;  // param -> (bucket, slot)
  std::vector<at::Tensor> slots_;  // param -> its slot of the bucket, in its shape (what .grad() becomes)
  std::vector<bool> ready_;        // param got its gradient in this step
  size_t next_bucket_ = 0;         // the next bucket to launch
  bool require_sync_ = true;
  bool grad_as_view_ = true;   // ReducerOptions::gradient_as_bucket_view
  bool step_started_ = false;  // a hook fired since the last finalize()
  std::vector<int> launch_order_, last_launch_order_;
  Clock::time_point first_launch_, last_launch_;
  ReducerStats stats_;
  mutable std::mutex mutex_;  // hooks may run on autograd's device threads; the progress thread
  std::unique_ptr<HookRegistrations> hooks_;
  // Note [A progress thread for MPI]: woken when a bucket is launched, stopped by the destructor.
  std::chrono::microseconds progress_interval_{0};
  std::condition_variable progress_wake_;
  bool progress_stop_ = false;
  bool progress_paused_ = false;  // a poll of this step threw: the thread leaves the rest to finalize()
  std::thread progress_thread_;
};

// Turns synchronisation off for its lifetime (the non-final micro-steps of gradient accumulation).
class NoSyncGuard {
 public:
  explicit NoSyncGuard(GradientReducer& reducer) : reducer_(reducer), previous_(reducer.require_sync()) {
    reducer_.set_require_sync(false);
  }
  ~NoSyncGuard() { reducer_.set_require_sync(previous_); }
  NoSyncGuard(const NoSyncGuard&) = delete;
  NoSyncGuard& operator=(const NoSyncGuard&) = delete;

 private:
  GradientReducer& reducer_;
  bool previous_;
};

}  // namespace vimo::comm
