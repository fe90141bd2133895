// The DDP-style gradient reducer (see gradient_reducer.h).
#include "comm/gradient_reducer.h"

#include <fmt/format.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>

#include "comm/shm_allreduce.h"

namespace vimo::comm {

// Note [Bucketing order]
// Backward produces gradients roughly in the reverse of the order in which modules registered their
// parameters (the last layer's first). So buckets are filled walking the parameters from last to first:
// bucket 0 holds the last parameters, is complete first, and is launched first. It is also kept small
// (first_bucket_mib, 1 MiB by default as in DDP) so that communication starts as early as possible; the
// others close once they hold bucket_mib. Parameters of different dtypes or devices cannot share a flat
// buffer, so each (dtype, device) fills buckets of its own, and the buckets are then ordered by their
// last parameter, still last-first.
// Buckets are launched strictly in index order, on every rank: bucket k starts only after buckets 0..k-1
// have, even if its own gradients were ready earlier. MPI and NCCL match collectives by the order of the
// calls, and the order in which gradients become ready may differ between ranks (autograd's scheduling,
// parameters unused on some ranks), so launching whatever is ready first would pair different buckets across
// ranks. A gradient that arrives out of the expected order therefore only delays launches, never reorders
// them. (DDP also rebuilds its buckets after the first step in the observed order; we keep the registration
// order.)

// Note [Autograd hooks for the reducer]
// LibTorch 2.14 offers three places to learn that a parameter's gradient is ready:
//  - Tensor::register_hook: runs on the incoming gradient *before* it is accumulated into .grad(), so with
//    gradient accumulation it sees only this micro-step's part, not the sum the reducer must average;
//  - torch::autograd::impl::set_post_acc_grad_hooks: runs after accumulation, but it is a single slot per
//    tensor that torch reserves for Python's register_post_accumulate_grad_hook (its own comment: "stores
//    only Python hooks"), so a second user would silently replace ours;
//  - a post hook on the parameter's AccumulateGrad node (impl::grad_accumulator + Node::add_post_hook), which
//    runs right after the node has written .grad(): what c10d's Reducer uses.
// We use the third: it sees the accumulated .grad(), coexists with other hooks, and can be removed again
// (del_post_hook). A tensor holds its AccumulateGrad only weakly (autograd would make a new node, without our
// hook, once the old one died), so we keep a strong reference to each for the reducer's lifetime.
struct GradientReducer::HookRegistrations {
  // The owning pointer grad_accumulator returns: std::shared_ptr up to LibTorch 2.11, c10::intrusive_ptr
  // later. Named by decltype so vimo builds against both.
  using NodePointer = decltype(torch::autograd::impl::grad_accumulator(std::declval<const at::Tensor&>()));
  std::vector<NodePointer> accumulators;
  std::vector<uintptr_t> keys;   // of our hook on each accumulator, for del_post_hook
  std::vector<unsigned> checks;  // of each parameter's Tensor::register_hook, for remove_hook
};

// Note [A progress thread for MPI]
// Open MPI moves a non-blocking collective's data only while the process is inside an MPI call: a large
// message travels in pipelined fragments, and libnbc's schedule advances one round per call. The hooks poke
// every bucket in flight (one MPI_Test each), but they fire only as gradients become ready, 8 times in a
// 4-layer MLP's backward, so a bucket launched mid-backward mostly moved inside finalize(). On a 16-core
// machine, 2 ranks, backward hid only 47-54 % of the gradient communication (bench/README.md, "On a GPU
// machine"). So for the MPI backend a helper thread polls the buckets in flight every
// ReducerOptions::progress_interval_us (100 µs by default) from the first launch until finalize(), as
// PyTorch's ProcessGroupMPI keeps a worker thread in MPI. Two things keep that legal under
// MPI_THREAD_SERIALIZED: the thread touches the buckets only under the reducer's mutex, like the hooks and
// finalize(), and every MPI call of vimo_comm holds the process-wide MPI call mutex (VIMO_MPI_CHECK, Note
// [One MPI call at a time] in comm/mpi_internal.h). Between polls it sleeps on a condition variable, so on
// an oversubscribed node it costs a wake-up per interval, not a core. The NCCL backend needs no thread: its
// work runs on CUDA streams. Nor do buckets all-reduced through shared memory (ReducerOptions::shared_memory,
// the default when every rank is on one host): ShmAllreduce's own thread does their work. The thread runs
// only if some bucket goes through MPI.

// Note [Parameters without a gradient]
// A parameter may get no gradient in a backward: it is frozen in this stage, its branch was not taken, or
// it is simply unused. Its hook never fires, so its bucket would never launch, and every later bucket would
// wait behind it. Worse, another rank may have used it and launched that bucket, leaving the two ranks with
// different collectives in flight. So finalize() fills the missing slots of every bucket not yet launched
// with the parameter's current .grad() (what earlier micro-steps accumulated) or zeros, and launches them in
// order: every rank launches every bucket in every step, whatever its own graph used (DDP's
// find_unused_parameters, without the extra all-reduce of a usage bitmap). The average then counts a rank
// without a gradient as zero, and a parameter no rank used ends with a zero .grad(), exactly like
// trainer::average_gradients. The price is that a bucket holding an unused parameter launches only in
// finalize(): keep rarely used parameters registered first (they then land in the last bucket).
// It also means that between backward and finalize() the ranks may have launched different numbers of
// buckets, so the caller must not run another collective on the reducer's communicator in between: it would
// be paired with another rank's bucket (MPI_ERR_TRUNCATE, or wrong sums where the sizes match). Buckets in
// shared memory do not use the communicator, but buckets of other dtypes still do.

// Note [Gradients as views of their bucket]
// Copying, a gradient's bytes cross memory twice more per step than the all-reduce needs: the hook copies
// .grad() into the bucket and finalize() copies the average back. With
// ReducerOptions::gradient_as_bucket_view (the default, DDP's option of that name) each .grad() becomes a
// view of its slot of the bucket instead, so the average is already where the optimizer reads it: no copy
// back (67 MB per step in `vimo bench comm`'s model), and the gradients' memory is the buckets' alone. What
// the next backward does depends on how the gradients were cleared:
//  - set to none (AdamW::zero_grad, as torch's default): AccumulateGrad gives .grad() the freshly computed
//    tensor; the hook copies it into the slot, points .grad() at the slot and so releases the tensor;
//  - zeroed in place, or not cleared at all (accumulating on purpose), and every NoSyncGuard micro-step after
//    the first: AccumulateGrad adds into .grad() in place, which is the slot, and the hook copies nothing.
// What comes with it:
//  - While a bucket is being all-reduced (its launch until finalize()) its .grad() views belong to the
//    all-reduce. A second gradient for a parameter before finalize() would be added into such a bucket, so a
//    hook on the parameter (Tensor::register_hook, which runs before AccumulateGrad) refuses it first, and
//    the bucket stays as it was. The shared-memory all-reduce gives a bucket back only once every rank is
//    done reading it.
//  - The views outlive the reducer: an MPI bucket by reference counting, a shared-memory one because the
//    tensors ShmAllreduce::allocate returns keep the segment mapped. So .grad(), or any other handle on a
//    gradient, stays valid after the reducer is gone (with the average of the last finalize(), or whatever
//    an unfinished step left once its all-reduces ended).
//  - A slot has its parameter's strides when the parameter is dense (channels_last too), so .grad() keeps
//    the parameter's layout; the slot of a parameter with gaps or overlaps is contiguous.
//  - With create_graph (double backward) AccumulateGrad makes a new .grad() with a graph instead of adding
//    in place; the hook copies its values, and .grad() becomes the slot without the graph, as finalize()'s
//    averages never had one.
//  - The hook sets .grad() outside AccumulateGrad's own lock: backwards running concurrently over the same
//    parameters are not supported, as they never were (one backward per finalize()).

// Note [Overlap statistics]
// Per synchronised step the reducer notes when its first bucket launched, when its last launched, when
// finalize() was called (backward is over) and when every bucket had finished. exposed = finalize() → all
// done is what the training loop waited for after backward. span = first launch → all done is not the
// reduction's cost: the first bucket launches early in backward, so the span holds backward's time too, and
// 1 − exposed / span (what this note called the hidden share until 2026-11-25) reads high even when little is
// hidden. The share of the reduction hidden behind backward needs its cost alone, which `vimo bench comm`
// measures (Note [The hidden share of gradient reduction] in trainer/bench_comm_reducer.cpp); the trainer
// logs the exposed time per step. With MPI the overlap depends on the progress made between launch and
// finalize(): by the hooks (Note [Progress of non-blocking MPI collectives] in mpi_work.cpp) and by the
// progress thread (Note [A progress thread for MPI]); buckets_done_before_finalize counts the buckets they
// saw finish.

namespace {

constexpr double kBytesPerMiB = 1024.0 * 1024.0;

}  // namespace

GradientReducer::GradientReducer(std::vector<at::Tensor> params, std::shared_ptr<Communicator> comm,
                                 ReducerOptions options)
    : params_(std::move(params)),
      comm_(std::move(comm)),
      grad_as_view_(options.gradient_as_bucket_view),
      hooks_(std::make_unique<HookRegistrations>()) {
  if (!comm_) throw std::invalid_argument("GradientReducer: the communicator is null");
  if (!(options.bucket_mib > 0) || !(options.first_bucket_mib > 0)) {
    throw std::invalid_argument(fmt::format(
        "GradientReducer: bucket sizes must be positive, got bucket_mib {} and first_bucket_mib {}",
        options.bucket_mib, options.first_bucket_mib));
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i];
    if (!p.defined() || !p.is_leaf() || !p.requires_grad() || p.is_sparse()) {
      throw std::invalid_argument(
          fmt::format("[rank {}] GradientReducer: parameter {} must be a dense leaf tensor that requires "
                      "grad. HINT: pass "
                      "only the trainable parameters (frozen ones need no reduction)",
                      comm_->rank(), i));
    }
  }
  build_buckets(options);
  check_same_buckets_everywhere();
  use_shared_memory(options);
  make_slots();
  ready_.assign(params_.size(), false);
  reset_step();

