// Defines what the files of the MPI backend (comm/mpi_*.cpp) share, none of it part of vimo's API:
// VIMO_MPI_CHECK, how tensors travel over MPI (wire_type, reduction), the collectives the ranks agree on, how
// a wait polls (poll_until_done, with Note [Collective timeouts]), MpiGroup, a communicator's MPI state, and
// MpiWork, one non-blocking MPI operation.
#pragma once

#include <fmt/format.h>
#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"

namespace vimo::comm::mpi_detail {

// Throws the error of a failed MPI call: the rank, call, file:line and MPI's own error string (mpi_work.cpp).
[[noreturn]] void throw_mpi_failure(int status, const char* call, const char* file, int line);

}  // namespace vimo::comm::mpi_detail

// Every MPI call goes through this: a failure becomes an exception naming the rank, call, file:line and MPI's
// own error string. (Our communicators use MPI_ERRORS_RETURN, so failures come back here instead of
// aborting.)
#define VIMO_MPI_CHECK(call)                                                                    \
  do {                                                                                          \
    const int vimo_mpi_status_ = (call);                                                        \
    if (vimo_mpi_status_ != MPI_SUCCESS)                                                        \
      ::vimo::comm::mpi_detail::throw_mpi_failure(vimo_mpi_status_, #call, __FILE__, __LINE__); \
  } while (0)

namespace vimo::comm::mpi_detail {

// Note [Half types over MPI]
// MPI 3.1 (OpenMPI 4) has no bfloat16 or float16 datatype, so MPI cannot add them. All-reduce converts them
// to float32, reduces and rounds back once: max and min are exact (the conversion is exact), a sum is rounded
// once at the end instead of after every addition. All-gather and broadcast only move bits, so they send the
// raw 16-bit words as MPI_UINT16_T (the same bytes as MPI_BYTE, counted per element).
inline bool is_half(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// The MPI datatype that carries `dtype` bit for bit, or MPI_DATATYPE_NULL when unsupported.
inline MPI_Datatype wire_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return MPI_FLOAT;
    case at::kDouble:
      return MPI_DOUBLE;
    case at::kLong:
      return MPI_INT64_T;
    case at::kInt:
      return MPI_INT32_T;
    case at::kByte:
      return MPI_UINT8_T;
    case at::kBFloat16:
    case at::kHalf:
      return MPI_UINT16_T;  // moved, never reduced: see Note [Half types over MPI]
    default:
      return MPI_DATATYPE_NULL;
  }
}

// Avg is a Sum followed by a division on every rank (MPI has no average).
inline MPI_Op reduction(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg:
      return MPI_SUM;
    case ReduceOp::Max:
      return MPI_MAX;
    case ReduceOp::Min:
      return MPI_MIN;
  }
  throw std::invalid_argument("unknown ReduceOp");
}

// The collectives the ranks agree on: Note [Agreeing on a collective before running it] in
// comm/mpi_agreement.cpp.
enum class Collective : int64_t { Barrier = 1, Allreduce, Allgather, Broadcast, Split, ReduceScatter };

