// Defines the communication benchmark behind `vimo bench comm` and bench/bench_comm.cpp: all-reduce (sum),
// all-gather and reduce-scatter of float32 buffers through our Communicator against the raw MPI calls on the
// same buffers in the same run, with nccl-tests' algorithm and bus bandwidth; and the share of gradient
// reduction that GradientReducer hides behind backward in a data-parallel training step. See Note [What the
// communication benchmark compares] in bench_comm.cpp.
#pragma once

#include <ATen/ATen.h>

#include <CLI/CLI.hpp>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "comm/communicator.h"

namespace vimo::trainer {

struct CommBenchOptions {
  int64_t min_bytes = int64_t{4} << 10;    // 4 KiB
  int64_t max_bytes = int64_t{256} << 20;  // 256 MiB; sizes grow by `size_factor` from min_bytes
  int size_factor = 4;
  int iterations = 10;  // timed iterations per size at least (x4 below 1 MiB; more for fast sizes)
  int warmup = 2;
  bool overlap = true;                  // also run the training-step overlap measurement
  int overlap_steps = 5;                // timed training steps (after one warm-up step)
  int64_t overlap_width = 1024;         // MLP width: depth layers of width² + width parameters
  int64_t overlap_depth = 16;           // linear layers (16.8 M parameters at 16 x 1024)
  int64_t overlap_batch = 64;           // rows per rank
  double bucket_mib = 25.0;             // GradientReducer bucket sizes
  double first_bucket_mib = 1.0;        //
  int progress_interval_us = 100;       // ReducerOptions::progress_interval_us (0: no progress thread)
  bool shared_memory = true;            // ReducerOptions::shared_memory (then also once through MPI)
  bool gradient_as_bucket_view = true;  // ReducerOptions::gradient_as_bucket_view
  int threads = 1;  // LibTorch intra-op threads per rank during the overlap steps; 0: keep
  std::string out;  // JSON report path (written by rank 0); empty: none
};

enum class CommCollective { Allreduce, Allgather, ReduceScatter };

// How a collective is called. Ours: the blocking Communicator call (it agrees on the call first and, for
// allgather / reduce_scatter, allocates its output). OursAsync: the *_async call + Work::wait() on
// preallocated buffers (no agreement). Raw: the blocking MPI call on MPI_COMM_WORLD (the baseline).
// RawNonblocking: the MPI_I* call + MPI_Wait (the MPI primitive our backend is built on).
enum class CommPath { Ours, OursAsync, Raw, RawNonblocking };

const char* collective_name(CommCollective collective);
const char* path_name(CommPath path);

// nccl-tests' bus-bandwidth factor: 2(n-1)/n for all-reduce, (n-1)/n for all-gather and reduce-scatter.
double bus_bandwidth_factor(CommCollective collective, int ranks);

// The float32 buffers of one collective at one message size `bytes` (nccl-tests' "size": the all-reduce
// buffer, the all-gather output, the reduce-scatter input), shared by every path. `bytes` must be a multiple
// of 4 * ranks.
struct CollectiveBuffers {
  CollectiveBuffers(CommCollective collective, int64_t bytes, int ranks);
  CommCollective collective;
  int64_t bytes;
  at::Tensor full;   // [bytes / 4]: all-reduce buffer (in place), all-gather output, reduce-scatter input
  at::Tensor shard;  // [bytes / 4 / ranks]: all-gather input, reduce-scatter output
};

// Runs one call of `collective` by `path` on every rank (a collective: every rank calls it with the same
// arguments) between barriers and returns the slowest rank's wall-clock seconds.
double time_collective(CommPath path, CollectiveBuffers& buffers, comm::Communicator& comm);

// Runs the sweep (and the overlap measurement when options.overlap) on every rank and returns the report on
// every rank: per collective and size, the median of the per-iteration times (each the slowest rank's) for
// every path, algbw = bytes / time, busbw = algbw * bus_bandwidth_factor, and raw / ours time (the bandwidth
// ratio, goal >= 0.95 at >= 1 MiB). Rank 0 writes it to options.out when set.
nlohmann::json run_comm_bench(const CommBenchOptions& options,
                              const std::shared_ptr<comm::Communicator>& comm);

// Prints the report as tables on stdout (call on rank 0).
void print_comm_bench(const nlohmann::json& report);

// The command line of `vimo bench comm` and bench/comm_report_main.cpp: --out, --max-mib, --iters,
// --overlap-steps, --overlap-width/-depth/-batch, --bucket-mib, --progress-us, --no-overlap, --grad-copy,
// --no-shm, --backend, added to `command`. Not movable: CLI11 holds pointers to its members.
class CommBenchCommand {
 public:
  explicit CommBenchCommand(CLI::App& command);
  CommBenchCommand(const CommBenchCommand&) = delete;
  CommBenchCommand& operator=(const CommBenchCommand&) = delete;
  // After parsing, with MpiRuntime alive: runs run_comm_bench on make_mpi_communicator() (every rank), or
  // with --backend tcp on the TCP backend over the same ranks (the raw rows stay MPI's), rank 0 prints the
  // tables and writes the report. Returns the exit code.
  int run() const;

 private:
  CommBenchOptions options_;
  double max_mib_ = 256;
  std::string backend_ = "mpi";
};

}  // namespace vimo::trainer