  for (size_t i = 0; i < params_.size(); ++i) {
    HookRegistrations::NodePointer accumulator = torch::autograd::impl::grad_accumulator(params_[i]);
    TORCH_INTERNAL_ASSERT(accumulator, "a leaf that requires grad has an AccumulateGrad node");
    hooks_->keys.push_back(
        accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
            [this, i](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
              on_gradient_ready(i);
              return outputs;
            })));
    hooks_->accumulators.push_back(std::move(accumulator));
    // Before AccumulateGrad adds into .grad(), which may be a bucket being all-reduced (Note [Gradients as
    // views of their bucket]).
    hooks_->checks.push_back(
        params_[i].register_hook([this, i](const at::TensorBase&) { check_first_gradient(i); }));
  }
  const bool all_shared =
      std::all_of(buckets_.begin(), buckets_.end(), [](const Bucket& bucket) { return bucket.shared; });
  if (options.progress_interval_us > 0 && comm_->backend_name() == "mpi" && !all_shared) {
    progress_interval_ = std::chrono::microseconds(options.progress_interval_us);
    progress_thread_ = std::thread([this] { run_progress_thread(); });
  }
}

GradientReducer::~GradientReducer() {
  if (progress_thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      progress_stop_ = true;
    }
    progress_wake_.notify_all();
    progress_thread_.join();
  }
  for (size_t i = 0; i < hooks_->accumulators.size(); ++i)
    hooks_->accumulators[i]->del_post_hook(hooks_->keys[i]);
  for (size_t i = 0; i < hooks_->checks.size(); ++i) params_[i].remove_hook(hooks_->checks[i]);
  // Buckets still in flight (finalize() was skipped, or threw) are waited for by their Work's destructor. A
  // .grad() that views a bucket keeps its memory alive (Note [Gradients as views of their bucket]).
}

