// Implements the communication benchmark of bench_comm.h (`vimo bench comm`, bench/bench_comm.cpp).
//
// Note [What the communication benchmark compares]
// The question (issue 3) is what our Communicator costs over the MPI library underneath, so every size is
// run through four paths on the same float32 buffers, in the same process, one after the other:
//   ours             the blocking Communicator call: the agreement, one non-blocking all-gather of the
//                    call's signature polled with its timeout (Note [Agreeing on a collective before running
//                    it] in comm/mpi_agreement.cpp), then MPI's blocking collective on a duplicate of
//                    MPI_COMM_WORLD (Note [Blocking payloads after the agreement] in comm/mpi_internal.h);
//                    all-gather and reduce-scatter are allgather_into / reduce_scatter_into, on the same
//                    preallocated buffers as the other paths
//   ours async       the *_async call + Work::wait() on preallocated buffers: no agreement; MPI_I<collective>
//                    polled by MPI_Test (spinning for the first 20 ms unless the node is oversubscribed)
//   raw              MPI_Allreduce / MPI_Allgather / MPI_Reduce_scatter_block on MPI_COMM_WORLD: the baseline
//   raw nonblocking  MPI_I<collective> + MPI_Wait: the primitive our backend uses, progressed without pauses
// So ours vs raw is the agreement and the host work around the call (Note [The fixed cost of a blocking
// call]), ours async vs raw nonblocking is how Work::wait polls, and raw nonblocking vs raw is Open MPI's
// non-blocking (libnbc) algorithms against its blocking (tuned) ones. Each iteration runs the four paths in
// turn, each timed between MPI barriers as the slowest rank's time (an all-reduce max); a size's figure is
// the median over iterations after warm-up, and its ours/raw ratio the median over iterations of that
// iteration's ratio. Sizes follow nccl-tests: the all-reduce buffer, the all-gather output, the
// reduce-scatter input; algbw = size / time, busbw = algbw · 2(n−1)/n for all-reduce and (n−1)/n for the
// other two, so busbw is comparable across rank counts. The all-reduce buffer holds zeros, so repeated
// in-place sums neither overflow nor hit denormals.
#include "trainer/bench_comm.h"

#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <thread>
#include <vector>

#include "comm/job_store.h"
#include "comm/tcp_communicator.h"
#include "trainer/bench_comm_internal.h"
#include "trainer/bench_stats.h"

namespace vimo::trainer {

namespace comm_bench_detail {

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void check_mpi(int status, const char* call) {
  if (status != MPI_SUCCESS)
    throw std::runtime_error(fmt::format("bench comm: {} failed ({})", call, status));
}

double max_over_ranks(double value) {
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD), "MPI_Allreduce");
  return value;
}

double min_over_ranks(double value) {
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD), "MPI_Allreduce");
  return value;
}

// The sizes of the sweep: min_bytes, min_bytes · factor, ... up to max_bytes.
std::vector<int64_t> sweep_sizes(const CommBenchOptions& options) {
  std::vector<int64_t> sizes;
  for (int64_t bytes = options.min_bytes; bytes <= options.max_bytes; bytes *= options.size_factor) {
    sizes.push_back(bytes);
  }
  return sizes;
}

}  // namespace comm_bench_detail

