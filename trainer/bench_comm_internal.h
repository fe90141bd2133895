// Internal to the communication benchmark (trainer/bench_comm.cpp, trainer/bench_comm_reducer.cpp): the
// helpers both files use and the two gradient-reduction measurements of bench_comm_reducer.cpp.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "comm/communicator.h"
#include "trainer/bench_comm.h"

namespace vimo::trainer::comm_bench_detail {

using Clock = std::chrono::steady_clock;
constexpr int64_t kRatioGoalFromBytes = 1 << 20;  // issue 3's ratio goal holds from 1 MiB up

double seconds_since(Clock::time_point start);
void check_mpi(int status, const char* call);  // throws naming `call` unless status is MPI_SUCCESS
double max_over_ranks(double value);           // over MPI_COMM_WORLD
double min_over_ranks(double value);
std::vector<int64_t> sweep_sizes(const CommBenchOptions& options);

// Note [What the overlap measurement reports] (bench_comm_reducer.cpp): data-parallel training steps of an
// MLP with GradientReducer, through shared memory or through MPI.
nlohmann::json bench_overlap(const CommBenchOptions& options, const std::shared_ptr<comm::Communicator>& comm,
                             bool shared_memory);
// ShmAllreduce against MPI_Allreduce at every size of the sweep, or {"unavailable": why}.
nlohmann::json bench_shm_allreduce(const CommBenchOptions& options, comm::Communicator& comm);

}  // namespace vimo::trainer::comm_bench_detail
