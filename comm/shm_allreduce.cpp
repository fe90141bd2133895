// The shared-memory all-reduce of one host (see shm_allreduce.h).
//
// Note [A shared-memory all-reduce for one host]
// Open MPI moves data between processes of one host through its "vader" transport. With a single-copy
// mechanism (CMA: the receiver reads the sender's memory with process_vm_readv) a large message costs one
// copy; without one, it travels through small shared-memory fragments, copied in by the sender and out by
// the receiver (32 KiB each by default). Containers often take the single copy away: CMA needs ptrace rights
// between the ranks, which Docker's default profile denies, so images set
// OMPI_MCA_btl_vader_single_copy_mechanism=none. On such a 16-core machine (bench/README.md, "Communication
// on 16 cores") MPI_Allreduce of 64 MiB at 2 ranks ran at 1.1 GB/s and a data-parallel step's gradient
// communication outlasted its backward, so at most about half of it could hide behind backward.
// So when every rank of the reducer's communicator is on this host, the gradient buckets live in one
// shared-memory segment that every rank maps, and an all-reduce is done with plain loads and stores:
//   1. every rank announces that its bucket holds this step's gradients;
//   2. rank r sums part r of the bucket (a 1/p slice) over all ranks' copies, in rank order, into its own
//      copy (divided by p for an average);
//   3. once every part is summed, rank r copies the other p − 1 parts from their owners into its copy;
//   4. once every rank has copied, the bucket is the caller's again.
// Each rank reads 2 − 1/p and writes 1 bucket's worth, against MPI's copy in and copy out of every fragment
// at every step of its algorithm, and every rank ends with the same bits (each part is summed once). The
// steps are ordered by one counter per rank in the segment's header (operation k's steps are 3k − 2, 3k − 1,
// 3k): a rank publishes a step with a release store after its writes, and waits for the others' counters
// with acquire loads before reading what they wrote. Step 4 is what lets the caller write the next step's
// gradients while a slower peer may still be copying the part it owns.
// The operations run on a thread of this object, one after another, in the order they were started; every
// rank must start the same ones in the same order (GradientReducer launches its buckets in index order on
// every rank: Note [Bucketing order] in gradient_reducer.cpp). A wait that sees a rank stay behind for the
// communicator's timeout fails naming that rank.
// The segment is a POSIX shared-memory object made by rank 0 under a random name, opened by the others, and
// unlinked as soon as all of them have tried, or as soon as create() fails: only a crash of rank 0 inside
// create() can leave the name in /dev/shm, and the mapping lives until the last rank unmaps it. A rank whose
// operation fails (a timeout) sets its counter to a value no step has, so that a peer still inside that
// operation fails too instead of completing it with a part the first rank's caller may overwrite. It is
// written by hand rather than with MPI_Win_allocate_shared because the Communicator interface does not expose
// an MPI communicator, and rather than with Boost.Interprocess because what matters here is posix_fallocate
// (a /dev/shm too small for the segment must fail at creation, not with SIGBUS in the middle of a step),
// which neither offers. Ranks that cannot open the object (another host, a container with its own /dev/shm)
// or that find another random tag in it make create() return null on every rank, and the reducer keeps using
// MPI.
#include "comm/shm_allreduce.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "comm/mpi_internal.h"
#include "comm/shm_internal.h"
#include "comm/shm_sum.h"

