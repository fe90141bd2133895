// Defines vimo::comm::LaunchEnvironment and launch_environment(): where this process sits in the job (rank,
// world size, local rank and size) and where the rendezvous store listens, read from the environment that
// OpenMPI's mpirun, torchrun or Slurm's srun set; and the parser of Slurm's compressed host lists.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace vimo::comm {

// Every environment variable the launcher bootstrap reads, in one place (see DESIGN.md, "Communication").
namespace launcher_env {
// OpenMPI (mpirun).
constexpr const char* kOpenMpiRank = "OMPI_COMM_WORLD_RANK";
constexpr const char* kOpenMpiSize = "OMPI_COMM_WORLD_SIZE";
constexpr const char* kOpenMpiLocalRank = "OMPI_COMM_WORLD_LOCAL_RANK";
constexpr const char* kOpenMpiLocalSize = "OMPI_COMM_WORLD_LOCAL_SIZE";
// torchrun, and anything else that follows PyTorch's env:// convention.
constexpr const char* kTorchRank = "RANK";
constexpr const char* kTorchWorldSize = "WORLD_SIZE";
constexpr const char* kTorchLocalRank = "LOCAL_RANK";
constexpr const char* kTorchLocalWorldSize = "LOCAL_WORLD_SIZE";
constexpr const char* kMasterAddr = "MASTER_ADDR";
constexpr const char* kMasterPort = "MASTER_PORT";
// Slurm (srun).
constexpr const char* kSlurmProcId = "SLURM_PROCID";
constexpr const char* kSlurmNtasks = "SLURM_NTASKS";
constexpr const char* kSlurmLocalId = "SLURM_LOCALID";
constexpr const char* kSlurmNodeId = "SLURM_NODEID";
constexpr const char* kSlurmNtasksPerNode = "SLURM_NTASKS_PER_NODE";
constexpr const char* kSlurmTasksPerNode = "SLURM_TASKS_PER_NODE";
constexpr const char* kSlurmStepTasksPerNode = "SLURM_STEP_TASKS_PER_NODE";
constexpr const char* kSlurmStepNodeList = "SLURM_STEP_NODELIST";
constexpr const char* kSlurmStepNumTasks = "SLURM_STEP_NUM_TASKS";
constexpr const char* kSlurmJobNodeList = "SLURM_JOB_NODELIST";
constexpr const char* kSlurmJobId = "SLURM_JOB_ID";
constexpr const char* kSlurmStepId = "SLURM_STEP_ID";  // read by Open MPI, not by us: Note [srun without PMI]
// The rank a PMI server gives each process: srun's with --mpi=pmix or --mpi=pmi2, and mpirun's (PMIx).
constexpr const char* kPmixRank = "PMIX_RANK";
constexpr const char* kPmiRank = "PMI_RANK";
// vimo's own.
constexpr const char* kRendezvousPort = "VIMO_RENDEZVOUS_PORT";    // overrides MASTER_PORT and the default
constexpr const char* kRendezvousToken = "VIMO_RENDEZVOUS_TOKEN";  // per-job secret every store peer presents
}  // namespace launcher_env

// Under Slurm without VIMO_RENDEZVOUS_PORT or MASTER_PORT the store listens on
// kDefaultRendezvousPortBase + SLURM_JOB_ID % kDefaultRendezvousPortSpan, so that two jobs whose first node
// is the same rarely pick the same port; without a job id, on kDefaultRendezvousPortBase.
constexpr uint16_t kDefaultRendezvousPortBase = 29600;
constexpr uint16_t kDefaultRendezvousPortSpan = 1000;

struct RendezvousEndpoint {
  std::string host;
  uint16_t port = 0;
};

struct LaunchEnvironment {
  std::string launcher = "none";  // "openmpi", "torchrun", "slurm" or "none" (a single process)
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::optional<int> local_size = 1;             // unknown when the launcher does not say
  std::optional<RendezvousEndpoint> rendezvous;  // where rank 0's store listens; none under OpenMPI or alone
  std::optional<std::string> rendezvous_token;   // VIMO_RENDEZVOUS_TOKEN when set
};

// Returns the value of an environment variable, or nullptr when it is unset.
using EnvironmentLookup = std::function<const char*(const char*)>;

// Reads the launcher's variables through `lookup` (std::getenv by default); see Note [Launcher precedence].
// Throws std::runtime_error naming the variable, its value and what was expected when a value is malformed,
// out of range or missing from an otherwise present launcher's set.
LaunchEnvironment launch_environment(const EnvironmentLookup& lookup);
LaunchEnvironment launch_environment();

// Whether srun started this process without a PMI server, where Open MPI 4's MPI_Init fails unless
// SLURM_STEP_ID is unset first (MpiRuntime does): Note [srun without PMI] in comm/launcher_env.cpp.
bool srun_started_without_pmi(const EnvironmentLookup& lookup);

// Every host of a Slurm host list, in order, e.g. "gpu[01-03,07],login1" → gpu01 gpu02 gpu03 gpu07 login1.
// Several bracket groups in one name expand as a product, the last group fastest ("r[1-2]n[1-2]" → r1n1 r1n2
// r2n1 r2n2). Numbers keep the width of the range's lower bound ("[08-10]" → 08 09 10; "[9-11]" → 9 10 11).
// Throws std::invalid_argument saying what is wrong and where, or that the list names over `max_hosts`.
std::vector<std::string> expand_slurm_host_list(std::string_view list, std::size_t max_hosts = 1 << 20);

// The first host of a Slurm host list, after checking the whole list as expand_slurm_host_list does.
std::string first_slurm_host(std::string_view list);

}  // namespace vimo::comm
