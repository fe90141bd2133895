// Data loader throughput: one epoch of the StreamingLoader (read + verify + decode + collate, batch 64,
// block-shuffled order) with 0 and 2 worker threads, fresh (`epoch:1`) and the second epoch of a loader that
// has read one already, its shards mapped (`epoch:2`; BM_LoaderFirstRead: the same with data.verify =
// first_read), against the baseline of reading the same shard files sequentially with read() into a 1 MiB
// buffer (no parsing). The synthetic retrieval dataset (4096 records of ~20 KB: F = 16 frames of Dv = 256
// features, plus keypoints) is written once per process into a temporary directory, plain and zstd, and read
// once before timing so every file is in the page cache.
//   build/bench/bench_data --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//   build/bench/bench_data --report=runs/bench/data.json     (the `vimo bench data` table and JSON)
// Counters: records_per_s and MB_per_s (shard-file bytes; the same bytes for both, so their loader / raw
// ratios are equal). The passes themselves live in trainer/bench_data.cpp, shared with `vimo bench data`.
#include "trainer/bench_data.h"

#include <benchmark/benchmark.h>

#include <memory>
#include <string>

namespace {

using vimo::trainer::BenchDataset;
using vimo::trainer::DataBenchOptions;
using vimo::trainer::PassResult;

constexpr int64_t kBatch = 64;

// The dataset of this process (plain or zstd), written on first use and removed at exit.
const BenchDataset& dataset(bool zstd) {
  static std::unique_ptr<BenchDataset> datasets[2];
  std::unique_ptr<BenchDataset>& slot = datasets[zstd ? 1 : 0];
  if (!slot) {
    slot = std::make_unique<BenchDataset>(DataBenchOptions{}, zstd);
    (void)vimo::trainer::raw_read_pass(*slot);  // page cache warm
  }
  return *slot;
}

void report(benchmark::State& state, int64_t records, double bytes) {
  state.counters["records_per_s"] =
      benchmark::Counter(static_cast<double>(records), benchmark::Counter::kIsRate);
  state.counters["MB_per_s"] = benchmark::Counter(bytes / 1e6, benchmark::Counter::kIsRate);
}

void BM_RawRead(benchmark::State& state) {
  const BenchDataset& data = dataset(state.range(0) != 0);
  int64_t records = 0;
  double bytes = 0;
  for (auto _ : state) {
    const PassResult pass = vimo::trainer::raw_read_pass(data);
    records += pass.records;
    bytes += static_cast<double>(pass.bytes);
  }
  report(state, records, bytes);
}

void BM_Loader(benchmark::State& state) {
  const BenchDataset& data = dataset(state.range(0) != 0);
  const auto workers = static_cast<int>(state.range(1));
  const bool second_epoch = state.range(2) == 2;
  int64_t records = 0;
  double bytes = 0;
  for (auto _ : state) {
    // Manual time: loader_pass's own window, which for epoch 2 leaves out the untimed first epoch. (Before
    // the epoch argument this benchmark used real time, which also counted the loader's destruction.)
    const PassResult pass = vimo::trainer::loader_pass(data, workers, kBatch, second_epoch);
    state.SetIterationTime(pass.seconds);
    records += pass.records;
    bytes += static_cast<double>(pass.bytes);
  }
  report(state, records, bytes);
}

BENCHMARK(BM_RawRead)->ArgName("zstd")->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Loader)
    ->ArgNames({"zstd", "workers", "epoch"})
    ->ArgsProduct({{0, 1}, {0, 2}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseManualTime();

// The second epoch with data.verify = first_read (Note [Verifying a mapped record once]).
void BM_LoaderFirstRead(benchmark::State& state) {
  const BenchDataset& data = dataset(state.range(0) != 0);
  const auto workers = static_cast<int>(state.range(1));
  int64_t records = 0;
  double bytes = 0;
  for (auto _ : state) {
    const PassResult pass =
        vimo::trainer::loader_pass(data, workers, kBatch, true, vimo::data::Verification::FirstRead);
    state.SetIterationTime(pass.seconds);
    records += pass.records;
    bytes += static_cast<double>(pass.bytes);
  }
  report(state, records, bytes);
}

BENCHMARK(BM_LoaderFirstRead)
    ->ArgNames({"zstd", "workers"})
    ->ArgsProduct({{0, 1}, {0, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseManualTime();

}  // namespace

// `--report=FILE` runs the report of `vimo bench data` instead (table on stdout, JSON to FILE): every row,
// with the stages between raw read and loader, the same way.
int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--report=", 0) == 0) {
      DataBenchOptions options;
      options.out = arg.substr(9);
      vimo::trainer::print_data_bench(vimo::trainer::run_data_bench(options));
      return 0;
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