// See Note [Bucketing order].
void GradientReducer::build_buckets(const ReducerOptions& options) {
  struct Open {
    Bucket bucket;
    int64_t bytes = 0;
    bool first = true;  // the first bucket of this (dtype, device) still open
  };
  std::map<std::pair<int, std::string>, Open> open;  // (dtype, device) -> the bucket being filled
  std::vector<Bucket> closed;
  const auto cap_bytes = [&](const Open& o) {
    return (o.first ? options.first_bucket_mib : options.bucket_mib) * kBytesPerMiB;
  };
  for (size_t i = params_.size(); i-- > 0;) {
    const at::Tensor& p = params_[i];
    Open& o = open[{static_cast<int>(p.scalar_type()), p.device().str()}];
    o.bucket.params.push_back(i);
    o.bytes += p.numel() * static_cast<int64_t>(p.element_size());
    if (static_cast<double>(o.bytes) >= cap_bytes(o)) {
      closed.push_back(std::move(o.bucket));
      o.bucket = Bucket();
      o.bytes = 0;
      o.first = false;
    }
  }
  for (auto& [key, o] : open) {
    if (!o.bucket.params.empty()) closed.push_back(std::move(o.bucket));
  }
  // Last parameter first: a bucket's first slot is its highest parameter index.
  std::stable_sort(closed.begin(), closed.end(),
                   [](const Bucket& a, const Bucket& b) { return a.params.front() > b.params.front(); });

  slot_of_.assign(params_.size(), {0, 0});
  for (size_t b = 0; b < closed.size(); ++b) {
    Bucket& bucket = closed[b];
    int64_t elements = 0;
    for (size_t s = 0; s < bucket.params.size(); ++s) {
      bucket.offsets.push_back(elements);
      elements += params_[bucket.params[s]].numel();
      slot_of_[bucket.params[s]] = {b, s};
    }
    const at::Tensor& first = params_[bucket.params.front()];
    bucket.flat = at::zeros({elements}, first.options().requires_grad(false));  // [elements]
    bucket_params_.push_back(bucket.params);
  }
  buckets_ = std::move(closed);
}

