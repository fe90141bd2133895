// Defines the MPI backend of vimo::comm::Communicator (CPU tensors, over a duplicate of MPI_COMM_WORLD or a
// split of one) with its asynchronous Work and timeouts, MpiRuntime, the owner of MPI_Init_thread /
// MPI_Finalize, and Communicator::split's default.
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <mpi.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"

namespace vimo::comm {
namespace {

// This process's rank in MPI_COMM_WORLD, or -1 before MPI_Init / after MPI_Finalize (for error messages).
int world_rank_for_errors() {
  int initialized = 0, finalized = 0, rank = -1;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

[[noreturn]] void throw_mpi_failure(int status, const char* call, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  const std::string reason = MPI_Error_string(status, text, &length) == MPI_SUCCESS
                                 ? std::string(text, length)
                                 : fmt::format("MPI error code {}", status);
  throw std::runtime_error(detail::describe_failed_call(
      world_rank_for_errors(), call, file, line, reason,
      "if another rank failed first, its error is the cause; otherwise rerun with --mca btl_base_verbose 100 "
      "to see the transport's view"));
}

// Every MPI call goes through this: a failure becomes an exception naming the rank, call, file:line and MPI's
// own error string. (Our communicators use MPI_ERRORS_RETURN, so failures come back here instead of
// aborting.)
#define VIMO_MPI_CHECK(call)                                                                             \
  do {                                                                                                   \
    const int vimo_mpi_status_ = (call);                                                                 \
    if (vimo_mpi_status_ != MPI_SUCCESS) throw_mpi_failure(vimo_mpi_status_, #call, __FILE__, __LINE__); \
  } while (0)

// Note [MPI thread level]
// We ask for MPI_THREAD_SERIALIZED: any thread may call MPI, one call at a time. The Communicator contract
// (every rank issues the same collectives in the same order) already rules out concurrent calls, but not
// calls from other threads: autograd runs backward functions such as all_gather_with_grad's all-reduce on its
// own worker threads for some devices, and helpers may run on background threads. FUNNELED (main thread only)
// would make those undefined behaviour; MULTIPLE would cost locking we do not need.
constexpr int kRequiredThreadLevel = MPI_THREAD_SERIALIZED;

// Note [Progress of non-blocking MPI collectives]
// Open MPI runs its non-blocking collectives (libnbc) without a progress thread over shared memory and TCP: a
// collective moves to its next round only while this process is inside some MPI call (MPI_Test, MPI_Wait, or
// any other). Left alone during a long backward, an MPI_Iallreduce therefore mostly runs when wait() finally
// polls it, and the overlap is lost. We cannot add a progress thread of our own: MPI is initialised
// MPI_THREAD_SERIALIZED (Note [MPI thread level]), so a thread calling MPI_Test while the main thread is in a
// collective would be undefined behaviour. Instead the thread that owns the work pokes progress at the points
// it controls: Work::is_completed() is one MPI_Test, and GradientReducer calls it on every bucket in flight
// each time a gradient becomes ready and each time it launches a bucket: often enough for the rounds to
// advance during backward, and cheap (an MPI_Test costs about a microsecond). The NCCL backend needs none of
// this: the GPU runs its collectives on their own stream.

// Set when MpiRuntime called MPI_Init_thread, so that only it calls MPI_Finalize.
bool runtime_owns_mpi = false;

// Note [Half types over MPI]
// MPI 3.1 (OpenMPI 4) has no bfloat16 or float16 datatype, so MPI cannot add them. All-reduce converts them
// to float32, reduces and rounds back once: max and min are exact (the conversion is exact), a sum is rounded
// once at the end instead of after every addition. All-gather and broadcast only move bits, so they send the
// raw 16-bit words as MPI_UINT16_T (the same bytes as MPI_BYTE, counted per element).
bool is_half(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// The MPI datatype that carries `dtype` bit for bit, or MPI_DATATYPE_NULL when unsupported.
MPI_Datatype wire_type(at::ScalarType dtype) {
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
MPI_Op reduction(ReduceOp op) {
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

const char* op_name(int64_t op) {
  switch (static_cast<ReduceOp>(op)) {
    case ReduceOp::Sum:
      return "sum";
    case ReduceOp::Avg:
      return "avg";
    case ReduceOp::Max:
      return "max";
    case ReduceOp::Min:
      return "min";
  }
  return "unknown op";
}

// Note [Agreeing on a collective before running it]
// MPI matches collectives by order alone. A rank that passes another shape, dtype, op or root makes the
// others read garbage or hang, and a rank that rejects its input and throws leaves the others waiting
// forever. So every blocking collective first all-reduces a small fixed-size signature of the call (which
// collective, dtype, op or root, shape, and whether this rank's own checks passed) with MPI_MAX over [s, -s],
// which hands every rank both the maximum and the minimum of each field: the ranks agree exactly when they
// are equal. Every rank receives the same extremes, so on disagreement all of them take the error path
// together: they gather each other's signatures and throw errors that name every rank's call, and nobody is
// left waiting. The price is one small all-reduce per collective, negligible beside the payload of a gradient
// bucket. Split agrees on the call only: its color and key differ between ranks by design. Asynchronous calls
// skip the agreement by default: see Note [Agreement on asynchronous calls].
//
// Note [Agreement on asynchronous calls]
// For an asynchronous call the agreement would be a blocking all-reduce at launch: the rank that reaches a
// gradient bucket first would wait there for the slowest rank to reach the same bucket, serialising backward
// with communication, which is what asynchronous calls exist to avoid. So they check only their own inputs
// (throwing on this rank alone) and rely on the caller to issue the same calls everywhere: GradientReducer
// builds identical buckets on every rank and checks that layout once, at construction, with blocking calls.
// A mismatch that slips through shows up as MPI's own error (a truncated message) or, when a rank skipped a
// call, as the timeout of Note [Collective timeouts] naming the call. VIMO_COMM_CHECK_ASYNC=1 makes
// asynchronous calls run the agreement first, like blocking ones: a debugging aid for a suspected mismatch.
enum class Collective : int64_t { Barrier = 1, Allreduce, Allgather, Broadcast, Split, ReduceScatter };
constexpr int kSignatureDims = 8;  // dims past the 8th are covered by numel only
enum SignatureField { kCollective, kDtype, kArgument, kInputAccepted, kDims, kNumel, kSizes };
constexpr int kSignatureLength = kSizes + kSignatureDims;
constexpr int kExtremesLength = 2 * kSignatureLength;  // [max of each field, -(min of each field)]
using Signature = std::array<int64_t, kSignatureLength>;

Signature signature_of(Collective collective, const at::Tensor& tensor, int64_t argument, bool accepted) {
  Signature s{};
  s[kCollective] = static_cast<int64_t>(collective);
  s[kArgument] = argument;
  s[kInputAccepted] = accepted ? 1 : 0;
  s[kDtype] = -1;
  if (tensor.defined()) {
    s[kDtype] = static_cast<int64_t>(tensor.scalar_type());
    s[kDims] = tensor.dim();
    s[kNumel] = tensor.numel();
    for (int64_t d = 0; d < std::min<int64_t>(tensor.dim(), kSignatureDims); ++d)
      s[kSizes + d] = tensor.size(d);
  }
  return s;
}

// "allgather of float32 [3, 4]", "allreduce (sum) of int64 [5]", "reduce_scatter (avg) of float64 [4, 2]",
// "broadcast from rank 1 of float32 [2]", "barrier", "split".
std::string describe(const Signature& s) {
  const auto collective = static_cast<Collective>(s[kCollective]);
  if (collective == Collective::Barrier) return "barrier";
  if (collective == Collective::Split) return "split";
  std::string text;
  switch (collective) {
    case Collective::Allreduce:
      text = fmt::format("allreduce ({})", op_name(s[kArgument]));
      break;
    case Collective::ReduceScatter:
      text = fmt::format("reduce_scatter ({})", op_name(s[kArgument]));
      break;
    case Collective::Allgather:
      text = "allgather";
      break;
    default:
      text = fmt::format("broadcast from rank {}", s[kArgument]);
  }
  if (s[kDtype] < 0) return text + " of an undefined tensor";
  std::vector<int64_t> shown(s.begin() + kSizes,
                             s.begin() + kSizes + std::min<int64_t>(s[kDims], kSignatureDims));
  text += fmt::format(" of {} [{}{}]", c10::getDtypeNames(static_cast<at::ScalarType>(s[kDtype])).first,
                      fmt::join(shown, ", "), s[kDims] > kSignatureDims ? ", ..." : "");
  return text;
}

std::string describe(Collective collective, const at::Tensor& tensor, int64_t argument) {
  return describe(signature_of(collective, tensor, argument, true));
}

int64_t bytes_of(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.numel() * static_cast<int64_t>(tensor.element_size()) : 0;
}

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
constexpr auto kOversubscribedSpinFor = std::chrono::microseconds(50);
constexpr auto kYieldFor = std::chrono::milliseconds(20);
constexpr auto kSleepBetweenPolls = std::chrono::microseconds(200);

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

// One non-blocking MPI operation and what it needs: the buffers it reads and writes (kept alive until it
// completes) and the work left for the host afterwards (averaging, copying back, widening back).
// The collective's name as a string literal (what CollectiveObserver takes), from the start of a description
// such as "allreduce (sum) of float32 [4] ...".
const char* collective_literal(const std::string& what) {
  for (const char* name :
       {"allreduce", "allgather", "reduce_scatter", "broadcast", "barrier", "split", "send", "recv"}) {
    if (what.rfind(name, 0) == 0) return name;
  }
  return "collective";
}

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

class MpiWork final : public Work {
 public:
  MpiWork(std::shared_ptr<MpiGroup> group, std::string what, int64_t bytes, std::chrono::milliseconds timeout)
      : group_(std::move(group)), what_(std::move(what)), bytes_(bytes), timeout_(timeout) {}
  MpiWork(const MpiWork&) = delete;
  MpiWork& operator=(const MpiWork&) = delete;

  ~MpiWork() override {
    if (done_ || request_ == MPI_REQUEST_NULL) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    if (!group_->broken.empty()) {  // the request may never complete: its memory must stay valid
      group_->abandoned.insert(group_->abandoned.end(), buffers_.begin(), buffers_.end());
      return;
    }
    try {
      wait();  // MPI may still read and write the buffers: they cannot be freed before it finishes
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s\n", e.what());
      group_->abandoned.insert(group_->abandoned.end(), buffers_.begin(), buffers_.end());
    }
  }

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

  void wait() override {
    if (done_) return;
    group_->throw_if_broken(what_);
    const Observed observed(what_, bytes_);
    if (!poll_until_done([&] { return test(); }, timeout_, group_->spin_for)) {
      group_->broken = detail::describe_timeout(group_->rank, what_, bytes_, timeout_, group_->size,
                                                "This communicator is unusable from now on");
      group_->abandoned.insert(group_->abandoned.end(), buffers_.begin(), buffers_.end());
      throw std::runtime_error(group_->broken);
    }
  }

  bool is_completed() override {
    if (done_) return true;
    group_->throw_if_broken(what_);
    return test();
  }

  std::string description() const override { return what_; }

 private:
  // The watchdog sees every wait, so a rank stuck in one is reported with the collective's name.
  struct Observed {
    CollectiveObserver* observer;
    Observed(const std::string& what, int64_t bytes) : observer(collective_observer()) {
      if (observer) observer->enter_collective(collective_literal(what), bytes);
    }
    ~Observed() {
      if (observer) observer->leave_collective();
    }
    Observed(const Observed&) = delete;
    Observed& operator=(const Observed&) = delete;
  };

  // One MPI_Test; on completion runs the host-side finish exactly once.
  bool test() {
    int flag = 0;
    VIMO_MPI_CHECK(MPI_Test(&request_, &flag, &status_));
    if (!flag) return false;
    finish();
    return true;
  }

  void finish() {
    done_ = true;
    at::NoGradGuard no_grad;  // the copies are communication, not part of any graph
    if (finish_) finish_();
    finish_ = nullptr;
    buffers_.clear();
  }

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

// "float32 [3, 4]".
std::string tensor_text(const at::Tensor& tensor) {
  if (!tensor.defined()) return "an undefined tensor";
  return fmt::format("{} [{}]", c10::getDtypeNames(tensor.scalar_type()).first,
                     fmt::join(tensor.sizes(), ", "));
}

// What is wrong with averaging `tensor`, or "". Rejected rather than rounded: an integer mean is almost
// always a bug, and any rounding rule would be a silent choice the NCCL backend would have to copy.
std::string check_average(const char* collective, const at::Tensor& tensor, ReduceOp op) {
  if (op != ReduceOp::Avg || at::isFloatingType(tensor.scalar_type())) return "";
  return fmt::format(
      "{} (avg) of {} tensors is not supported. HINT: use Sum and divide with the rounding you want",
      collective, c10::getDtypeNames(tensor.scalar_type()).first);
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() : group_(std::make_shared<MpiGroup>()) {
    int initialized = 0;
    VIMO_MPI_CHECK(MPI_Initialized(&initialized));
    if (!initialized) {
      throw std::runtime_error(
          "make_mpi_communicator: MPI is not initialized. HINT: create vimo::comm::MpiRuntime first thing in "
          "main()");
    }
    // A private duplicate: our collectives never match messages of other code using MPI_COMM_WORLD.
    VIMO_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &group_->comm));
    adopt();
    group_->spin_for = oversubscribed() ? kOversubscribedSpinFor
                                        : std::chrono::duration_cast<std::chrono::microseconds>(kYieldFor);
  }

  // Takes ownership of `owned` (a communicator made by split), freed with the group; waits spin as the
  // parent's do.
  MpiCommunicator(MPI_Comm owned, std::chrono::microseconds spin_for) : group_(std::make_shared<MpiGroup>()) {
    group_->comm = owned;
    adopt();
    group_->spin_for = spin_for;
  }

  int rank() const override { return group_->rank; }
  int size() const override { return group_->size; }
  std::string backend_name() const override { return "mpi"; }

  void allreduce(at::Tensor& tensor, ReduceOp op) override { start_allreduce(tensor, op, Call::Blocking); }

  std::shared_ptr<Work> allreduce_async(at::Tensor& tensor, ReduceOp op) override {
    return start_allreduce(tensor, op, detail::check_async_calls() ? Call::AgreedAsync : Call::Async);
  }

  at::Tensor allgather(const at::Tensor& tensor) override {
    admit(Collective::Allgather, tensor, 0, check_gather_input(tensor), true);
    std::vector<int64_t> sizes = tensor.sizes().vec();
    sizes[0] *= size();
    at::Tensor output = at::empty(sizes, tensor.options().requires_grad(false));  // [size * n, ...]
    start_allgather(tensor, output, Call::Blocking);
    return output;
  }

  std::shared_ptr<Work> allgather_async(const at::Tensor& input, at::Tensor& output) override {
    admit(Collective::Allgather, input, 0, check_gather_into(input, output), detail::check_async_calls());
    return start_allgather(input, output, Call::Async);
  }

  void allgather_into(const at::Tensor& input, at::Tensor& output) override {
    admit(Collective::Allgather, input, 0, check_gather_into(input, output), true);
    start_allgather(input, output, Call::Blocking);
  }

  at::Tensor reduce_scatter(const at::Tensor& input, ReduceOp op) override {
    admit(Collective::ReduceScatter, input, static_cast<int64_t>(op), check_scatter_input(input, op), true);
    at::Tensor output = at::empty(scattered_sizes(input), input.options().requires_grad(false));  // [n, ...]
    start_reduce_scatter(input, output, op, Call::Blocking);
    return output;
  }

  std::shared_ptr<Work> reduce_scatter_async(const at::Tensor& input, at::Tensor& output,
                                             ReduceOp op) override {
    admit(Collective::ReduceScatter, input, static_cast<int64_t>(op), check_scatter_into(input, output, op),
          detail::check_async_calls());
    return start_reduce_scatter(input, output, op, Call::Async);
  }

  void reduce_scatter_into(const at::Tensor& input, at::Tensor& output, ReduceOp op) override {
    admit(Collective::ReduceScatter, input, static_cast<int64_t>(op), check_scatter_into(input, output, op),
          true);
    start_reduce_scatter(input, output, op, Call::Blocking);
  }

  void broadcast(at::Tensor& tensor, int root) override {
    std::string problem = check_input("broadcast", tensor);
    if (problem.empty() && (root < 0 || root >= size())) {
      problem = fmt::format("broadcast from rank {}, but the ranks are 0..{}", root, size() - 1);
    }
    admit(Collective::Broadcast, tensor, root, problem, true);

    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.contiguous();
    auto work = new_work(describe(Collective::Broadcast, tensor, root), bytes_of(tensor));
    work->run_blocking([&] {
      return MPI_Bcast(buffer.data_ptr(), static_cast<int>(buffer.numel()), wire_type(buffer.scalar_type()),
                       root, group_->comm);
    });
    if (!buffer.is_same(tensor)) tensor.copy_(buffer);
  }

  // The agreement is an all-reduce, whose result depends on every rank's input: no rank can leave it before
  // all have entered, so it is itself the barrier (and it also catches a rank calling something else).
  void barrier() override { admit(Collective::Barrier, at::Tensor(), 0, "", true); }

  void send(const at::Tensor& tensor, int dst, int tag) override {
    const std::string what = fmt::format("send of {} to rank {} (tag {})", tensor_text(tensor), dst, tag);
    group_->throw_if_broken(what);
    std::string problem = check_input("send", tensor);
    if (problem.empty()) problem = check_peer("send to", dst, tag);
    if (!problem.empty()) throw std::runtime_error(fmt::format("[rank {}] {}", rank(), problem));

    const at::Tensor buffer = tensor.contiguous();
    auto work = new_work(what, bytes_of(tensor));
    VIMO_MPI_CHECK(MPI_Isend(buffer.data_ptr(), static_cast<int>(buffer.numel()),
                             wire_type(buffer.scalar_type()), dst, tag, group_->comm, work->request()));
    work->keep({buffer});
    work->wait();
  }

  void recv(at::Tensor& tensor, int src, int tag) override {
    const std::string what = fmt::format("recv of {} from rank {} (tag {})", tensor_text(tensor), src, tag);
    group_->throw_if_broken(what);
    std::string problem = check_input("recv", tensor);
    if (problem.empty()) problem = check_peer("recv from", src, tag);
    if (!problem.empty()) throw std::runtime_error(fmt::format("[rank {}] {}", rank(), problem));

    // Probe first, to compare the message's size with ours before receiving it: MPI would otherwise report a
    // longer message as a bare truncation and accept a shorter one silently.
    MPI_Status probed{};
    const bool arrived = poll_until_done(
        [&] {
          int flag = 0;
          VIMO_MPI_CHECK(MPI_Iprobe(src, tag, group_->comm, &flag, &probed));
          return flag != 0;
        },
        timeout(), group_->spin_for);
    if (!arrived) {
      // Nothing was posted, so nothing is abandoned: the communicator stays usable.
      throw std::runtime_error(
          detail::describe_timeout(rank(), what, bytes_of(tensor), timeout(), size(),
                                   "No message arrived, so the communicator stays usable"));
    }
    const MPI_Datatype type = wire_type(tensor.scalar_type());
    int count = 0;
    VIMO_MPI_CHECK(MPI_Get_count(&probed, type, &count));
    if (count != tensor.numel()) {
      int bytes = 0;
      VIMO_MPI_CHECK(MPI_Get_count(&probed, MPI_BYTE, &bytes));
      // Receive it anyway, so that the sender is released and the next message of this tag is the next one.
      at::Tensor discard = at::empty({bytes}, at::kByte);
      receive_into(discard, MPI_BYTE, src, tag, what);
      throw std::runtime_error(
          fmt::format("[rank {}] {}: the message held {} bytes, but {} needs {}. HINT: the sender must send "
                      "a tensor of the "
                      "receiver's shape and dtype",
                      rank(), what, bytes, tensor_text(tensor), bytes_of(tensor)));
    }
    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.is_contiguous() ? tensor : at::empty(tensor.sizes(), tensor.options());
    receive_into(buffer, type, src, tag, what);
    if (!buffer.is_same(tensor)) tensor.copy_(buffer);
  }

  std::shared_ptr<Communicator> split(int color, int key) override {
    std::string problem;
    if (color < 0) {
      problem = fmt::format(
          "split got color {}, but colors must be >= 0. HINT: give every rank a group number "
          "0, 1, ...; a rank that belongs to no group still needs a color of its own",
          color);
    }
    // Colors and keys differ between ranks by design, so only the call itself is agreed on. After the
    // agreement every rank is inside the split, so the blocking MPI call cannot wait for a missing rank.
    admit(Collective::Split, at::Tensor(), 0, problem, true);
    MPI_Comm group = MPI_COMM_NULL;
    VIMO_MPI_CHECK(MPI_Comm_split(group_->comm, color, key, &group));
    auto child = std::make_shared<MpiCommunicator>(group, group_->spin_for);
    child->set_timeout(timeout());
    return child;
  }

 private:
  // The set-up shared by every way of making one: errors come back as codes (see VIMO_MPI_CHECK).
  void adopt() {
    VIMO_MPI_CHECK(MPI_Comm_set_errhandler(group_->comm, MPI_ERRORS_RETURN));
    VIMO_MPI_CHECK(MPI_Comm_rank(group_->comm, &group_->rank));
    VIMO_MPI_CHECK(MPI_Comm_size(group_->comm, &group_->size));
    int* max_tag = nullptr;
    int found = 0;
    VIMO_MPI_CHECK(MPI_Comm_get_attr(group_->comm, MPI_TAG_UB, &max_tag, &found));
    if (found && max_tag != nullptr) group_->max_tag = *max_tag;
  }

  // Whether this node runs more of the communicator's ranks than it has cores (a collective). See Note
  // [Spinning, yielding and sleeping while waiting].
  bool oversubscribed() {
    MPI_Comm node = MPI_COMM_NULL;
    VIMO_MPI_CHECK(
        MPI_Comm_split_type(group_->comm, MPI_COMM_TYPE_SHARED, group_->rank, MPI_INFO_NULL, &node));
    int ranks_here = 1;
    VIMO_MPI_CHECK(MPI_Comm_size(node, &ranks_here));
    VIMO_MPI_CHECK(MPI_Comm_free(&node));
    const unsigned cores = std::thread::hardware_concurrency();
    return cores == 0 || static_cast<unsigned>(ranks_here) > cores;
  }

  std::shared_ptr<MpiWork> new_work(std::string what, int64_t bytes) {
    return std::make_shared<MpiWork>(group_, std::move(what), bytes, timeout());
  }

  // The gate every collective passes before its payload moves: refuses calls on a broken communicator, then
  // either agrees on the call with every rank (Note [Agreeing on a collective before running it]) or, for
  // asynchronous calls, only throws this rank's own `problem` (Note [Agreement on asynchronous calls]).
  void admit(Collective collective, const at::Tensor& tensor, int64_t argument, const std::string& problem,
             bool agree_first) {
    group_->throw_if_broken(describe(collective, tensor, argument));
    if (agree_first) {
      agree(collective, tensor, argument, problem);
    } else if (!problem.empty()) {
      throw std::runtime_error(fmt::format("[rank {}] {}", rank(), problem));
    }
  }

  // Starts the reduction of `tensor` in place, through a float32 copy for half types (Note [Half types over
  // MPI]) or a contiguous copy for strided tensors; the result is written back on completion.
  std::shared_ptr<MpiWork> start_allreduce(at::Tensor& tensor, ReduceOp op, Call call) {
    std::string problem = check_input("allreduce", tensor);
    if (problem.empty()) problem = check_average("allreduce", tensor, op);
    admit(Collective::Allreduce, tensor, static_cast<int64_t>(op), problem, call != Call::Async);

    at::NoGradGuard no_grad;
    const bool widen = is_half(tensor.scalar_type());
    at::Tensor buffer =
        widen ? tensor.to(tensor.options().dtype(at::kFloat), false, false, at::MemoryFormat::Contiguous)
              : tensor.contiguous();
    auto work = new_work(describe(Collective::Allreduce, tensor, static_cast<int64_t>(op)), bytes_of(tensor));
    work->keep({buffer, tensor});
    work->on_completion([buffer, target = tensor, op, ranks = size()]() mutable {
      if (op == ReduceOp::Avg) buffer.div_(ranks);
      if (!buffer.is_same(target)) target.copy_(buffer);
    });
    const auto count = static_cast<int>(buffer.numel());
    const MPI_Datatype type = widen ? MPI_FLOAT : wire_type(buffer.scalar_type());
    if (call == Call::Blocking) {
      work->run_blocking([&] {
        return MPI_Allreduce(MPI_IN_PLACE, buffer.data_ptr(), count, type, reduction(op), group_->comm);
      });
    } else {
      VIMO_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buffer.data_ptr(), count, type, reduction(op), group_->comm,
                                    work->request()));
    }
    return work;
  }

  // `input` [n, ...] -> `output` [size * n, ...] (checked and admitted). Moves bits only, so half types
  // travel as 16-bit words.
  std::shared_ptr<MpiWork> start_allgather(const at::Tensor& input, at::Tensor& output, Call call) {
    const at::Tensor send = input.contiguous();  // [n, ...]
    const int count = static_cast<int>(send.numel());
    const MPI_Datatype type = wire_type(send.scalar_type());
    auto work = new_work(describe(Collective::Allgather, input, 0), bytes_of(input));
    work->keep({send, output});
    if (call == Call::Blocking) {
      work->run_blocking([&] {
        return MPI_Allgather(send.data_ptr(), count, type, output.data_ptr(), count, type, group_->comm);
      });
    } else {
      VIMO_MPI_CHECK(MPI_Iallgather(send.data_ptr(), count, type, output.data_ptr(), count, type,
                                    group_->comm, work->request()));
    }
    return work;
  }

  // `input` [size * n, ...] -> `output` [n, ...] (checked and admitted), through float32 for half types.
  std::shared_ptr<MpiWork> start_reduce_scatter(const at::Tensor& input, at::Tensor& output, ReduceOp op,
                                                Call call) {
    at::NoGradGuard no_grad;
    const bool widen = is_half(input.scalar_type());
    const at::Tensor send =
        widen ? input.to(input.options().dtype(at::kFloat), false, false, at::MemoryFormat::Contiguous)
              : input.contiguous();  // [size * n, ...]
    at::Tensor receive = widen ? at::empty(output.sizes(), output.options().dtype(at::kFloat)) : output;
    auto work =
        new_work(describe(Collective::ReduceScatter, input, static_cast<int64_t>(op)), bytes_of(input));
    work->keep({send, receive, output});
    work->on_completion([receive, target = output, op, ranks = size()]() mutable {
      if (op == ReduceOp::Avg) receive.div_(ranks);
      if (!receive.is_same(target)) target.copy_(receive);
    });
    const auto count = static_cast<int>(send.numel() / size());
    const MPI_Datatype type = widen ? MPI_FLOAT : wire_type(send.scalar_type());
    if (call == Call::Blocking) {
      work->run_blocking([&] {
        return MPI_Reduce_scatter_block(send.data_ptr(), receive.data_ptr(), count, type, reduction(op),
                                        group_->comm);
      });
    } else {
      VIMO_MPI_CHECK(MPI_Ireduce_scatter_block(send.data_ptr(), receive.data_ptr(), count, type,
                                               reduction(op), group_->comm, work->request()));
    }
    return work;
  }

  // Receives the probed message into `buffer` (contiguous), waiting at most the timeout.
  void receive_into(at::Tensor& buffer, MPI_Datatype type, int src, int tag, const std::string& what) {
    auto work = new_work(what, bytes_of(buffer));
    VIMO_MPI_CHECK(MPI_Irecv(buffer.data_ptr(), static_cast<int>(buffer.numel()), type, src, tag,
                             group_->comm, work->request()));
    work->keep({buffer});
    work->wait();
  }

  // The checks every collective makes on its own input; returns what is wrong, or "" when nothing is.
  static std::string check_input(const char* collective, const at::Tensor& tensor) {
    if (!tensor.defined()) return fmt::format("{} got an undefined tensor", collective);
    if (!tensor.device().is_cpu()) {
      return fmt::format(
          "{} got a tensor on {}, but the MPI backend moves CPU tensors only. HINT: use the NCCL "
          "communicator for CUDA tensors, or move the tensor with .cpu()",
          collective, tensor.device().str());
    }
    if (wire_type(tensor.scalar_type()) == MPI_DATATYPE_NULL) {
      return fmt::format(
          "{} got a {} tensor, which the MPI backend does not support. HINT: use float32, float64, "
          "bfloat16, float16, int32, int64 or uint8",
          collective, c10::getDtypeNames(tensor.scalar_type()).first);
    }
    if (tensor.numel() > INT_MAX) {
      return fmt::format("{} got {} elements, but MPI counts are ints (at most {}). HINT: split the tensor",
                         collective, tensor.numel(), INT_MAX);
    }
    return "";
  }

  static std::string check_gather_input(const at::Tensor& input) {
    std::string problem = check_input("allgather", input);
    if (problem.empty() && input.dim() == 0) {
      problem = "allgather gathers along dim 0 but got a 0-dim tensor. HINT: unsqueeze(0) it first";
    }
    return problem;
  }

  std::string check_scatter_input(const at::Tensor& input, ReduceOp op) const {
    std::string problem = check_input("reduce_scatter", input);
    if (problem.empty()) problem = check_average("reduce_scatter", input, op);
    if (problem.empty() && input.dim() == 0) {
      problem = "reduce_scatter splits dim 0 but got a 0-dim tensor. HINT: unsqueeze(0) it first";
    }
    if (problem.empty() && input.size(0) % size() != 0) {
      problem = fmt::format(
          "reduce_scatter splits dim 0 of {} among {} ranks, but {} is not divisible by {}. HINT: pad dim 0 "
          "to a multiple of the communicator size",
          tensor_text(input), size(), input.size(0), size());
    }
    return problem;
  }

  // What is wrong with an all-gather of `input` into the caller's `output`, or "".
  std::string check_gather_into(const at::Tensor& input, const at::Tensor& output) const {
    std::string problem = check_gather_input(input);
    if (problem.empty()) {
      std::vector<int64_t> sizes = input.sizes().vec();
      sizes[0] *= size();
      problem = check_output("allgather", input, output, sizes);
    }
    return problem;
  }

  // What is wrong with a reduce-scatter of `input` into the caller's `output`, or "".
  std::string check_scatter_into(const at::Tensor& input, const at::Tensor& output, ReduceOp op) const {
    std::string problem = check_scatter_input(input, op);
    if (problem.empty()) problem = check_output("reduce_scatter", input, output, scattered_sizes(input));
    return problem;
  }

  // input [size * n, ...] -> [n, ...]
  std::vector<int64_t> scattered_sizes(const at::Tensor& input) const {
    std::vector<int64_t> sizes = input.sizes().vec();
    sizes[0] /= size();
    return sizes;
  }

  // What is wrong with the caller's `output` of an asynchronous call, or "".
  static std::string check_output(const char* collective, const at::Tensor& input, const at::Tensor& output,
                                  at::IntArrayRef expected_sizes) {
    if (!output.defined()) return fmt::format("{} got an undefined output tensor", collective);
    if (output.device() != input.device() || output.scalar_type() != input.scalar_type() ||
        !output.sizes().equals(expected_sizes) || !output.is_contiguous()) {
      return fmt::format("{} of {} needs a contiguous {} output of {} [{}], but got {}{} on {}", collective,
                         tensor_text(input), input.device().str(),
                         c10::getDtypeNames(input.scalar_type()).first, fmt::join(expected_sizes, ", "),
                         output.is_contiguous() ? "" : "a non-contiguous ", tensor_text(output),
                         output.device().str());
    }
    return "";
  }

  std::string check_peer(const char* direction, int peer, int tag) const {
    if (peer < 0 || peer >= size()) {
      return fmt::format("{} rank {}, but the ranks are 0..{}", direction, peer, size() - 1);
    }
    if (peer == rank()) {
      return fmt::format("{} rank {}, which is this rank. HINT: copy the tensor instead", direction, peer);
    }
    if (tag < 0 || tag > group_->max_tag) {
      return fmt::format("{} rank {} with tag {}, but tags must be in 0..{} (MPI_TAG_UB)", direction, peer,
                         tag, group_->max_tag);
    }
    return "";
  }

  // See Note [Agreeing on a collective before running it]. Returns when every rank made the same call and
  // accepted its input; otherwise throws on every rank. `problem` is what this rank's own checks found. Its
  // all-reduce is non-blocking underneath, so a rank that never arrives makes it time out instead of hang.
  void agree(Collective collective, const at::Tensor& tensor, int64_t argument, const std::string& problem) {
    const Signature mine = signature_of(collective, tensor, argument, problem.empty());
    const std::string what = describe(mine);
    at::Tensor extremes = at::empty({kExtremesLength}, at::kLong);  // [max of each field, -(min of each)]
    int64_t* e = extremes.data_ptr<int64_t>();
    for (int i = 0; i < kSignatureLength; ++i) {
      e[i] = mine[i];
      e[kSignatureLength + i] = -mine[i];
    }
    auto work = new_work(what, bytes_of(tensor));
    VIMO_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, e, kExtremesLength, MPI_INT64_T, MPI_MAX, group_->comm,
                                  work->request()));
    work->keep({extremes});
    work->wait();
    bool same = true;
    for (int i = 0; i < kSignatureLength; ++i) same = same && e[i] == -e[kSignatureLength + i];
    if (same && mine[kInputAccepted] == 1) return;

    at::Tensor mine_tensor = at::empty({kSignatureLength}, at::kLong);
    std::copy(mine.begin(), mine.end(), mine_tensor.data_ptr<int64_t>());
    at::Tensor all = at::empty({size(), kSignatureLength}, at::kLong);  // [ranks, signature]
    auto gather = new_work(what, bytes_of(tensor));
    VIMO_MPI_CHECK(MPI_Iallgather(mine_tensor.data_ptr(), kSignatureLength, MPI_INT64_T, all.data_ptr(),
                                  kSignatureLength, MPI_INT64_T, group_->comm, gather->request()));
    gather->keep({mine_tensor, all});
    gather->wait();
    auto of_rank = [&](int r) {
      Signature s;
      std::copy_n(all.data_ptr<int64_t>() + static_cast<ptrdiff_t>(r) * kSignatureLength, kSignatureLength,
                  s.begin());
      return s;
    };
    if (!problem.empty()) throw std::runtime_error(fmt::format("[rank {}] {}", rank(), problem));
    std::vector<int> rejecting;
    std::vector<std::string> calls;
    for (int r = 0; r < size(); ++r) {
      const Signature s = of_rank(r);
      if (s[kInputAccepted] == 0) rejecting.push_back(r);
      calls.push_back(fmt::format("rank {}: {}", r, describe(s)));
    }
    if (!rejecting.empty()) {
      throw std::runtime_error(
          fmt::format("[rank {}] {} abandoned on every rank: rank(s) {} rejected their input "
                      "(their own errors say why)",
                      rank(), what, fmt::join(rejecting, ", ")));
    }
    throw std::runtime_error(
        fmt::format("[rank {}] the ranks made different calls: {}. HINT: every rank must make the same "
                    "collective calls in "
                    "the same order, with the same dtype, shape, op and root (allgather needs equal shapes: "
                    "pad to the largest)",
                    rank(), fmt::join(calls, "; ")));
  }

  std::shared_ptr<MpiGroup> group_;
};

const char* thread_level_name(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE:
      return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED:
      return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED:
      return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE:
      return "MPI_THREAD_MULTIPLE";
    default:
      return "an unknown thread level";
  }
}

}  // namespace

