// Defines make_world_communicator() (comm/world.h).
#include "comm/world.h"

#include <fmt/format.h>

#include <stdexcept>

#include "comm/job_store.h"
#include "comm/launcher_env.h"
#include "comm/tcp_communicator.h"

namespace vimo::comm {

World make_world_communicator() {
  std::shared_ptr<Communicator> mpi = make_mpi_communicator();
  const LaunchEnvironment launch = launch_environment();
  if (launch.world_size == mpi->size()) return World{mpi, "MPI"};
  if (mpi->size() != 1) {
    throw std::runtime_error(
        fmt::format("the launcher ({}) started {} ranks, but MPI sees {}. HINT: launch with mpirun alone, or "
                    "with a launcher "
                    "that MPI does not see (torchrun, srun without --mpi)",
                    launch.launcher, launch.world_size, mpi->size()));
  }
  std::unique_ptr<JobStore> store = start_job_store(launch);
  std::unique_ptr<StoreClient> client = connect_job_store(*store, launch.rank);
  std::shared_ptr<Communicator> tcp =
      make_tcp_communicator(*client, "vimo/world", launch.rank, launch.world_size, store->token);
  // Once every rank is inside this barrier, each has read every address it needed: rank 0 may close the
  // store (it goes with `store`), and nothing else of the job uses it.
  tcp->barrier();
  return World{tcp, fmt::format("TCP ({} started the ranks; MPI sees each alone)", launch.launcher)};
}

}  // namespace vimo::comm
