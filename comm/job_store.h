// Defines vimo::comm::JobStore and start_job_store(): the job's rendezvous store (comm/store.h), formed under
// mpirun through the MPI communicator, or from the launcher's environment when MPI is not the launcher; the
// client that connects a rank to it; and exchange_unique_id(), how a communicator's unique id (NCCL's)
// travels through it.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
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

// A client of `store` for rank `rank` (barriers need it), retrying the connection until `connect_timeout`
// passes: under torchrun or srun the ranks start in any order, so rank 0's server may not listen yet.
std::unique_ptr<StoreClient> connect_job_store(
    const JobStore& store, int rank,
    std::chrono::milliseconds connect_timeout = default_collective_timeout());

// Gives every rank rank 0's `id` (e.g. the 128 bytes of an ncclUniqueId) under the store key `key`, after
// every rank learned whether all of them prepared; see Note [Unique id through the store] in job_store.cpp.
// A collective over the `world_size` ranks: each calls it with its own rank, through a client made with that
// rank, the same `key` and the same id size. `problem` is this rank's failure to prepare (empty when it is
// ready). On rank 0 `id` is read; on the others it is overwritten with rank 0's bytes. Throws
// std::runtime_error on every rank when any rank reported a problem (a rank with one throws it, the others
// name the first rank that failed and its error), when a rank does not arrive within `timeout` (naming the
// missing ranks), or when `key` was used before in this job (each communicator needs a key of its own; rank
// 0 catches the reuse, but the others may then see the store close before they read its error).
void exchange_unique_id(StoreClient& store, const std::string& key, int rank, int world_size,
                        std::span<uint8_t> id, const std::string& problem, std::chrono::milliseconds timeout);

// Rank 0 serves the store, so its exit ends every request still in flight: before it exits (or destroys
// its JobStore), rank 0 calls this and waits until every other rank called it with the same `name` (a name
// used once in the job), failing after `timeout` naming the keys of the ranks missing. The other ranks return
// at once: after this call they must make no more requests.
void leave_job_store(StoreClient& store, const std::string& name, int rank, int world_size,
                     std::chrono::milliseconds timeout);

}  // namespace vimo::comm