// The base's default (declared in comm/communicator.h); the MPI backend overrides it.
std::shared_ptr<Communicator> Communicator::split(int /*color*/, int /*key*/) {
  throw std::runtime_error(fmt::format(
      "[rank {}] split is not implemented for the {} backend yet. HINT: split the MPI communicator and "
      "make one {} communicator per group from it (e.g. make_nccl_communicator(group, device))",
      rank(), backend_name(), backend_name()));
}

// The bases' defaults (declared in comm/communicator.h): correct for any backend, at the cost of a fresh
// output and a copy; the MPI backend overrides them.
void Communicator::allgather_into(const at::Tensor& input, at::Tensor& output) {
  const at::Tensor gathered = allgather(input);
  if (!output.sizes().equals(gathered.sizes()) || output.scalar_type() != gathered.scalar_type()) {
    throw std::runtime_error(fmt::format("[rank {}] allgather_into needs a {} output, but got {}", rank(),
                                         tensor_text(gathered), tensor_text(output)));
  }
  at::NoGradGuard no_grad;
  output.copy_(gathered);
}

void Communicator::reduce_scatter_into(const at::Tensor& input, at::Tensor& output, ReduceOp op) {
  const at::Tensor reduced = reduce_scatter(input, op);
  if (!output.sizes().equals(reduced.sizes()) || output.scalar_type() != reduced.scalar_type()) {
    throw std::runtime_error(fmt::format("[rank {}] reduce_scatter_into needs a {} output, but got {}",
                                         rank(), tensor_text(reduced), tensor_text(output)));
  }
  at::NoGradGuard no_grad;
  output.copy_(reduced);
}

