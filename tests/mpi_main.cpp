// gtest main for multi-rank tests run under mpirun: initializes MPI, fixes LibTorch's thread count, and
// makes the process exit non-zero when any rank failed (so mpirun, and ctest, report the failure).
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include "comm/communicator.h"

int main(int argc, char** argv) {
  vimo::comm::MpiRuntime mpi(&argc, &argv);
  at::set_num_threads(1);
  testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    // Only rank 0 prints the full report; the others print failures only (via the default printer's
    // failure lines being kept would interleave; a failing rank still sets the exit code below).
    delete testing::UnitTest::GetInstance()->listeners().Release(
        testing::UnitTest::GetInstance()->listeners().default_result_printer());
  }
  int local_failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any_failed = 0;
  MPI_Allreduce(&local_failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (local_failed) std::fprintf(stderr, "[rank %d] tests FAILED on this rank\n", rank);
  return any_failed;
}