// Note [Collective timeouts]
// MPI has no timeout: a rank whose peer never joins a collective waits inside MPI_Wait forever. So every
// operation that waits for peers to arrive is non-blocking underneath (asynchronous calls, point-to-point,
// and the agreement of blocking calls, after which their payload is blocking: Note [Blocking payloads after
// the agreement]), and waiting means
// polling MPI_Test until the request completes or the communicator's timeout has passed since the wait
// began. (Since the wait began, not since the launch: a Work may be waited on long after it started, and an
// MPI collective only advances while we poll, see Note [Progress of non-blocking MPI collectives].) How the
// poll spends the wait is Note [Spinning, yielding and sleeping while waiting].
// A timed-out request cannot be taken back: MPI_Cancel is undefined for collectives, and the peers may still
// join later and match it. So the communicator becomes unusable: it keeps the request's buffers alive (MPI
// may still write into them), never frees its MPI communicator, and every later call on it fails at once
// naming the first failure. The error names the call, its size in bytes, this rank and the timeout; which
// rank is missing is the heartbeat watchdog's to report, over the TCP store.
//
// Note [Spinning, yielding and sleeping while waiting]
// A wait polls MPI_Test in three phases: it spins (polls back to back), then yields the core between polls
// (std::this_thread::yield), and once kYieldFor has passed it sleeps kSleepBetweenPolls between polls, so a
// rank that waits minutes for a slow peer leaves the CPU to others. How long it spins depends on whether this
// node runs more ranks than it has cores:
//   - not oversubscribed: spin for all of kYieldFor, as MPI_Wait does. Yielding here costs far more than it
//     saves: Linux's CFS hands the core to any other runnable process (a compiler, a data-loader thread) for
//     at least its minimum slice, a millisecond or more, although the collective might have finished a few
//     microseconds later. With only 50 µs of spinning, the blocking calls, which wait twice (agreement, then
//     payload), were 2-4 ms slower than MPI's own at 1-4 MiB on a busy 2-core machine (bench/README.md,
//     "Communication").
//   - oversubscribed (more ranks on this node than cores, as in the 4-rank tests on 2 cores): spin only
//     kOversubscribedSpinFor, then yield, since a spinning rank may be keeping the very peer it waits for off
//     the core. Open MPI's own progress loop makes the same choice (mpi_yield_when_idle).
// The node's rank count comes from MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) when the world communicator is
// made; communicators split from it inherit the choice.
inline constexpr auto kOversubscribedSpinFor = std::chrono::microseconds(50);
inline constexpr auto kYieldFor = std::chrono::milliseconds(20);
inline constexpr auto kSleepBetweenPolls = std::chrono::microseconds(200);

// Calls `test` (one non-blocking MPI poll, true when done) until it returns true; returns false when
// `timeout` passed first. Spins for `spin_for` first. See Note [Collective timeouts] and Note [Spinning,
// yielding and sleeping while waiting].
template <typename Test>
bool poll_until_done(Test&& test, std::chrono::milliseconds timeout, std::chrono::microseconds spin_for) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  while (true) {
    if (test()) return true;
    const Clock::duration waited = Clock::now() - start;
    if (waited >= timeout) return false;
    if (waited < spin_for) continue;
    if (waited < kYieldFor) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(kSleepBetweenPolls);
    }
  }
}

// A communicator's MPI state, shared with the Works it started, so that a Work may outlive its communicator.
struct MpiGroup {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
  int max_tag = 32767;  // MPI_TAG_UB, at least 32767 by the standard
  // How long a wait spins before it yields: Note [Spinning, yielding and sleeping while waiting].
  std::chrono::microseconds spin_for = kOversubscribedSpinFor;
  // Why this communicator is unusable (the first timeout), or empty. See Note [Collective timeouts].
  std::string broken;
  // Buffers of requests abandoned on timeout: MPI may still write into them, so they live as long as we do.
  std::vector<at::Tensor> abandoned;

  MpiGroup() = default;
  MpiGroup(const MpiGroup&) = delete;
  MpiGroup& operator=(const MpiGroup&) = delete;
  ~MpiGroup() {
    // A communicator kept in a static outlives main()'s MpiRuntime; MPI_Finalize has released it then. One
    // with an abandoned request is left to MPI_Finalize, since freeing it would wait for that request.
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm != MPI_COMM_NULL && broken.empty()) MPI_Comm_free(&comm);
  }

  void throw_if_broken(const std::string& what) const {
    if (broken.empty()) return;
    throw std::runtime_error(
        fmt::format("[rank {}] {} refused: this communicator is unusable since an earlier call failed ({}). "
                    "HINT: exit and "
                    "resume from the last checkpoint",
                    rank, what, broken));
  }
};

