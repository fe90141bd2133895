// Defines the data loader benchmark behind `vimo bench data` and bench/bench_data.cpp: a synthetic retrieval
// dataset written to a temporary directory, one timed pass per way of reading it (raw sequential read() of
// the shard files as the baseline, the StreamingLoader, and the stages in between), and the JSON report.
// See Note [What the data benchmark compares] in bench_data.cpp.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "data/shard.h"

namespace vimo::trainer {

struct DataBenchOptions {
  int64_t records = 4096;     // training records in the dataset
  int64_t frames = 16;        // F: with feature_dim 256 a record is ~20 KB (frames 16 KiB + keypoints 3 KiB)
  int64_t feature_dim = 256;  // Dv
  int64_t records_per_shard = 1024;
  int64_t batch = 64;                 // loader global batch (one rank)
  std::vector<int> workers = {0, 2};  // loader worker threads, one row each
  int repetitions = 5;      // rounds, one timed pass per row each; the report gives the median and range
  bool stages = true;       // also time the stages between raw read and loader (where the time goes)
  bool later_epoch = true;  // also time each loader row's second epoch, every read and first_read verified
  std::string out;          // JSON report path; empty: none
};

// A synthetic retrieval dataset in a fresh temporary directory, removed by the destructor.
class BenchDataset {
 public:
  BenchDataset(const DataBenchOptions& options, bool zstd);
  ~BenchDataset();
  BenchDataset(const BenchDataset&) = delete;
  BenchDataset& operator=(const BenchDataset&) = delete;
  const std::string& dir() const { return dir_; }
  const std::vector<std::string>& shard_paths() const { return shard_paths_; }  // train split, in order
  int64_t records() const { return records_; }
  uint64_t bytes() const { return bytes_; }  // size of the train split's shard files

 private:
  std::string dir_;
  std::vector<std::string> shard_paths_;
  int64_t records_ = 0;
  uint64_t bytes_ = 0;
};

// One timed pass over a whole dataset.
struct PassResult {
  int64_t records = 0;
  uint64_t bytes = 0;  // shard-file bytes covered by the pass
  double seconds = 0;
};

// Reads every shard file start to end with read() into a 1 MiB buffer, no parsing: the baseline.
PassResult raw_read_pass(const BenchDataset& dataset);
// One epoch of a fresh StreamingLoader (read + verify + decode + collate) with `workers` threads. With
// `warm_epoch`, the loader first reads one epoch untimed and the pass times its second epoch: the steady
// state of training, whose loader keeps its shards mapped from epoch to epoch (Note [What the data
// benchmark compares]).
// `verify` is LoaderOptions::verify (Note [Verifying a mapped record once] in data/shard_reader.cpp).
PassResult loader_pass(const BenchDataset& dataset, int workers, int64_t batch, bool warm_epoch = false,
                       data::Verification verify = data::Verification::EveryRead);

// Writes the plain and zstd datasets, times every row `repetitions` times (files in page cache), and returns
// the report: rows with records/s and MB/s (median, min, max), the ratio of records/s to raw read()'s (paired
// per round), the options and the machine (nproc, CPU model, load average). Writes it to options.out when
// set.
nlohmann::json run_data_bench(const DataBenchOptions& options);
// Prints the report as a table on stdout.
void print_data_bench(const nlohmann::json& report);

// The `vimo bench` subcommand with `vimo bench data`; registered like trainer::DataCommands.
class BenchCommands {
 public:
  explicit BenchCommands(CLI::App& app);  // adds `bench` (and its subcommands) to the top-level app
  ~BenchCommands();
  // Runs the bench subcommand that was parsed and returns its exit code; nothing when none was chosen.
  std::optional<int> run() const;

 private:
  struct Options;
  std::unique_ptr<Options> options_;
};

}  // namespace vimo::trainer