namespace vimo::comm {
namespace {

using shm_detail::kAlignment;
using shm_detail::kGaveUp;
using shm_detail::round_up;

constexpr int64_t kSliceAlignment = 16;  // elements: parts start on a cache line for float32
// How long a Work::wait or the idle worker looks for its event before sleeping on a condition variable.
constexpr auto kSpinFor = std::chrono::microseconds(50);

// Part q of n elements split over p ranks: [begin, end), each part a multiple of kSliceAlignment but the
// last; parts past the end are empty.
std::pair<int64_t, int64_t> part_bounds(int64_t n, int p, int q) {
  const int64_t per = round_up((n + p - 1) / p, kSliceAlignment);
  return {std::min(n, per * q), std::min(n, per * (q + 1))};
}

}  // namespace

struct ShmAllreduce::Operation {
  uint64_t index = 0;  // 1, 2, ... in start order
  int64_t offset = 0;  // bytes from the start of a part
  int64_t numel = 0;
  at::ScalarType dtype = at::kFloat;
  bool average = false;
  std::string text;  // "shared-memory allreduce (avg) of float32 [1024], operation 3"
  std::chrono::steady_clock::time_point started;  // when the worker took it up
  std::mutex mutex;
  std::condition_variable finished;
  std::atomic<int> state{0};  // 0 running or queued, 1 done, 2 failed
  std::string error;
};

class ShmAllreduce::ShmWork final : public Work {
 public:
  ShmWork(std::shared_ptr<Operation> op, std::chrono::milliseconds timeout, bool spin)
      : op_(std::move(op)), timeout_(timeout), spin_(spin) {}
  ShmWork(const ShmWork&) = delete;
  ShmWork& operator=(const ShmWork&) = delete;
  // Dropping an unfinished Work waits for it (Work's contract): its tensor is the operation's until then.
  ~ShmWork() override {
    if (thrown_) return;  // its caller has the error already
    try {
      wait();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s\n", e.what());
    }
  }

  void wait() override {
    if (op_->state.load(std::memory_order_acquire) == 1) return;
    if (spin_) {  // a small operation ends within microseconds: cheaper than sleeping and being woken
      const auto until = std::chrono::steady_clock::now() + kSpinFor;
      while (op_->state.load(std::memory_order_acquire) == 0 && std::chrono::steady_clock::now() < until) {
      }
      if (op_->state.load(std::memory_order_acquire) == 1) return;
    }
    bool ended = false;
    {
      const detail::ObservedWait observed("allreduce", op_->numel * at::elementSize(op_->dtype));
      std::unique_lock<std::mutex> lock(op_->mutex);
      // The worker gives up after the timeout itself; this bound only guards against a worker that hangs.
      ended = op_->finished.wait_for(lock, timeout_ * 2 + std::chrono::seconds(10),
                                     [&] { return op_->state.load(std::memory_order_acquire) != 0; });
    }
    if (!ended) {
      thrown_ = true;
      throw std::runtime_error(fmt::format("{} did not end within twice its timeout", op_->text));
    }
    throw_if_failed();
  }

  bool is_completed() override {
    const int state = op_->state.load(std::memory_order_acquire);
    if (state == 2) throw_if_failed();
    return state == 1;
  }

  std::string description() const override { return op_->text; }

 private:
  void throw_if_failed() {
    if (op_->state.load(std::memory_order_acquire) != 2) return;
    std::lock_guard<std::mutex> lock(op_->mutex);
    thrown_ = true;
    throw std::runtime_error(op_->error);
  }

  std::shared_ptr<Operation> op_;
  std::chrono::milliseconds timeout_;
  bool spin_;
  bool thrown_ = false;  // wait() or is_completed() reported the failure
};

ShmAllreduce::~ShmAllreduce() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  wake_.notify_all();
  if (worker_.joinable()) worker_.join();
  // mapping_owner_ unmaps the segment once no tensor from allocate() holds it any more.
}

void ShmAllreduce::own_mapping(void* address) {
  mapping_ = address;
  const size_t bytes = mapping_bytes_;
  mapping_owner_ = std::shared_ptr<void>(address, [bytes](void* a) { munmap(a, bytes); });
}

char* ShmAllreduce::part(int rank) const {
  return static_cast<char*>(mapping_) + Control::bytes(size_) + part_stride_ * rank;
}

at::Tensor ShmAllreduce::allocate(int64_t numel, at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kDouble) {
    throw std::invalid_argument(
        fmt::format("ShmAllreduce::allocate: {} is not float32 or float64", c10::getDtypeNames(dtype).first));
  }
  if (numel < 0) throw std::invalid_argument("ShmAllreduce::allocate: negative size");
  const int64_t offset = round_up(allocated_, kAlignment);
  const int64_t bytes = numel * static_cast<int64_t>(at::elementSize(dtype));
  if (offset + bytes > capacity_) {
    throw std::length_error(
        fmt::format("ShmAllreduce::allocate: {} bytes at offset {} do not fit the capacity of {} bytes",
                    bytes, offset, capacity_));
  }
  allocated_ = offset + bytes;
  char* address = part(rank_) + offset;
  std::memset(address, 0, static_cast<size_t>(bytes));
  // The tensor keeps the mapping, since it may outlive this object (Note [Gradients as views of their
  // bucket] in comm/gradient_reducer.cpp). Each rank writes only its own part, so once this object is gone
  // nothing writes the memory under it.
  return at::from_blob(
      address, {numel}, [owner = mapping_owner_](void*) {}, at::TensorOptions().dtype(dtype));
}

