// A tiny "training loop" for the e2e watchdog tests (tests/e2e/watchdog_*.sh): under mpirun, forms the job
// store, starts a Watchdog, and does small allreduces until told time is up, so that a script can SIGKILL or
// SIGSTOP one rank mid-run and check how the others end.
//   watchdog_driver DIR TIMEOUT_S INTERVAL_S RUN_S
// Each rank writes its pid to DIR/rank<R>.pid and prints "rank R step S" every 10 steps.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "comm/communicator.h"
#include "comm/job_store.h"
#include "comm/watchdog.h"

int main(int argc, char** argv) {
  using namespace vimo::comm;
  using namespace std::chrono;
  MpiRuntime mpi(&argc, &argv);
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s DIR TIMEOUT_S INTERVAL_S RUN_S\n", argv[0]);
    return 2;
  }
  at::set_num_threads(1);
  const auto to_ms = [](const char* s) { return milliseconds(static_cast<int64_t>(std::stod(s) * 1000)); };
  const std::string dir = argv[1];
  const milliseconds timeout = to_ms(argv[2]), interval = to_ms(argv[3]), run_for = to_ms(argv[4]);

  std::shared_ptr<Communicator> world = make_mpi_communicator();
  world->set_timeout(milliseconds(300000));  // the watchdog, not the communicator, is under test
  const WorldInfo info = world_from_environment();
  std::unique_ptr<JobStore> store = start_job_store(*world);
  std::ofstream(dir + "/rank" + std::to_string(world->rank()) + ".pid") << getpid() << "\n";

  WatchdogOptions options;
  options.rank = world->rank();
  options.world_size = world->size();
  options.host = info.host;
  options.store_host = store->host;
  options.store_port = store->port;
  options.token = store->token;
  options.heartbeat_interval = interval;
  options.timeout = timeout;
  options.collective_timeout = 3 * timeout;  // survivors wait in an allreduce: the missing peer is the news
  Watchdog watchdog(options);

  at::Tensor t = at::ones({1024}, at::kFloat);  // 4 KiB
  const auto start = steady_clock::now();
  for (int64_t step = 1; steady_clock::now() - start < run_for; ++step) {
    watchdog.enter_collective("allreduce", t.numel() * 4);
    world->allreduce(t, ReduceOp::Avg);
    watchdog.leave_collective();
    if (step % 10 == 0) {
      std::printf("rank %d step %lld\n", world->rank(), static_cast<long long>(step));
      std::fflush(stdout);
    }
    std::this_thread::sleep_for(milliseconds(20));
  }
  watchdog.stop();
  world->barrier();  // rank 0's store outlives every rank's last heartbeat
  std::printf("rank %d done\n", world->rank());
  return 0;
}