// Moves the buckets into a shared-memory segment when every rank is on this host (Note [A shared-memory
// all-reduce for one host] in comm/shm_allreduce.cpp). A collective: the buckets are the same on every rank
// (checked before), so every rank asks for the same segment, and ShmAllreduce::create fails on all or none.
void GradientReducer::use_shared_memory(const ReducerOptions& options) {
  const std::string backend = comm_->backend_name();
  const auto eligible = [](const Bucket& bucket) {
    return bucket.flat.device().is_cpu() &&
           (bucket.flat.scalar_type() == at::kFloat || bucket.flat.scalar_type() == at::kDouble);
  };
  std::string why_not;
  int64_t capacity = 0;
  size_t shared = 0;
  for (const Bucket& bucket : buckets_) {
    if (!eligible(bucket)) continue;
    capacity += (bucket.flat.nbytes() + 63) / 64 * 64;
    ++shared;
  }
  if (!options.shared_memory) {
    why_not = "shared memory off";
  } else if (backend != "mpi" && backend != "tcp") {
    why_not = "shared memory only for the CPU backends (MPI, TCP)";
  } else if (comm_->size() < 2) {
    why_not = "one rank";
  } else if (shared == 0 || capacity == 0) {
    why_not = "shared memory only for CPU float32 and float64 gradients";
  } else {
    shm_ = ShmAllreduce::create(*comm_, capacity, &why_not);
  }
  if (!shm_) {
    transport_ = fmt::format("{} ({})", backend, why_not);
    return;
  }
  for (Bucket& bucket : buckets_) {
    if (!eligible(bucket)) continue;
    bucket.flat = shm_->allocate(bucket.flat.numel(), bucket.flat.scalar_type());
    bucket.shared = true;
  }
  transport_ = fmt::format("shared memory ({} ranks on this host)", comm_->size());
  // Other dtypes (bfloat16, float16) and CUDA buckets keep the communicator; each transport still runs its
  // buckets in index order, the same on every rank.
  if (shared < buckets_.size()) {
    transport_ += fmt::format(" for {} of {} buckets, {} for the {} not CPU float32 or float64", shared,
                              buckets_.size(), backend, buckets_.size() - shared);
  }
}

// Asynchronous all-reduces do not agree on the call (Note [Agreement on asynchronous calls]), so the layout
// they rely on is checked once here: every rank must have built the same buckets from the same parameters.
void GradientReducer::check_same_buckets_everywhere() {
  // [parameters, buckets, elements, a hash of every bucket's (dtype, elements) and every slot's size]
  int64_t elements = 0;
  uint64_t hash = 1469598103934665603ull;  // FNV-1a over the layout's numbers
  const auto mix = [&](uint64_t value) { hash = (hash ^ value) * 1099511628211ull; };
  for (const Bucket& bucket : buckets_) {
    mix(static_cast<uint64_t>(bucket.flat.scalar_type()));
    mix(static_cast<uint64_t>(bucket.flat.numel()));
    for (size_t p : bucket.params) mix(static_cast<uint64_t>(params_[p].numel()));
    elements += bucket.flat.numel();
  }
  const int64_t layout[4] = {static_cast<int64_t>(params_.size()), static_cast<int64_t>(buckets_.size()),
                             elements, static_cast<int64_t>(hash >> 1)};
  at::Tensor extremes = at::empty({8}, at::kLong);  // [max of each field, -(min of each field)]
  for (int i = 0; i < 4; ++i) {
    extremes[i] = layout[i];
    extremes[4 + i] = -layout[i];
  }
  comm_->allreduce(extremes, ReduceOp::Max);
  const at::Tensor highest = extremes.narrow(0, 0, 4), lowest = -extremes.narrow(0, 4, 4);
  if (!at::equal(highest, lowest)) {
    throw std::runtime_error(fmt::format(
        "[rank {}] GradientReducer: the ranks built different gradient buckets (this rank: {} parameters, {} "
        "buckets, {} elements; the ranks range over {} to {} parameters and {} to {} elements). HINT: every "
        "rank "
        "must pass the same parameters, in the same order, with the same bucket sizes",
        comm_->rank(), layout[0], layout[1], layout[2], lowest[0].item<int64_t>(), highest[0].item<int64_t>(),
        lowest[2].item<int64_t>(), highest[2].item<int64_t>()));
  }
}

