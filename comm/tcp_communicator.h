// Defines make_tcp_communicator(): the TCP backend of vimo::comm::Communicator, CPU collectives over direct
// TCP connections between the ranks, for jobs that MPI did not launch (torchrun, or srun without an MPI built
// for Slurm). The ranks find each other through the job's rendezvous store (comm/store.h).
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/store.h"

namespace vimo::comm {

// Forms a communicator over `size` ranks that meet in `store` under `key` (used once per job; every rank
// passes the same key and token). A collective: each rank calls it with its own `rank`. Each rank listens on
// an ephemeral TCP port, publishes where (host name, address, port) under the key, connects to every lower
// rank and accepts every higher one; each connection must present `token`, and one that does not is logged
// and closed. The result moves CPU tensors of the MPI backend's dtypes, with the same calls, agreement,
// timeouts and errors (backend_name() "tcp"; Note [A TCP communicator] in comm/tcp_communicator.cpp). Throws
// std::runtime_error after `timeout` naming the ranks that never published or connected.
std::shared_ptr<Communicator> make_tcp_communicator(
    StoreClient& store, const std::string& key, int rank, int size, const std::string& token,
    std::chrono::milliseconds timeout = default_collective_timeout());

}  // namespace vimo::comm
