// Defines vimo::comm::Communicator, the collective-communication interface every backend implements, Work,
// the handle of an asynchronous collective, the collective timeout, the world description read from the
// launcher's environment, and the MPI backend factory.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <memory>
#include <string>

namespace vimo::comm {

enum class ReduceOp { Sum, Avg, Max, Min };

// Where this process sits in the job, as the launcher described it.
struct WorldInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  // Ranks on this host; local_rank + 1 when the launcher does not say (Note [World from the launcher] in
  // communicator.cpp).
  int local_size = 1;
  std::string launcher = "none";  // "openmpi", "torchrun", "slurm" or "none" (single process)
  std::string host;               // this process's host name
};

// Reads the launcher's variables (comm/launcher_env.h: OpenMPI's OMPI_COMM_WORLD_*, torchrun's RANK /
// WORLD_SIZE / LOCAL_RANK, Slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID); a single process when none
// is set. Throws std::runtime_error naming the variable when a value is malformed or out of range.
WorldInfo world_from_environment();

// The timeout every communicator starts with: VIMO_COMM_TIMEOUT_S seconds (a positive number, fractions
// allowed) when set, else 600 s. Read once; an override is logged to stderr. Throws std::runtime_error naming
// the variable when its value is malformed. See Note [Collective timeouts] in comm/mpi_internal.h.
std::chrono::milliseconds default_collective_timeout();

// A collective in flight, returned by the *_async calls of Communicator. The tensors passed to the call
// belong to the collective until wait() returns or is_completed() returns true: reading or writing them
// before is undefined. Use a Work from one thread at a time. Dropping an unfinished Work waits for it.
class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the collective has finished and its results are in the tensors passed to the call. Throws
  // std::runtime_error after the communicator's timeout (naming the collective, its size and the rank), after
  // which the communicator is unusable. Returns at once when already finished.
  virtual void wait() = 0;
  // Whether the collective has finished (its results are then in place). Never blocks; on MPI, each call also
  // drives the collective forward (see Note [Progress of non-blocking MPI collectives] in
  // comm/mpi_work.cpp).
  virtual bool is_completed() = 0;
  // "allreduce (avg) of float32 [1024]": the call, for logs and errors.
  virtual std::string description() const = 0;
};

// Collectives over a fixed group of ranks, which every rank of the group must make in the same order
// (asynchronous ones included, in the order they are started). Blocking calls return when their result is in
// place (on NCCL: when it is enqueued on the stream); they and Work::wait fail after timeout() instead of
// hanging. Tensors need not be contiguous unless stated; results keep the input's dtype and device.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend_name() const = 0;

  // In place: every rank ends with the reduction of all ranks' `tensor`.
  virtual void allreduce(at::Tensor& tensor, ReduceOp op) = 0;
  // Returns [size * n, ...]: rank r's `tensor` [n, ...] at rows [r*n, (r+1)*n). Same shape on every rank.
  virtual at::Tensor allgather(const at::Tensor& tensor) = 0;
  // `input` [size * n, ...] -> [n, ...]: rank r gets the reduction over all ranks of their rows
  // [r*n, (r+1)*n). The inverse of allgather's layout; dim 0 must be divisible by size().
  virtual at::Tensor reduce_scatter(const at::Tensor& input, ReduceOp op) = 0;
  // In place: every rank ends with `root`'s tensor.
  virtual void broadcast(at::Tensor& tensor, int root) = 0;
  virtual void barrier() = 0;

  // Point to point, blocking: send returns when `tensor` may be changed again, recv when `tensor` holds the
  // message of rank `src` with the same `tag` (>= 0), which must have recv's shape and dtype. Messages
  // between two ranks with the same tag arrive in the order sent. A ring where every rank sends first may
  // deadlock on large tensors: alternate the order (even ranks send first, odd ranks receive first).
  virtual void send(const at::Tensor& tensor, int dst, int tag) = 0;
  virtual void recv(at::Tensor& tensor, int src, int tag) = 0;

  // Asynchronous calls: the same results as the blocking calls, in the tensors given, once the returned
  // Work has finished. Several may be in flight at once. They check their own inputs (throwing on this rank
  // only) but do not make the ranks agree on the call first: see Note [Agreement on asynchronous calls] in
  // comm/mpi_agreement.cpp.
  //   allreduce_async:      `tensor` in place.
  //   allgather_async:      `input` [n, ...] -> `output` [size * n, ...], contiguous, same dtype and device.
  //   reduce_scatter_async: `input` [size * n, ...] -> `output` [n, ...], contiguous, same dtype and device.
  virtual std::shared_ptr<Work> allreduce_async(at::Tensor& tensor, ReduceOp op) = 0;
  virtual std::shared_ptr<Work> allgather_async(const at::Tensor& input, at::Tensor& output) = 0;
  virtual std::shared_ptr<Work> reduce_scatter_async(const at::Tensor& input, at::Tensor& output,
                                                     ReduceOp op) = 0;
  //   broadcast_async:      `tensor` in place, as broadcast.
  //   barrier_async:        finished once every rank has started its barrier.
  //   send_async:           `tensor` must not change until the Work has finished.
  //   recv_async:           `tensor` holds the message once the Work has finished. On MPI and TCP a message
  //   of
  //                         another size fails its wait, naming both sizes, and a receive that times out
  //                         leaves the communicator usable; NCCL cannot tell (sizes must match, as for its
  //                         blocking recv). Receives of one (src, tag) match messages in the order started.
  // Note [Ordering of asynchronous point-to-point calls]: on MPI, a send started after a receive may complete
  // first, so two ranks may each start a receive and then send to each other. The TCP backend runs a
  // communicator's calls one after another on its worker thread, and NCCL runs the asynchronous ones in order
  // on the communicator's side stream, as its own ncclSend / ncclRecv do outside a group: there the same pair
  // of receives would wait for each other until the timeout. Code meant for every backend starts its sends
  // first on one side (as with the blocking calls: even ranks send first, odd ranks receive first). NCCL has
  // no tags: messages between two ranks arrive in the order sent, whatever the tag.
  virtual std::shared_ptr<Work> broadcast_async(at::Tensor& tensor, int root) = 0;
  virtual std::shared_ptr<Work> barrier_async() = 0;
  virtual std::shared_ptr<Work> send_async(const at::Tensor& tensor, int dst, int tag) = 0;
  virtual std::shared_ptr<Work> recv_async(at::Tensor& tensor, int src, int tag) = 0;

  // Blocking all-gather / reduce-scatter into the caller's `output` (the shapes of the *_async calls), with
  // the blocking calls' agreement. Use these where the same collective runs every step: allgather() and
  // reduce_scatter() return a fresh tensor, and the first touch of a fresh multi-MiB buffer costs page faults
  // that can take longer than the collective itself (bench/README.md, "Communication"). The defaults call the
  // allocating version and copy; the MPI backend overrides them.
  virtual void allgather_into(const at::Tensor& input, at::Tensor& output);
  virtual void reduce_scatter_into(const at::Tensor& input, at::Tensor& output, ReduceOp op);

  // A collective over this communicator (every rank calls it): returns a communicator over the ranks that
  // passed the same `color` (>= 0), ranked by `key`, ties broken by the rank here (MPI_Comm_split's rules).
  // The result is independent of this one, may outlive it, and starts with this one's timeout. A negative
  // color fails on every rank. The default throws: backends that can split override it.
  virtual std::shared_ptr<Communicator> split(int color, int key);

  // How long a blocking call or Work::wait waits for the other ranks before failing; a Work started before
  // a change keeps the timeout it started with. Must be positive.
  std::chrono::milliseconds timeout() const { return timeout_; }
  void set_timeout(std::chrono::milliseconds timeout);

 private:
  std::chrono::milliseconds timeout_ = default_collective_timeout();
};