void GradientReducer::check_first_gradient(size_t param) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (require_sync_ && ready_[param]) {
    throw std::runtime_error(
        fmt::format("[rank {}] GradientReducer: parameter {} got a second gradient before finalize(). HINT: "
                    "call finalize() after every synchronised backward, and run accumulation micro-steps "
                    "under NoSyncGuard",
                    comm_->rank(), param));
  }
}

void GradientReducer::on_gradient_ready(size_t param) {
  check_first_gradient(param);  // also checked before accumulation; here for hooks run out of order
  std::lock_guard<std::mutex> lock(mutex_);
  if (!require_sync_) return;  // a no_sync micro-step: the gradient stays in .grad(), accumulating
  step_started_ = true;
  ready_[param] = true;
  // Undefined when autograd delivered no gradient (a custom backward may return none for an input):
  // AccumulateGrad then leaves .grad() alone, and the slot takes what earlier micro-steps accumulated or
  // zeros, as for a parameter without a gradient (Note [Parameters without a gradient]).
  copy_into_bucket(param, params_[param].grad());
  Bucket& bucket = buckets_[slot_of_[param].first];
  if (--bucket.pending == 0) launch_ready_buckets();
  poke_progress();
}

void GradientReducer::make_slots() {
  slots_.clear();
  for (size_t param = 0; param < params_.size(); ++param) {
    const auto [b, s] = slot_of_[param];
    const Bucket& bucket = buckets_[b];
    const at::Tensor& p = params_[param];
    const at::Tensor span = bucket.flat.narrow(0, bucket.offsets[s], p.numel());
    // A dense parameter in another memory format (channels_last) gets a slot with its strides, as DDP's
    // bucket views do, so that its .grad() has its layout; anything else a contiguous one.
    const bool own_strides = !p.is_contiguous() && p.is_non_overlapping_and_dense();
    slots_.push_back(own_strides ? span.as_strided(p.sizes(), p.strides()) : span.view(p.sizes()));
  }
}

// grad: the parameter's shape, any strides (or undefined: zeros) -> its slot of the bucket's flat buffer, and
// then .grad() is that slot (Note [Gradients as views of their bucket]). Nothing to copy if it already is.
void GradientReducer::copy_into_bucket(size_t param, const at::Tensor& grad) {
  at::NoGradGuard no_grad;
  const at::Tensor& slot = slots_[param];
  if (grad.is_same(slot)) return;
  if (grad.defined()) {
    slot.copy_(grad);
  } else {
    slot.zero_();
  }
  if (grad_as_view_) params_[param].mutable_grad() = slot;
}

// Launches buckets in index order for as long as the next one is complete (Note [Bucketing order]).
void GradientReducer::launch_ready_buckets() {
  while (next_bucket_ < buckets_.size() && buckets_[next_bucket_].pending == 0) {
    Bucket& bucket = buckets_[next_bucket_];
    const Clock::time_point now = Clock::now();
    if (launch_order_.empty()) first_launch_ = now;
    last_launch_ = now;
    bucket.work = bucket.shared ? shm_->allreduce_async(bucket.flat, ReduceOp::Avg)
                                : comm_->allreduce_async(bucket.flat, ReduceOp::Avg);
    launch_order_.push_back(static_cast<int>(next_bucket_));
    progress_wake_.notify_one();
    stats_.buckets_launched += 1;
    stats_.bytes_reduced += bucket.flat.numel() * static_cast<int64_t>(bucket.flat.element_size());
    ++next_bucket_;
  }
}

