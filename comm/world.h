// Defines make_world_communicator(): the communicator over every rank the launcher started, whichever
// launcher that was. Under mpirun (or srun with an MPI built for Slurm) it is MPI's world; under torchrun, or
// srun without PMI, where MPI sees each process alone, the ranks meet through the rendezvous store and talk
// over TCP (comm/tcp_communicator.h).
#pragma once

#include <memory>
#include <string>

#include "comm/communicator.h"

namespace vimo::comm {

struct World {
  std::shared_ptr<Communicator> comm;
  // How it was formed, for the run's log: "MPI" or "TCP (torchrun started the ranks; MPI sees each alone)".
  std::string how;
};

// A collective over every rank the launcher started; needs MpiRuntime. Without MPI as the launcher it needs
// the rendezvous address (MASTER_ADDR and MASTER_PORT or VIMO_RENDEZVOUS_PORT; under Slurm the first host of
// the job) and VIMO_RENDEZVOUS_TOKEN, and rank 0 serves the store there until every rank has joined. Throws
// std::runtime_error saying what is missing, or which ranks never joined within the collective timeout.
World make_world_communicator();

}  // namespace vimo::comm
