// Defines what the files of the MPI backend (comm/mpi_*.cpp) share, none of it part of vimo's API:
// VIMO_MPI_CHECK, how tensors travel over MPI (wire_type, reduction), the collectives the ranks agree on and
// how a call is named (CallName), how a wait polls (poll_until_done, with Note [Collective timeouts]),
// MpiGroup, a communicator's MPI state, run_blocking, the payload of a blocking call, and MpiWork, one
// non-blocking MPI operation.
#pragma once

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "comm/collective_call.h"
#include "comm/communicator.h"

namespace vimo::comm::mpi_detail {

// Throws the error of a failed MPI call: the rank, call, file:line and MPI's own error string (mpi_work.cpp).
[[noreturn]] void throw_mpi_failure(int status, const char* call, const char* file, int line);

// Note [One MPI call at a time]
// vimo initializes MPI at MPI_THREAD_SERIALIZED (Note [MPI thread level] in mpi_runtime.cpp): any thread may
// call MPI, but never two at once. Besides the caller's threads, the gradient reducer polls from a thread of
// its own (Note [A progress thread for MPI] in gradient_reducer.cpp), so every MPI call of vimo_comm holds
// one process-wide mutex for its duration: VIMO_MPI_CHECK takes it. A blocking collective holds it until it
// returns, and a poll waits for it. Recursive, so that a call made while it is held (MPI_Init_thread's
// error path, say) cannot deadlock. Code outside vimo_comm that calls MPI directly (tests, the raw baselines
// of `vimo bench comm`) must not overlap a reducer's step.
std::recursive_mutex& mpi_call_mutex();  // mpi_work.cpp

}  // namespace vimo::comm::mpi_detail