// One MPI_Test per bucket in flight: see Note [Progress of non-blocking MPI collectives].
void GradientReducer::poke_progress() {
  for (size_t b = 0; b < next_bucket_; ++b) {
    Bucket& bucket = buckets_[b];
    if (bucket.work && !bucket.done) bucket.done = bucket.work->is_completed();
  }
}

// See Note [A progress thread for MPI]. Polls while some launched bucket is not done, and sleeps otherwise.
void GradientReducer::run_progress_thread() {
  std::unique_lock<std::mutex> lock(mutex_);
  const auto in_flight = [&] {
    if (progress_paused_) return false;
    for (size_t b = 0; b < next_bucket_; ++b) {
      if (buckets_[b].work && !buckets_[b].done) return true;
    }
    return false;
  };
  while (!progress_stop_) {
    if (!in_flight()) {
      progress_wake_.wait(lock, [&] { return progress_stop_ || in_flight(); });
      continue;
    }
    try {
      poke_progress();
    } catch (const std::exception&) {
      // A failed or timed-out poll leaves its communicator broken, and finalize()'s wait reports it. No more
      // polls in this step.
      progress_paused_ = true;
    }
    stats_.progress_polls += 1;
    progress_wake_.wait_for(lock, progress_interval_, [&] { return progress_stop_; });
  }
}

void GradientReducer::finalize() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!require_sync_) return;
  if (buckets_.empty()) return;  // no parameters: nothing to average
  const Clock::time_point called = Clock::now();
  const auto launched_in_backward = static_cast<int64_t>(launch_order_.size());
  // Shared-memory buckets finish on their own thread, which no hook has looked at since: look now (a load
  // each).
  if (shm_) poke_progress();
  for (const Bucket& bucket : buckets_) stats_.buckets_done_before_finalize += bucket.done ? 1 : 0;
  // Note [Parameters without a gradient]: fill every slot still missing, then launch the rest in order.
  for (size_t b = next_bucket_; b < buckets_.size(); ++b) {
    for (size_t param : buckets_[b].params) {
      if (ready_[param]) continue;
      copy_into_bucket(param, params_[param].grad());
      ready_[param] = true;
    }
    buckets_[b].pending = 0;
  }
  launch_ready_buckets();
  for (Bucket& bucket : buckets_) bucket.work->wait();
  const Clock::time_point done = Clock::now();

  at::NoGradGuard no_grad;
  for (size_t param = 0; param < params_.size(); ++param) {
    at::Tensor& grad = params_[param].mutable_grad();
    const at::Tensor& average = slots_[param];
    if (!params_[param].requires_grad()) {
      // Frozen since the reducer was made: its slot was still reduced (every rank runs the same collectives),
      // but it gets no gradient, as in one process, where the optimizer then leaves it alone.
      if (grad.is_same(average)) grad = at::Tensor();
      continue;
    }
    if (grad.is_same(average)) continue;  // Note [Gradients as views of their bucket]: already there
    if (grad_as_view_) {
      grad = average;
    } else if (grad.defined()) {
      grad.copy_(average);
    } else {
      grad = average.clone();
    }
  }

  const auto seconds = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
  stats_.steps += 1;
  stats_.buckets_launched_in_backward += launched_in_backward;
  stats_.span_s += seconds(done - first_launch_);
  stats_.exposed_s += seconds(done - std::max(called, first_launch_));
  stats_.last_launch_to_done_s += seconds(done - last_launch_);
  last_launch_order_ = launch_order_;
  reset_step();
}

void GradientReducer::reset_step() {
  std::fill(ready_.begin(), ready_.end(), false);
  for (Bucket& bucket : buckets_) {
    bucket.pending = bucket.params.size();
    bucket.work.reset();
    bucket.done = false;
  }
  progress_paused_ = false;
  next_bucket_ = 0;
  step_started_ = false;
  launch_order_.clear();
}

void GradientReducer::set_require_sync(bool require_sync) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (step_started_ && require_sync != require_sync_) {
    throw std::logic_error(fmt::format(
        "[rank {}] GradientReducer: synchronisation switched {} between a backward and its finalize(). HINT: "
        "call finalize() first",
        comm_->rank(), require_sync ? "on" : "off"));
  }
  require_sync_ = require_sync;
}

bool GradientReducer::require_sync() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return require_sync_;
}

std::vector<int> GradientReducer::last_launch_order() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return last_launch_order_;
}

ReducerStats GradientReducer::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

}  // namespace vimo::comm