namespace {

using namespace comm_bench_detail;
constexpr double kMiB = 1024.0 * 1024.0;
constexpr double kRatioGoal = 0.95;       // issue 3: ours >= 0.95x raw at >= kRatioGoalFromBytes
constexpr double kSecondsPerSize = 0.25;  // timed rounds of one size take about this long, at least
constexpr int kMaxIterations = 400;

constexpr CommCollective kCollectives[] = {CommCollective::Allreduce, CommCollective::Allgather,
                                           CommCollective::ReduceScatter};
constexpr CommPath kPaths[] = {CommPath::Ours, CommPath::OursAsync, CommPath::Raw, CommPath::RawNonblocking};

std::string load_average() {
  std::ifstream loadavg("/proc/loadavg");
  std::string one, five, fifteen;
  loadavg >> one >> five >> fifteen;
  return one + " " + five + " " + fifteen;
}

std::string size_text(int64_t bytes) {
  if (bytes >= (int64_t{1} << 20)) return fmt::format("{} MiB", bytes >> 20);
  return fmt::format("{} KiB", bytes >> 10);
}

// Runs the call of `path` (MPI requests, where any, are completed before returning).
void call_collective(CommPath path, CollectiveBuffers& b, comm::Communicator& comm) {
  float* full = b.full.data_ptr<float>();
  float* shard = b.shard.data_ptr<float>();
  const int full_count = static_cast<int>(b.full.numel());
  const int shard_count = static_cast<int>(b.shard.numel());
  MPI_Request request = MPI_REQUEST_NULL;
  switch (b.collective) {
    case CommCollective::Allreduce:
      switch (path) {
        case CommPath::Ours:
          comm.allreduce(b.full, comm::ReduceOp::Sum);
          return;
        case CommPath::OursAsync:
          comm.allreduce_async(b.full, comm::ReduceOp::Sum)->wait();
          return;
        case CommPath::Raw:
          check_mpi(MPI_Allreduce(MPI_IN_PLACE, full, full_count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD),
                    "MPI_Allreduce");
          return;
        case CommPath::RawNonblocking:
          check_mpi(
              MPI_Iallreduce(MPI_IN_PLACE, full, full_count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &request),
              "MPI_Iallreduce");
          break;
      }
      break;
    case CommCollective::Allgather:
      switch (path) {
        case CommPath::Ours:
          comm.allgather_into(b.shard, b.full);
          return;
        case CommPath::OursAsync:
          comm.allgather_async(b.shard, b.full)->wait();
          return;
        case CommPath::Raw:
          check_mpi(
              MPI_Allgather(shard, shard_count, MPI_FLOAT, full, shard_count, MPI_FLOAT, MPI_COMM_WORLD),
              "MPI_Allgather");
          return;
        case CommPath::RawNonblocking:
          check_mpi(MPI_Iallgather(shard, shard_count, MPI_FLOAT, full, shard_count, MPI_FLOAT,
                                   MPI_COMM_WORLD, &request),
                    "MPI_Iallgather");
          break;
      }
      break;
    case CommCollective::ReduceScatter:
      switch (path) {
        case CommPath::Ours:
          comm.reduce_scatter_into(b.full, b.shard, comm::ReduceOp::Sum);
          return;
        case CommPath::OursAsync:
          comm.reduce_scatter_async(b.full, b.shard, comm::ReduceOp::Sum)->wait();
          return;
        case CommPath::Raw:
          check_mpi(MPI_Reduce_scatter_block(full, shard, shard_count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD),
                    "MPI_Reduce_scatter_block");
          return;
        case CommPath::RawNonblocking:
          check_mpi(MPI_Ireduce_scatter_block(full, shard, shard_count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD,
                                              &request),
                    "MPI_Ireduce_scatter_block");
          break;
      }
      break;
  }
  check_mpi(MPI_Wait(&request, MPI_STATUS_IGNORE), "MPI_Wait");
}

nlohmann::json bench_collective(CommCollective collective, int64_t bytes, const CommBenchOptions& options,
                                comm::Communicator& comm) {
  CollectiveBuffers buffers(collective, bytes, comm.size());
  const double bus_factor = bus_bandwidth_factor(collective, comm.size());
  // Paths take turns per iteration, so a burst of load on the machine falls on all of them alike.
  std::vector<std::vector<double>> times(std::size(kPaths));
  size_t round = 0;
  const auto run_round = [&](bool timed) {
    for (size_t j = 0; j < std::size(kPaths); ++j) {  // every rank rotates alike: the order is the round's
      const size_t p = round_order(round, j, std::size(kPaths));
      const double seconds = time_collective(kPaths[p], buffers, comm);
      if (timed) times[p].push_back(seconds);
    }
    ++round;
  };
  double warmup_s = 0;
  for (int i = 0; i < options.warmup; ++i) {
    const Clock::time_point start = Clock::now();
    run_round(false);
    warmup_s = std::max(warmup_s, seconds_since(start));
  }
  // At least `iterations` rounds (4x below 1 MiB), and more while a size's rounds take under
  // kSecondsPerSize in all, so that the medians of fast sizes rest on enough samples to outvote the
  // scheduler's millisecond hiccups. Every rank must run the same count: take the slowest rank's estimate.
  warmup_s = max_over_ranks(warmup_s);
  int iterations = bytes < kRatioGoalFromBytes ? 4 * options.iterations : options.iterations;
  if (warmup_s > 0) {
    iterations = std::max(iterations, std::min(kMaxIterations, static_cast<int>(kSecondsPerSize / warmup_s)));
  }
  for (int i = 0; i < iterations; ++i) run_round(true);
  nlohmann::json row = {
      {"collective", collective_name(collective)}, {"bytes", bytes}, {"iterations", iterations}};
  std::vector<double> ours_times, ours_async_times, raw_times;
  for (size_t p = 0; p < std::size(kPaths); ++p) {
    const double seconds = median(times[p]);
    const double algbw = static_cast<double>(bytes) / seconds / 1e9;
    const auto [low, high] = std::minmax_element(times[p].begin(), times[p].end());
    row[path_name(kPaths[p])] = {{"time_us", seconds * 1e6},
                                 {"time_us_min", *low * 1e6},
                                 {"time_us_max", *high * 1e6},
                                 {"algbw_GBps", algbw},
                                 {"busbw_GBps", algbw * bus_factor}};
    if (kPaths[p] == CommPath::Ours) ours_times = times[p];
    if (kPaths[p] == CommPath::OursAsync) ours_async_times = times[p];
    if (kPaths[p] == CommPath::Raw) raw_times = times[p];
  }
  // Bandwidth ratios (> 1: ours is faster), paired by round (Note [Paired ratios] in trainer/bench_stats.h).
  row["ours_over_raw"] = paired_ratio(raw_times, ours_times);
  row["ours_async_over_raw"] = paired_ratio(raw_times, ours_async_times);
  return row;
}

}  // namespace