std::shared_ptr<Work> ShmAllreduce::allreduce_async(const at::Tensor& tensor, ReduceOp op) {
  if (op != ReduceOp::Sum && op != ReduceOp::Avg) {
    throw std::invalid_argument(
        fmt::format("[rank {}] ShmAllreduce: {} is not sum or avg", rank_, detail::reduce_op_name(op)));
  }
  if (tensor.defined() && tensor.numel() == 0 && tensor.dim() == 1 &&
      (tensor.scalar_type() == at::kFloat || tensor.scalar_type() == at::kDouble)) {
    // Nothing to reduce (an empty bucket or parameter; LibTorch gives it no data pointer): done at once, on
    // every rank alike, without taking an operation number.
    auto done = std::make_shared<Operation>();
    done->text = fmt::format("shared-memory allreduce ({}) of an empty tensor", detail::reduce_op_name(op));
    done->state.store(1);
    return std::make_shared<ShmWork>(std::move(done), timeout_, false);
  }
  const char* begin = part(rank_);
  const auto* address = static_cast<const char*>(tensor.defined() ? tensor.data_ptr() : nullptr);
  const int64_t offset = address ? address - begin : -1;
  if (!tensor.defined() || !tensor.is_contiguous() || offset < 0 || offset % kAlignment != 0 ||
      offset + static_cast<int64_t>(tensor.nbytes()) > allocated_ || tensor.dim() != 1 ||
      (tensor.scalar_type() != at::kFloat && tensor.scalar_type() != at::kDouble)) {
    throw std::invalid_argument(
        fmt::format("[rank {}] ShmAllreduce: the tensor is not one from allocate()", rank_));
  }
  auto operation = std::make_shared<Operation>();
  operation->offset = offset;
  operation->numel = tensor.numel();
  operation->dtype = tensor.scalar_type();
  operation->average = op == ReduceOp::Avg;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!broken_.empty()) throw std::runtime_error(broken_);
    operation->index = ++started_;
    operation->text =
        fmt::format("shared-memory allreduce ({}) of {} [{}], operation {}", detail::reduce_op_name(op),
                    c10::getDtypeNames(operation->dtype).first, operation->numel, operation->index);
    queue_.push_back(operation);
    queued_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_one();
  return std::make_shared<ShmWork>(std::move(operation), timeout_, !oversubscribed_);
}

void ShmAllreduce::run_worker() {
  uint64_t taken = 0;
  while (true) {
    // The next operation often follows within microseconds (a caller's next bucket): look for it a little
    // before sleeping.
    if (!oversubscribed_) {
      const auto until = std::chrono::steady_clock::now() + kSpinFor;
      while (queued_.load(std::memory_order_acquire) == taken && !stop_.load(std::memory_order_relaxed) &&
             std::chrono::steady_clock::now() < until) {
      }
    }
    std::shared_ptr<Operation> op;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      op = queue_.front();
      queue_.pop_front();
      ++taken;
    }
    std::string error;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      error = broken_;
    }
    if (error.empty()) {
      try {
        execute(*op);
      } catch (const std::exception& e) {
        error = e.what();
        // A peer still inside this operation must fail too, not finish it with a part this rank's caller
        // may now overwrite: it sees kGaveUp instead of a step.
        control_->counter(rank_).store(kGaveUp, std::memory_order_release);
        std::lock_guard<std::mutex> lock(mutex_);
        broken_ = error;
      }
    }
    {
      std::lock_guard<std::mutex> lock(op->mutex);
      op->error = error;
      op->state.store(error.empty() ? 1 : 2, std::memory_order_release);
    }
    op->finished.notify_all();
  }
}