// Note [Open MPI's non-blocking all-reduce algorithm]
// Every all-reduce here is an MPI_Iallreduce (Note [Collective timeouts]) in place. Open MPI 4 and 5 run it
// in coll/libnbc, whose default choice (nbc_iallreduce.c) is a binomial tree whenever the call is in place or
// the communicator has fewer than 4 ranks: the whole buffer goes up a reduction tree and back down, so rank 0
// moves 2·log2(p) full buffers, where MPI_Allreduce (coll/tuned) uses a ring or Rabenseifner and moves about
// 2(p-1)/p of one. At 16-256 MiB on 2 ranks that made our all-reduce 1.5-2x slower than MPI_Allreduce on the
// same buffers (bench/README.md, "Communication"). libnbc's ring handles in-place calls (it receives into a
// temporary) and any count, so unless the user chose an algorithm, we select it before MPI_Init reads its
// parameters. For small messages the ring's 2(p-1) rounds cost a few more latencies than the tree's
// 2·log2(p); the agreement all-reduces are 224 bytes, where that is microseconds. Other MPI libraries ignore
// the variable.
constexpr const char* kIallreduceAlgorithmVariable = "OMPI_MCA_coll_libnbc_iallreduce_algorithm";
constexpr const char* kIallreduceRing = "1";

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  VIMO_MPI_CHECK(MPI_Initialized(&initialized));
  if (initialized) return;  // someone else (a host program, a test harness) owns MPI
  // See Note [Open MPI's non-blocking all-reduce algorithm]; 0 keeps a value the user set.
  setenv(kIallreduceAlgorithmVariable, kIallreduceRing, 0);
  int provided = MPI_THREAD_SINGLE;
  VIMO_MPI_CHECK(MPI_Init_thread(argc, argv, kRequiredThreadLevel, &provided));
  if (provided < kRequiredThreadLevel) {
    MPI_Finalize();
    throw std::runtime_error(
        fmt::format("MPI provides {} but vimo needs {} (see Note [MPI thread level] in "
                    "comm/mpi_communicator.cpp). HINT: use "
                    "an MPI built with thread support, e.g. Open MPI 4 or newer",
                    thread_level_name(provided), thread_level_name(kRequiredThreadLevel)));
  }
  runtime_owns_mpi = true;
}

MpiRuntime::~MpiRuntime() {
  if (!runtime_owns_mpi) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
  runtime_owns_mpi = false;
}

std::shared_ptr<Communicator> make_mpi_communicator() { return std::make_shared<MpiCommunicator>(); }

std::string mpi_library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  int length = 0;
  VIMO_MPI_CHECK(MPI_Get_library_version(text, &length));
  // Open MPI says "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, ..." and MPICH "MPICH
  // Version:\t4.0\n...": keep the first line up to its first comma.
  std::string version(text, static_cast<size_t>(length));
  version = version.substr(0, version.find_first_of(",\n"));
  const size_t first = version.find_first_not_of(" \t\r");
  const size_t last = version.find_last_not_of(" \t\r");
  return first == std::string::npos ? std::string() : version.substr(first, last - first + 1);
}

}  // namespace vimo::comm
