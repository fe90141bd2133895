// `vimo bench comm` as a standalone program (the same trainer::CommBenchCommand), for runs under mpirun:
// rank 0 prints the tables and writes the JSON report.
//
//   mpirun --oversubscribe --bind-to none -np 2 build/bench/bench_comm_report --out runs/bench/comm_np2.json
#include <CLI/CLI.hpp>

#include "comm/communicator.h"
#include "trainer/bench_comm.h"

int main(int argc, char** argv) {
  CLI::App app{"Collectives through vimo's Communicator against raw MPI, and the gradient-reduction overlap"};
  const vimo::trainer::CommBenchCommand command(app);
  CLI11_PARSE(app, argc, argv);
  vimo::comm::MpiRuntime mpi(&argc, &argv);
  return command.run();
}
