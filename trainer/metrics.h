// Defines the per-step training metrics, the progress line printed by rank 0 (step, loss, lr, samples/s,
// data-wait share, ETA) and the metrics.jsonl file every run appends to.
#pragma once

#include <chrono>
#include <cstdint>
#include <fstream>
#include <string>

namespace vimo::trainer {

struct StepMetrics {
  int64_t step = 0;
  double loss = 0;  // mean over the global batch
  double lr = 0;
  double grad_norm = 0;         // before clipping
  double step_seconds = 0;      // wall time of the whole step
  double data_seconds = 0;      // of which waiting for the batch
  int64_t samples = 0;          // global batch size
  std::string batch_hash;       // xxh3 of the global batch's sample keys (equal runs read equal batches)
  int64_t corrupt_skipped = 0;  // records skipped as corrupt so far (all ranks)
};

class ProgressLog {
 public:
  // Only `is_main` prints and writes. `jsonl_path` (created with its directory) keeps the records up to
  // `first_step`, the step a resumed run continues from (none for a fresh run), and is appended to.
  ProgressLog(const std::string& jsonl_path, int64_t first_step, int64_t total_steps, bool is_main);
  // Records every step; prints a line when `print` is true (log_every, first and last steps).
  void record(const StepMetrics& metrics, bool print);
  // Appends an arbitrary JSON object line (evaluation results, events).
  void record_json(const std::string& json_object);

 private:
  static void keep_records_up_to(const std::string& jsonl_path, int64_t step);
  bool is_main_;
  int64_t first_step_, total_steps_;
  std::ofstream jsonl_;
  std::chrono::steady_clock::time_point start_;
  double window_seconds_ = 0, window_data_seconds_ = 0;
  int64_t window_samples_ = 0, window_steps_ = 0;
};

// "1h02m03s" / "02m03s" / "3s".
std::string format_duration(double seconds);

}  // namespace vimo::trainer