void ShmAllreduce::execute(Operation& op) {
  op.started = std::chrono::steady_clock::now();
  const uint64_t first_step = 3 * (op.index - 1);
  std::atomic<uint64_t>& mine = control_->counter(rank_);
  const int64_t element = static_cast<int64_t>(at::elementSize(op.dtype));

  // 1: this rank's bucket holds its input.
  mine.store(first_step + 1, std::memory_order_release);
  wait_for_all(first_step + 1, op);

  // 2: sum this rank's part over every rank's copy.
  const auto [begin, end] = part_bounds(op.numel, size_, rank_);
  if (end > begin) {
    const auto sum = [&](auto* type_tag) {
      using T = std::remove_pointer_t<decltype(type_tag)>;
      std::vector<const T*> sources(static_cast<size_t>(size_));
      for (int q = 0; q < size_; ++q)
        sources[static_cast<size_t>(q)] = reinterpret_cast<const T*>(part(q) + op.offset) + begin;
      shm_detail::sum_parts(reinterpret_cast<T*>(part(rank_) + op.offset) + begin, sources.data(), size_,
                            end - begin, op.average);
    };
    if (op.dtype == at::kFloat) {
      sum(static_cast<float*>(nullptr));
    } else {
      sum(static_cast<double*>(nullptr));
    }
  }
  mine.store(first_step + 2, std::memory_order_release);
  wait_for_all(first_step + 2, op);

  // 3: copy the other ranks' sums.
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    const auto [b, e] = part_bounds(op.numel, size_, q);
    if (e > b) {
      std::memcpy(part(rank_) + op.offset + b * element, part(q) + op.offset + b * element,
                  static_cast<size_t>((e - b) * element));
    }
  }
  // 4: every rank has its copy; the bucket is the caller's again.
  mine.store(first_step + 3, std::memory_order_release);
  wait_for_all(first_step + 3, op);
}

void ShmAllreduce::wait_for_all(uint64_t target, const Operation& op) {
  for (int q = 0; q < size_; ++q) {
    const std::atomic<uint64_t>& theirs = control_->counter(q);
    uint64_t seen = theirs.load(std::memory_order_acquire);
    if (seen >= target && seen != kGaveUp) continue;
    // The operation's timeout runs from its start, like a Work::wait on MPI from the wait's (Note
    // [Collective timeouts] in comm/mpi_internal.h); the waiting itself is MPI's: spin, yield, then sleep.
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        timeout_ - (std::chrono::steady_clock::now() - op.started));
    const bool arrived = mpi_detail::poll_until_done(
        [&] {
          seen = theirs.load(std::memory_order_acquire);
          if (stop_.load(std::memory_order_relaxed))
            throw std::runtime_error(fmt::format("{}: abandoned, its owner is being destroyed", op.text));
          return seen >= target;
        },
        std::max(left, std::chrono::milliseconds(0)), spin_for_);
    if (seen == kGaveUp) {
      throw std::runtime_error(
          fmt::format("[rank {}] {}, step {} of 3: rank {} gave up on it (its own error names the cause); "
                      "the shared-memory "
                      "all-reduce is unusable from now on",
                      rank_, op.text, (target - 1) % 3 + 1, q));
    }
    if (arrived) continue;
    std::vector<std::string> behind;
    for (int r = 0; r < size_; ++r) {
      const uint64_t step = control_->counter(r).load(std::memory_order_acquire);
      if (step >= target) continue;
      behind.push_back(step == 0 ? fmt::format("rank {} (no operation started yet)", r)
                                 : fmt::format("rank {} (at operation {}, step {} of 3)", r, (step + 2) / 3,
                                               (step - 1) % 3 + 1));
    }
    throw std::runtime_error(detail::describe_timeout(
        rank_, fmt::format("{}, step {} of 3", op.text, (target - 1) % 3 + 1),
        op.numel * static_cast<int64_t>(at::elementSize(op.dtype)), timeout_, size_,
        fmt::format("Waiting for {}; the shared-memory all-reduce is unusable from now on",
                    fmt::join(behind, ", "))));
  }
}

}  // namespace vimo::comm