// Observes every blocking wait on a collective (comm::Watchdog reports a rank stuck in one, and names the
// last collective in its messages). Process-wide, set by the trainer; the backends call it around waits.
// `name` is a string literal ("allreduce"); calls come from the thread that waits, and must be cheap.
class CollectiveObserver {
 public:
  virtual ~CollectiveObserver() = default;
  virtual void enter_collective(const char* name, int64_t bytes) = 0;
  virtual void leave_collective() = 0;
};
// nullptr removes it. The observer must outlive every wait that may call it (unset before destroying it).
void set_collective_observer(CollectiveObserver* observer);
CollectiveObserver* collective_observer();

// RAII owner of MPI_Init / MPI_Finalize. Create exactly one, first thing in main().
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
};

// Communicator over (a private duplicate of) MPI_COMM_WORLD for CPU tensors (float32, float64, bfloat16,
// float16, int32, int64, uint8). Every rank must call it: duplicating is a collective.
std::shared_ptr<Communicator> make_mpi_communicator();

// "Open MPI v4.1.4" style string of the MPI library linked in.
std::string mpi_library_version();

// All-gather usable inside autograd: forward = allgather along dim 0; backward = reduce_scatter (sum) of the
// gathered gradient: the rows that belong to this rank, summed over all ranks (each rank's loss used every
// rank's rows).
at::Tensor all_gather_with_grad(const at::Tensor& tensor, const std::shared_ptr<Communicator>& comm);

namespace detail {
// "sum", "avg", "max" or "min": the op as every backend's descriptions and errors name it.
const char* reduce_op_name(ReduceOp op);

// The one format of a failed library call in every backend, e.g.
//   "[rank 1] MPI_Allreduce failed at comm/mpi_communicator.cpp:88: <reason>. HINT: <hint>"
// `call` may be the whole call expression (only the function name is kept); `file` is __FILE__ (shortened to
// the path from the repository root); the hint is left out when empty.
std::string describe_failed_call(int rank, const char* call, const char* file, int line,
                                 const std::string& reason, const std::string& hint);

// Whether asynchronous calls make the ranks agree on the call first, like blocking ones:
// VIMO_COMM_CHECK_ASYNC=1 (a debugging aid that costs a blocking round trip per call; see Note [Agreement on
// asynchronous calls]). Read once; an override is logged to stderr.
bool check_async_calls();

// The one wording of a timed-out call in every backend, e.g. "[rank 0] allreduce (sum) of float32 [4] (16
// bytes) timed out after 1 s on a communicator of 2 ranks: ... <consequence>. HINT: ...". `what` describes
// the call; `consequence` says what became of the communicator.
std::string describe_timeout(int rank, const std::string& what, int64_t bytes,
                             std::chrono::milliseconds timeout, int communicator_size,
                             const std::string& consequence);
}  // namespace detail

}  // namespace vimo::comm
