// Defines MpiRuntime, the owner of MPI_Init_thread / MPI_Finalize (with the thread level and the Open MPI
// parameters and environment it sets first), mpi_library_version, and the Communicator base class's defaults
// that backends may override (split, allgather_into, reduce_scatter_into).
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <mpi.h>

#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>

#include "comm/communicator.h"
#include "comm/launcher_env.h"
#include "comm/mpi_internal.h"

namespace vimo::comm {
namespace {

using mpi_detail::tensor_text;

// Note [MPI thread level]
// We ask for MPI_THREAD_SERIALIZED: any thread may call MPI, one call at a time. The Communicator contract
// (every rank issues the same collectives in the same order) already rules out concurrent calls, but not
// calls from other threads: autograd runs backward functions such as all_gather_with_grad's all-reduce on its
// own worker threads for some devices, and helpers may run on background threads (the gradient reducer's
// progress thread). FUNNELED (main thread only) would make those undefined behaviour. vimo_comm keeps its own
// calls one at a time with a mutex (Note [One MPI call at a time] in mpi_internal.h), which is cheaper than
// MULTIPLE's locking inside every MPI call.
constexpr int kRequiredThreadLevel = MPI_THREAD_SERIALIZED;

// Set when MpiRuntime called MPI_Init_thread, so that only it calls MPI_Finalize.
bool runtime_owns_mpi = false;

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
  // Note [srun without PMI] in comm/launcher_env.cpp: else Open MPI 4 aborts a process srun started alone.
  if (srun_started_without_pmi([](const char* name) { return std::getenv(name); })) {
    unsetenv(launcher_env::kSlurmStepId);
  }
  int provided = MPI_THREAD_SINGLE;
  VIMO_MPI_CHECK(MPI_Init_thread(argc, argv, kRequiredThreadLevel, &provided));
  if (provided < kRequiredThreadLevel) {
    MPI_Finalize();
    throw std::runtime_error(
        fmt::format("MPI provides {} but vimo needs {} (see Note [MPI thread level] in "
                    "comm/mpi_runtime.cpp). HINT: use "
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