const char* collective_name(CommCollective collective) {
  switch (collective) {
    case CommCollective::Allreduce:
      return "allreduce";
    case CommCollective::Allgather:
      return "allgather";
    case CommCollective::ReduceScatter:
      return "reduce_scatter";
  }
  return "unknown";
}

const char* path_name(CommPath path) {
  switch (path) {
    case CommPath::Ours:
      return "ours";
    case CommPath::OursAsync:
      return "ours_async";
    case CommPath::Raw:
      return "raw";
    case CommPath::RawNonblocking:
      return "raw_nonblocking";
  }
  return "unknown";
}

double bus_bandwidth_factor(CommCollective collective, int ranks) {
  const double n = ranks;
  return collective == CommCollective::Allreduce ? 2.0 * (n - 1) / n : (n - 1) / n;
}

CollectiveBuffers::CollectiveBuffers(CommCollective collective_, int64_t bytes_, int ranks)
    : collective(collective_), bytes(bytes_) {
  if (bytes <= 0 || bytes % (4 * ranks) != 0) {
    throw std::invalid_argument(fmt::format(
        "bench comm: a message of {} bytes cannot be split into float32 shards for {} ranks. HINT: use a "
        "multiple of {} bytes",
        bytes, ranks, 4 * ranks));
  }
  // Touched once here, so that no path pays the first-touch page faults.
  full = at::zeros({bytes / 4});
  shard = at::zeros({bytes / 4 / ranks});
}

