// Google Benchmark of the collectives under mpirun: all-reduce (sum), all-gather and reduce-scatter of
// float32 buffers from 4 KiB to 64 MiB, through our Communicator (blocking and async) against the raw MPI
// calls on the same buffers (trainer/bench_comm.h; Note [What the communication benchmark compares] in
// trainer/bench_comm.cpp). Every rank runs every benchmark in lockstep; each iteration's time is the slowest
// rank's (manual time), iteration counts are fixed per size so that no rank's own clock can change how many
// collectives it makes, and only rank 0 reports. Counters algbw_GB and busbw_GB are rates (GB/s; nccl-tests'
// definitions).
//
//   mpirun --oversubscribe --bind-to none -np 2 build/bench/bench_comm --benchmark_repetitions=3
#include "trainer/bench_comm.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <memory>

#include "comm/communicator.h"

namespace {

using vimo::trainer::CollectiveBuffers;
using vimo::trainer::CommCollective;
using vimo::trainer::CommPath;

constexpr int64_t kMinBytes = int64_t{4} << 10, kMaxBytes = int64_t{64} << 20;

std::shared_ptr<vimo::comm::Communicator>& world() {
  static std::shared_ptr<vimo::comm::Communicator> comm;
  return comm;
}

void BM_Collective(benchmark::State& state, CommCollective collective, CommPath path) {
  const int64_t bytes = state.range(0);
  CollectiveBuffers buffers(collective, bytes, world()->size());
  for (auto _ : state) state.SetIterationTime(vimo::trainer::time_collective(path, buffers, *world()));
  const double moved = static_cast<double>(bytes) * static_cast<double>(state.iterations());
  state.counters["algbw_GB"] = benchmark::Counter(moved / 1e9, benchmark::Counter::kIsRate);
  state.counters["busbw_GB"] =
      benchmark::Counter(moved / 1e9 * vimo::trainer::bus_bandwidth_factor(collective, world()->size()),
                         benchmark::Counter::kIsRate);
}

// Fixed iteration counts (the same on every rank): ~64 MiB of traffic per size, at least 5 and at most 200.
void register_all() {
  for (CommCollective collective :
       {CommCollective::Allreduce, CommCollective::Allgather, CommCollective::ReduceScatter}) {
    for (CommPath path : {CommPath::Ours, CommPath::OursAsync, CommPath::Raw, CommPath::RawNonblocking}) {
      for (int64_t bytes = kMinBytes; bytes <= kMaxBytes; bytes *= 4) {
        const int64_t iterations = std::clamp<int64_t>(kMaxBytes / bytes, 5, 200);
        const std::string name =
            std::string(vimo::trainer::collective_name(collective)) + "/" + vimo::trainer::path_name(path);
        benchmark::RegisterBenchmark(name.c_str(), BM_Collective, collective, path)
            ->Arg(bytes)
            ->Iterations(iterations)
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
    }
  }
}

// Non-zero ranks run the same benchmarks but print nothing.
class SilentReporter final : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  vimo::comm::MpiRuntime mpi(&argc, &argv);
  world() = vimo::comm::make_mpi_communicator();
  benchmark::Initialize(&argc, argv);
  register_all();
  if (world()->rank() == 0) {
    std::printf("bench_comm: %d ranks, %s\n", world()->size(), vimo::comm::mpi_library_version().c_str());
    benchmark::RunSpecifiedBenchmarks();
  } else {
    SilentReporter silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  world().reset();
  return 0;
}
