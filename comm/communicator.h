// Defines vimo::comm::Communicator, the collective-communication interface every backend implements,
// the world description read from the launcher's environment, and the MPI backend factory.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>

namespace vimo::comm {

enum class ReduceOp { Sum, Avg, Max, Min };

// Where this process sits in the job, as the launcher described it.
struct WorldInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_size = 1;
  std::string launcher = "none";  // "openmpi" or "none" (single process)
  std::string host;               // this process's host name
};

// Reads OpenMPI's OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}; a single process when absent.
// Throws std::runtime_error naming the variable when a value is malformed or out of range.
WorldInfo world_from_environment();

// Collectives over a fixed group of ranks. All calls are blocking and must be made by every rank of the
// group in the same order. Tensors must be contiguous; results keep the input's dtype and device.
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
  // In place: every rank ends with `root`'s tensor.
  virtual void broadcast(at::Tensor& tensor, int root) = 0;
  virtual void barrier() = 0;

  // A collective over this communicator (every rank calls it): returns a communicator over the ranks that
  // passed the same `color` (>= 0), ranked by `key`, ties broken by the rank here (MPI_Comm_split's rules).
  // The result is independent of this one and may outlive it. A negative color fails on every rank. The
  // default throws: backends that can split override it.
  virtual std::shared_ptr<Communicator> split(int color, int key);
};

// RAII owner of MPI_Init / MPI_Finalize. Create exactly one, first thing in main().
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
};

// Communicator over MPI_COMM_WORLD for CPU tensors (float32, float64, bfloat16, float16, int32, int64,
// uint8).
std::shared_ptr<Communicator> make_mpi_communicator();

// "Open MPI v4.1.4" style string of the MPI library linked in.
std::string mpi_library_version();

// All-gather usable inside autograd: forward = allgather along dim 0; backward = the gradient rows that
// belong to this rank, summed over all ranks (each rank's loss used every rank's rows).
at::Tensor all_gather_with_grad(const at::Tensor& tensor, const std::shared_ptr<Communicator>& comm);

namespace detail {
// The one format of a failed library call in every backend, e.g.
//   "[rank 1] MPI_Allreduce failed at comm/mpi_communicator.cpp:88: <reason>. HINT: <hint>"
// `call` may be the whole call expression (only the function name is kept); `file` is __FILE__ (shortened to
// the path from the repository root); the hint is left out when empty.
std::string describe_failed_call(int rank, const char* call, const char* file, int line,
                                 const std::string& reason, const std::string& hint);
}  // namespace detail

}  // namespace vimo::comm