// Every MPI call goes through this: a failure becomes an exception naming the rank, call, file:line and MPI's
// own error string. (Our communicators use MPI_ERRORS_RETURN, so failures come back here instead of
// aborting.)
#define VIMO_MPI_CHECK(call)                                                                    \
  do {                                                                                          \
    int vimo_mpi_status_ = MPI_SUCCESS;                                                         \
    {                                                                                           \
      const std::lock_guard<std::recursive_mutex> vimo_mpi_lock_(                               \
          ::vimo::comm::mpi_detail::mpi_call_mutex());                                          \
      vimo_mpi_status_ = (call);                                                                \
    }                                                                                           \
    if (vimo_mpi_status_ != MPI_SUCCESS)                                                        \
      ::vimo::comm::mpi_detail::throw_mpi_failure(vimo_mpi_status_, #call, __FILE__, __LINE__); \
  } while (0)

namespace vimo::comm::mpi_detail {

// Note [Half types over MPI]
// MPI 3.1 (OpenMPI 4) has no bfloat16 or float16 datatype, so MPI cannot add them. All-reduce converts them
// to float32, reduces and rounds back once: max and min are exact (the conversion is exact), a sum is rounded
// once at the end instead of after every addition. All-gather and broadcast only move bits, so they send the
// raw 16-bit words as MPI_UINT16_T (the same bytes as MPI_BYTE, counted per element).

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

// How a call is named, checked and agreed on, shared with the other backends (comm/collective_call.h).
using detail::bytes_of;
using detail::CallName;
using detail::Collective;
using detail::describe;
using detail::is_half;
using detail::judge_signatures;
using detail::kSignatureLength;
using detail::ObservedWait;
using detail::Signature;
using detail::tensor_text;
using SignatureField = detail::SignatureField;
using detail::kArgument;
using detail::kCollective;
using detail::kDims;
using detail::kDtype;
using detail::kInputAccepted;
using detail::kNumel;
using detail::kSizes;

// Note [The fixed cost of a blocking call]
// Besides its payload, a blocking collective pays a fixed cost per call: the agreement's round trip (an
// MPI_Iallgather of a 112-byte signature, under a microsecond on 2 ranks over shared memory) and the host's
// work around both. That host work used to cost more than the round trip: three descriptions formatted with
// fmt that only errors read, two tensors allocated for the agreement's buffers, two shared MpiWorks, a
// std::function and a vector of kept tensors. In bench_comm_report's 4 KiB rows on 2 ranks, where the fixed
// cost is all there is, ours took 2.2-2.4 µs more than raw MPI. So the blocking path allocates nothing it can
// avoid: a call is named by CallName, the numbers of its signature, formatted only when an error, a timeout
// or Work::description() asks for the text; the agreement exchanges through buffers the communicator keeps
// (MpiGroup::agreement) and waits on an MpiWork on its stack; the payload runs through run_blocking and
// write_back, with no MpiWork at all. The watchdog needs no text either: CollectiveObserver takes a string
// literal and a byte count. The 4 KiB gap fell to 0.7-1.2 µs, mostly the round trip itself, and the worst
// ours/raw at 1-4 MiB rose from 0.88 to 0.94 (within the machine's run-to-run noise of a few percent there).
// Asynchronous calls still allocate their MpiWork, since it must outlive the call.

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
// A large payload stretches the phases before sleeping: a wait for B bytes spins (or yields) for as long as
// B bytes take at kSlowTransferBytesPerSecond, when that is longer than kYieldFor. Open MPI moves a large
// message in pipelined fragments and advances them only while the process is inside an MPI call, so a wait
// that slept between polls stretched every fragment by the sleep: on a 16-core machine, 2 ranks, the
// asynchronous all-reduce of 64 MiB took 244 ms against 70 ms for raw MPI_Iallreduce + MPI_Wait, and the
// all-gather of 256 MiB 299 ms against 78 ms (bench/README.md, "Communication on 16 cores"). A transfer
// slower than that rate is taken for a stalled peer and waited for asleep.
inline constexpr auto kOversubscribedSpinFor = std::chrono::microseconds(50);
inline constexpr auto kYieldFor = std::chrono::milliseconds(20);
inline constexpr auto kSleepBetweenPolls = std::chrono::microseconds(200);
inline constexpr double kSlowTransferBytesPerSecond = 100e6;

// Calls `test` (one non-blocking MPI poll, true when done) until it returns true; returns false when
// `timeout` passed first. Spins for `spin_for` first (kYieldFor: not oversubscribed), and never sleeps before
// `bytes` could have moved at kSlowTransferBytesPerSecond. See Note [Collective timeouts] and Note [Spinning,
// yielding and sleeping while waiting].
template <typename Test>
bool poll_until_done(Test&& test, std::chrono::milliseconds timeout, std::chrono::microseconds spin_for,
                     int64_t bytes = 0) {
  using Clock = std::chrono::steady_clock;
  const auto transfer = std::chrono::microseconds(static_cast<int64_t>(
      1e6 * static_cast<double>(std::max<int64_t>(bytes, 0)) / kSlowTransferBytesPerSecond));
  const Clock::duration busy_for = std::max<Clock::duration>(kYieldFor, transfer);
  const Clock::duration spin = spin_for >= kYieldFor ? busy_for : Clock::duration(spin_for);
  const Clock::time_point start = Clock::now();
  while (true) {
    if (test()) return true;
    const Clock::duration waited = Clock::now() - start;
    if (waited >= timeout) return false;
    if (waited < spin) continue;
    if (waited < busy_for) {
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
  // The agreement's exchange buffers, kept instead of allocated per call (Note [The fixed cost of a blocking
  // call]). An exchange that timed out may still write into them later, which is safe for the reason
  // `abandoned` is: they live as long as we do, and a broken communicator starts no other exchange.
  struct AgreementBuffers {
    Signature mine{};
    std::vector<int64_t> all;                              // [ranks, signature], sized on first use
    std::array<int64_t, 2 * kSignatureLength> extremes{};  // [max of each field, -(min of each field)]
  } agreement;

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

  void throw_if_broken(const CallName& call) const {
    if (broken.empty()) return;
    throw std::runtime_error(
        fmt::format("[rank {}] {} refused: this communicator is unusable since an earlier call failed ({}). "
                    "HINT: exit and "
                    "resume from the last checkpoint",
                    rank, call.text(), broken));
  }
};

// After a reduction into `result`, the float32 or contiguous stand-in of the caller's `target` (or `target`
// itself): divides an average by the rank count, then copies into `target` (mpi_work.cpp).
void write_back(at::Tensor& result, at::Tensor& target, bool average, int ranks);

// Note [Blocking payloads after the agreement]
// A blocking collective first agrees on the call (Note [Agreeing on a collective before running it]): a
// non-blocking all-gather (all-reduce on many ranks) with the timeout of Note [Collective timeouts]. When it
// completes, every rank of the communicator has entered this very call with a matching input, so the payload
// cannot wait for a rank that went elsewhere, threw, or never came: the hangs a timeout exists for are ruled
// out before a byte of it moves. The payload then runs as MPI's blocking collective (MPI_Allreduce,
// MPI_Allgather, ...), which Open MPI serves with coll/tuned's algorithms (ring, Rabenseifner, recursive
// doubling, chosen per size and rank count) instead of libnbc's schedules: at 1 MiB on 2 ranks, libnbc's
// all-gather took ~90 µs against ~60 µs (bench/README.md, "Communication"). What the payload can still meet
// is a peer that dies or stops in the milliseconds between: a dead peer makes mpirun end the job, and a
// stopped one is what the heartbeat watchdog reports (comm/watchdog.h), naming the rank and this collective,
// which it sees through CollectiveObserver as it sees every wait. Asynchronous calls stay non-blocking end to
// end: they exist to overlap, and they skip the agreement.
enum class Call {
  Blocking,     // agreed, then MPI's blocking collective
  Async,        // started non-blocking without agreement (the default for *_async)
  AgreedAsync,  // agreed, then started non-blocking (*_async with VIMO_COMM_CHECK_ASYNC=1)
};

// Runs `call`, MPI's blocking collective, as the payload of a blocking call that the ranks agreed on (Note
// [Blocking payloads after the agreement]): refused on a broken communicator and seen by the observer, with
// nothing allocated (Note [The fixed cost of a blocking call]).
template <typename MpiCall>
void run_blocking(const MpiGroup& group, const CallName& call, int64_t bytes, MpiCall&& mpi_call) {
  group.throw_if_broken(call);
  const ObservedWait observed(call.literal(), bytes);
  VIMO_MPI_CHECK(mpi_call());
}

// One non-blocking MPI operation and what it needs: the buffers it reads and writes (kept alive until it
// completes) and the write-back left for the host afterwards.
class MpiWork final : public Work {
 public:
  MpiWork(std::shared_ptr<MpiGroup> group, CallName call, int64_t bytes, std::chrono::milliseconds timeout)
      : group_(std::move(group)), call_(std::move(call)), bytes_(bytes), timeout_(timeout) {}
  MpiWork(const MpiWork&) = delete;
  MpiWork& operator=(const MpiWork&) = delete;

  ~MpiWork() override;

  // Where the operation's request goes; `buffers` are the tensors it reads or writes.
  MPI_Request* request() { return &request_; }
  void keep(std::initializer_list<at::Tensor> buffers) {
    buffers_.insert(buffers_.end(), buffers.begin(), buffers.end());
  }
  // On completion, write_back(result, target, average, ranks).
  void write_back_on_completion(at::Tensor result, at::Tensor target, bool average) {
    result_ = std::move(result);
    target_ = std::move(target);
    average_ = average;
  }
  // A receive into `tensor`: a message of another length fails the wait, naming both (MPI itself would report
  // a longer one as a bare truncation and accept a shorter one silently), and a timeout cancels it.
  void expect_message(const at::Tensor& tensor) {
    expected_bytes_ = detail::bytes_of(tensor);
    expected_text_ = detail::tensor_text(tensor);
  }

  void wait() override;
  bool is_completed() override;

  std::string description() const override { return call_.text(); }

 private:
  // One MPI_Test; on completion runs the host-side finish exactly once.
  bool test();
  void finish();

  std::shared_ptr<MpiGroup> group_;
  CallName call_;
  int64_t bytes_ = 0;
  std::chrono::milliseconds timeout_;
  MPI_Request request_ = MPI_REQUEST_NULL;
  std::vector<at::Tensor> buffers_;
  at::Tensor result_, target_;  // what write_back_on_completion named; undefined when nothing is written back
  bool average_ = false;
  bool receiving() const { return expected_bytes_ >= 0; }
  bool cancel_receive();         // after a timeout; true when the receive is over (cancelled or completed)
  void end_without_result();     // a receive that failed: done, nothing written back, buffers released
  int64_t expected_bytes_ = -1;  // a receive's length: see expect_message
  std::string expected_text_;
  std::string failure_;  // why a finished receive failed (its every wait throws it)
  bool done_ = false;
};

// Makes the ranks of `group` agree on `call` before it runs (mpi_agreement.cpp): returns when every rank
// made the same call and accepted its input; otherwise throws on every rank. `problem` is what this rank's
// own checks found ("" when none); `bytes` is the payload's size, for a timeout's message. Waits at most
// `timeout`.
void agree(const std::shared_ptr<MpiGroup>& group, std::chrono::milliseconds timeout, const CallName& call,
           int64_t bytes, const std::string& problem);

}  // namespace vimo::comm::mpi_detail
