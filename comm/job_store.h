// Defines vimo::comm::JobStore and start_job_store(): the job's rendezvous store (comm/store.h), formed under
// mpirun through the MPI communicator, or from the launcher's environment when MPI is not the launcher.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/launcher_env.h"
#include "comm/store.h"

namespace vimo::comm {

// Where the job's store listens, and rank 0's server (null on the other ranks). Destroying rank 0's JobStore
// stops the server: keep it alive while any rank may still use the store.
struct JobStore {
  std::unique_ptr<StoreServer> server;
  std::string host;  // as this rank should connect: "127.0.0.1" when it shares rank 0's host
  uint16_t port = 0;
  std::string token;
};

// Under mpirun: rank 0 starts a StoreServer on an ephemeral port and broadcasts its host name, port and token
// over `world` (a collective: every rank calls it). An empty `token` makes rank 0 draw a random one.
std::unique_ptr<JobStore> start_job_store(Communicator& world, const std::string& token = "");

// Without MPI (torchrun, srun): rank 0 listens on the rendezvous port of `env`, which every rank reads from
// its environment along with VIMO_RENDEZVOUS_TOKEN. Throws std::runtime_error when either is missing.
std::unique_ptr<JobStore> start_job_store(const LaunchEnvironment& env);

}  // namespace vimo::comm