double time_collective(CommPath path, CollectiveBuffers& buffers, comm::Communicator& comm) {
  check_mpi(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
  const Clock::time_point start = Clock::now();
  call_collective(path, buffers, comm);
  const double seconds = seconds_since(start);
  return max_over_ranks(seconds);
}

using comm_bench_detail::bench_overlap;
using comm_bench_detail::bench_shm_allreduce;

nlohmann::json run_comm_bench(const CommBenchOptions& options,
                              const std::shared_ptr<comm::Communicator>& comm) {
  if (!comm) throw std::invalid_argument("bench comm: the communicator is null");
  if (options.size_factor < 2 || options.min_bytes <= 0 || options.max_bytes < options.min_bytes ||
      options.iterations <= 0 || options.warmup < 0) {
    throw std::invalid_argument(fmt::format(
        "bench comm: need min_bytes > 0, max_bytes >= min_bytes, size_factor >= 2, iterations > 0 and warmup "
        ">= 0; got {}, {}, {}, {}, {}",
        options.min_bytes, options.max_bytes, options.size_factor, options.iterations, options.warmup));
  }
  const bool main_rank = comm->rank() == 0;
  nlohmann::json report;
  report["ranks"] = comm->size();
  report["backend"] = comm->backend_name();
  report["mpi"] = comm::mpi_library_version();
  report["machine"] = {{"nproc", std::thread::hardware_concurrency()},
                       {"load_average_before", load_average()}};
  report["definitions"] = {
      {"size", "all-reduce buffer, all-gather output, reduce-scatter input (nccl-tests)"},
      {"time",
       "median over iterations of the slowest rank's wall-clock time, each iteration between barriers"},
      {"algbw", "size / time"},
      {"busbw", "algbw * 2(n-1)/n (all-reduce), algbw * (n-1)/n (all-gather, reduce-scatter)"},
      {"ours_over_raw", "raw time / ours time (bandwidth ratio); goal >= 0.95 at >= 1 MiB"},
  };
  report["options"] = {{"min_bytes", options.min_bytes},
                       {"max_bytes", options.max_bytes},
                       {"iterations", options.iterations},
                       {"warmup", options.warmup}};

  nlohmann::json rows = nlohmann::json::array();
  for (CommCollective collective : kCollectives) {
    for (int64_t bytes : sweep_sizes(options)) {
      rows.push_back(bench_collective(collective, bytes, options, *comm));
      if (main_rank) {
        const nlohmann::json& r = rows.back();
        fmt::print(stderr, "  {} {}: ours {:.0f} us, raw {:.0f} us\n", collective_name(collective),
                   size_text(bytes), r["ours"]["time_us"].get<double>(), r["raw"]["time_us"].get<double>());
      }
    }
  }
  report["collectives"] = rows;
  if (options.shared_memory) report["shm_allreduce"] = bench_shm_allreduce(options, *comm);

  // The goal over every row at >= 1 MiB: the worst ratio.
  double worst = 1e300;
  for (const nlohmann::json& r : rows) {
    if (r["bytes"].get<int64_t>() >= kRatioGoalFromBytes)
      worst = std::min(worst, r["ours_over_raw"].get<double>());
  }
  if (worst < 1e300)
    report["ratio_goal"] = {
        {"goal", kRatioGoal}, {"worst_at_1MiB_and_above", worst}, {"met", worst >= kRatioGoal}};

  if (options.overlap) {
    report["overlap"] = bench_overlap(options, comm, options.shared_memory);
    // Note [A shared-memory all-reduce for one host]: the same steps through MPI, the baseline.
    if (report["overlap"]["transport"].get<std::string>().rfind("shared memory", 0) == 0)
      report["overlap_mpi"] = bench_overlap(options, comm, false);
  }
  report["machine"]["load_average_after"] = load_average();

  if (main_rank && !options.out.empty()) {
    const std::filesystem::path path(options.out);
    if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
    std::ofstream file(path);
    if (!file)
      throw std::runtime_error(fmt::format("bench comm: cannot write the report to {}", options.out));
    file << report.dump(2) << "\n";
  }
  return report;
}

void print_comm_bench(const nlohmann::json& report) {
  const nlohmann::json& m = report["machine"];
  fmt::print("{} ranks, {} backend, {} | machine: {} cores, load average {} before, {} after\n",
             report["ranks"].get<int>(), report["backend"].get<std::string>(),
             report["mpi"].get<std::string>(), m["nproc"].get<unsigned>(),
             m["load_average_before"].get<std::string>(), m["load_average_after"].get<std::string>());
  fmt::print(
      "time: median of the slowest rank; busbw in GB/s; ours/raw = median over iterations of raw time / ours "
      "time\n\n");
  fmt::print("{:<15} {:>8} | {:>10} {:>10} {:>10} {:>10} | {:>8} {:>8} {:>8} | {:>8} {:>8}\n", "collective",
             "size", "ours us", "async us", "raw us", "rawnb us", "ours bw", "raw bw", "rawnb bw", "ours/raw",
             "async/raw");
  for (const nlohmann::json& r : report["collectives"]) {
    fmt::print(
        "{:<15} {:>8} | {:>10.0f} {:>10.0f} {:>10.0f} {:>10.0f} | {:>8.2f} {:>8.2f} {:>8.2f} | {:>8.2f} "
        "{:>8.2f}\n",
        r["collective"].get<std::string>(), size_text(r["bytes"].get<int64_t>()),
        r["ours"]["time_us"].get<double>(), r["ours_async"]["time_us"].get<double>(),
        r["raw"]["time_us"].get<double>(), r["raw_nonblocking"]["time_us"].get<double>(),
        r["ours"]["busbw_GBps"].get<double>(), r["raw"]["busbw_GBps"].get<double>(),
        r["raw_nonblocking"]["busbw_GBps"].get<double>(), r["ours_over_raw"].get<double>(),
        r["ours_async_over_raw"].get<double>());
  }
  if (report.contains("ratio_goal")) {
    const nlohmann::json& g = report["ratio_goal"];
    fmt::print("\nours/raw at >= 1 MiB: worst {:.2f} (goal >= {:.2f}): {}\n",
               g["worst_at_1MiB_and_above"].get<double>(), g["goal"].get<double>(),
               g["met"].get<bool>() ? "met" : "NOT met");
  }
  if (report.contains("shm_allreduce")) {
    const nlohmann::json& shm = report["shm_allreduce"];
    if (shm.contains("unavailable")) {
      fmt::print("\nshared-memory all-reduce: unavailable ({})\n", shm["unavailable"].get<std::string>());
    } else {
      fmt::print("\nshared-memory all-reduce (ShmAllreduce) vs MPI_Allreduce, float32 sum in place\n");
      fmt::print("{:>8} | {:>10} {:>10} | {:>8} {:>8} | {:>8}\n", "size", "shm us", "raw us", "shm bw",
                 "raw bw", "shm/raw");
      for (const nlohmann::json& r : shm["rows"]) {
        fmt::print("{:>8} | {:>10.0f} {:>10.0f} | {:>8.2f} {:>8.2f} | {:>8.2f}\n",
                   size_text(r["bytes"].get<int64_t>()), r["shm_time_us"].get<double>(),
                   r["raw_time_us"].get<double>(), r["shm_busbw_GBps"].get<double>(),
                   r["raw_busbw_GBps"].get<double>(), r["shm_over_raw"].get<double>());
      }
    }
  }
  for (const char* key : {"overlap", "overlap_mpi"}) {
    if (!report.contains(key)) continue;
    const nlohmann::json& o = report[key];
    fmt::print(
        "\noverlap at DP = {} through {}: {} ({} parameters, {} buckets, {} thread(s) per rank, {}, "
        "gradients "
        "{})\n"
        "  step {:.1f} ms = forward {:.1f} + backward {:.1f} + finalize {:.1f} (medians); without the "
        "reducer "
        "{:.1f} ms\n"
        "  per step: the reduction alone {:.1f} ms, exposed {:.1f} ms (first launch to done {:.1f} ms), "
        "{:.1f} "
        "of {} buckets launched in backward, {:.1f} done before finalize\n"
        "  hidden = 1 - exposed / alone: {:.1f} % (rank 0), {:.1f} % (worst rank); goal >= {:.0f} % at DP = "
        "2\n"
        "  from step times, 1 - (step - step without the reducer) / alone: {:.1f} % (rank 0), {:.1f} % "
        "(worst "
        "rank)\n"
        "  the last bucket, all-reduced only once backward is over, holds {:.1f} % of the bytes\n",
        o["dp"].get<int>(), o["transport"].get<std::string>(), o["model"].get<std::string>(),
        o["parameters"].get<int64_t>(), o["buckets"].get<int64_t>(), o["threads_per_rank"].get<int>(),
        o["transport"].get<std::string>().rfind("mpi", 0) != 0  // the progress thread is MPI's only
            ? std::string("no progress thread")
            : fmt::format("progress every {} us", o["progress_interval_us"].get<int>()),
        o.value("gradients", std::string("copied")), o["step_ms"].get<double>(),
        o["forward_ms"].get<double>(), o["backward_ms"].get<double>(), o["finalize_ms"].get<double>(),
        o["compute_only_step_ms"].get<double>(), o["isolated_reduction_ms"].get<double>(),
        o["exposed_ms_per_step"].get<double>(), o["span_ms_per_step"].get<double>(),
        o["buckets_launched_in_backward_per_step"].get<double>(), o["buckets"].get<int64_t>(),
        o["buckets_done_before_finalize_per_step"].get<double>(), 100 * o["hidden_fraction"].get<double>(),
        100 * o["hidden_fraction_min_over_ranks"].get<double>(), 100 * o["goal"].get<double>(),
        100 * o["hidden_by_step_time"].get<double>(),
        100 * o["hidden_by_step_time_min_over_ranks"].get<double>(),
        100 * o.value("last_bucket_share_of_bytes", 0.0));
  }
}

CommBenchCommand::CommBenchCommand(CLI::App& command) {
  options_.out = "runs/bench/comm.json";
  command.add_option("--out", options_.out, "JSON report (written by rank 0)")->capture_default_str();
  command.add_option("--max-mib", max_mib_, "Largest message in MiB (sizes run from 4 KiB in powers of 4)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command.add_option("--iters", options_.iterations, "Timed iterations per size (x4 below 1 MiB)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command
      .add_option("--overlap-steps", options_.overlap_steps,
                  "Timed training steps of the overlap measurement")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command.add_option("--overlap-width", options_.overlap_width, "Width of the overlap measurement's MLP")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command
      .add_option("--overlap-depth", options_.overlap_depth,
                  "Linear layers of the overlap measurement's MLP (the first layer's weight gradient, "
                  "which backward makes last, is 1/depth of the bytes)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command.add_option("--overlap-batch", options_.overlap_batch, "Rows per rank in the overlap measurement")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command
      .add_option("--bucket-mib", options_.bucket_mib,
                  "GradientReducer bucket size of the overlap measurement (its first bucket: 1 MiB)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  command
      .add_option("--progress-us", options_.progress_interval_us,
                  "Interval of the reducer's MPI progress thread in the overlap measurement (0: no thread)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  command.add_flag("!--no-overlap", options_.overlap, "Skip the overlap measurement");
  command.add_flag(
      "!--grad-copy", options_.gradient_as_bucket_view,
      "Overlap measurement with gradients copied into their buckets and back, not views of them");
  command
      .add_option("--backend", backend_,
                  "Our communicator: mpi, or tcp (the TCP backend over the same ranks)")
      ->capture_default_str()
      ->check(CLI::IsMember({"mpi", "tcp"}));
  command.add_flag("!--no-shm", options_.shared_memory,
                   "Overlap measurement through MPI only (by default it runs through the shared-memory "
                   "all-reduce when every rank is on this host, then through MPI as the baseline)");
}

int CommBenchCommand::run() const {
  CommBenchOptions options = options_;
  options.max_bytes = static_cast<int64_t>(max_mib_ * kMiB);
  std::shared_ptr<comm::Communicator> comm = comm::make_mpi_communicator();
  // The TCP backend's ranks meet through a store formed over MPI, which only launched them; the store lives
  // until the end, since rank 0 must not close it while the others still read it.
  std::unique_ptr<comm::JobStore> store;
  std::unique_ptr<comm::StoreClient> client;
  if (backend_ == "tcp") {
    store = comm::start_job_store(*comm);
    client = comm::connect_job_store(*store, comm->rank());
    comm = comm::make_tcp_communicator(*client, "bench/tcp", comm->rank(), comm->size(), store->token);
  }
  const nlohmann::json report = run_comm_bench(options, comm);
  if (comm->rank() == 0) {
    print_comm_bench(report);
    if (!options.out.empty()) fmt::print("\nwrote {}\n", options.out);
  }
  return 0;
}

}  // namespace vimo::trainer