// Note [Blocking payloads after the agreement]
// A blocking collective first agrees on the call (Note [Agreeing on a collective before running it]): a
// non-blocking all-reduce with the timeout of Note [Collective timeouts]. When it completes, every rank of
// the communicator has entered this very call with a matching input, so the payload cannot wait for a rank
// that went elsewhere, threw, or never came: the hangs a timeout exists for are ruled out before a byte of it
// moves. The payload then runs as MPI's blocking collective (MPI_Allreduce, MPI_Allgather, ...), which Open
// MPI serves with coll/tuned's algorithms (ring, Rabenseifner, recursive doubling, chosen per size and rank
// count) instead of libnbc's schedules: at 1 MiB on 2 ranks, libnbc's all-gather took ~90 µs against ~60 µs
// (bench/README.md, "Communication"). What the payload can still meet is a peer that dies or stops in the
// milliseconds between: a dead peer makes mpirun end the job, and a stopped one is what the heartbeat
// watchdog reports (comm/watchdog.h), naming the rank and this collective, which it sees through
// CollectiveObserver as it sees every wait. Asynchronous calls stay non-blocking end to end: they exist to
// overlap, and they skip the agreement.
enum class Call {
  Blocking,     // agreed, then MPI's blocking collective
  Async,        // started non-blocking without agreement (the default for *_async)
  AgreedAsync,  // agreed, then started non-blocking (*_async with VIMO_COMM_CHECK_ASYNC=1)
};

// One non-blocking MPI operation and what it needs: the buffers it reads and writes (kept alive until it
// completes) and the work left for the host afterwards (averaging, copying back, widening back).
class MpiWork final : public Work {
 public:
  MpiWork(std::shared_ptr<MpiGroup> group, std::string what, int64_t bytes, std::chrono::milliseconds timeout)
      : group_(std::move(group)), what_(std::move(what)), bytes_(bytes), timeout_(timeout) {}
  MpiWork(const MpiWork&) = delete;
  MpiWork& operator=(const MpiWork&) = delete;

  ~MpiWork() override;

  // Where the operation's request goes; `buffers` are the tensors it reads or writes.
  MPI_Request* request() { return &request_; }
  void keep(std::initializer_list<at::Tensor> buffers) {
    buffers_.insert(buffers_.end(), buffers.begin(), buffers.end());
  }
  void on_completion(std::function<void()> finish) { finish_ = std::move(finish); }
  const MPI_Status& status() const { return status_; }

  // Runs `call`, a blocking MPI call that does this work's operation, in place of a non-blocking start and
  // wait: see Note [Blocking payloads after the agreement]. On return the work is done.
  template <typename Call>
  void run_blocking(Call&& call) {
    group_->throw_if_broken(what_);
    const Observed observed(what_, bytes_);
    VIMO_MPI_CHECK(call());
    finish();
  }

  void wait() override;
  bool is_completed() override;

  std::string description() const override { return what_; }

 private:
  // The watchdog sees every wait, so a rank stuck in one is reported with the collective's name.
  struct Observed {
    CollectiveObserver* observer;
    Observed(const std::string& what, int64_t bytes);
    ~Observed();
    Observed(const Observed&) = delete;
    Observed& operator=(const Observed&) = delete;
  };

  // One MPI_Test; on completion runs the host-side finish exactly once.
  bool test();
  void finish();

  std::shared_ptr<MpiGroup> group_;
  std::string what_;
  int64_t bytes_ = 0;
  std::chrono::milliseconds timeout_;
  MPI_Request request_ = MPI_REQUEST_NULL;
  MPI_Status status_{};
  std::vector<at::Tensor> buffers_;
  std::function<void()> finish_;
  bool done_ = false;
};

// "float32 [3, 4]" (mpi_work.cpp).
std::string tensor_text(const at::Tensor& tensor);
// The bytes `tensor` holds; 0 when undefined (mpi_work.cpp).
int64_t bytes_of(const at::Tensor& tensor);

// "allreduce (sum) of int64 [5]": the call, as errors and Works name it (mpi_agreement.cpp).
std::string describe(Collective collective, const at::Tensor& tensor, int64_t argument);
// Makes the ranks of `group` agree on the call before it runs (mpi_agreement.cpp): returns when every rank
// made the same call and accepted its input; otherwise throws on every rank. Waits at most `timeout`.
void agree(const std::shared_ptr<MpiGroup>& group, std::chrono::milliseconds timeout, Collective collective,
           const at::Tensor& tensor, int64_t argument, const std::string& problem);

}  // namespace vimo::comm::mpi_detail
