// Progress line and metrics.jsonl (see metrics.h).
#include "trainer/metrics.h"

#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

namespace vimo::trainer {

std::string format_duration(double seconds) {
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}h{:02d}m{:02d}s", s / 3600, (s / 60) % 60, s % 60);
  if (s >= 60) return fmt::format("{:02d}m{:02d}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

ProgressLog::ProgressLog(const std::string& jsonl_path, int64_t first_step, int64_t total_steps, bool is_main)
    : is_main_(is_main),
      first_step_(first_step),
      total_steps_(total_steps),
      start_(std::chrono::steady_clock::now()) {
  if (is_main_ && !jsonl_path.empty()) {
    std::filesystem::create_directories(std::filesystem::path(jsonl_path).parent_path());
    keep_records_up_to(jsonl_path, first_step);
    jsonl_.open(jsonl_path, std::ios::app);
  }
}

// A run that resumes from step S continues the log after S: records of later steps (a run that went on past
// the checkpoint it resumes from, then died) would repeat those steps, and a cut last line would stay. A
// fresh run (S = 0) starts a new log. Rewritten through a temporary file and a rename.
void ProgressLog::keep_records_up_to(const std::string& jsonl_path, int64_t step) {
  if (!std::filesystem::exists(jsonl_path)) return;
  std::ifstream in(jsonl_path);
  std::string kept, line;
  while (std::getline(in, line)) {
    const nlohmann::json record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (step > 0 && record.is_object() && record.contains("step") && record["step"].is_number_integer() &&
        record["step"].get<int64_t>() <= step) {
      kept += line + "\n";
    }
  }
  const std::string temporary = jsonl_path + ".tmp";
  std::ofstream(temporary, std::ios::trunc) << kept;
  std::filesystem::rename(temporary, jsonl_path);
}

namespace {
// A number of metrics.jsonl: %.17g, so that losses round-trip exactly and two runs' logs compare bit for bit;
// null when not finite, which JSON has no number for (a "-nan" made the line unreadable, and a resumed run
// dropped it).
std::string json_number(double value) {
  return std::isfinite(value) ? fmt::format("{:.17g}", value) : "null";
}
}  // namespace

void ProgressLog::record(const StepMetrics& m, bool print) {
  if (!is_main_) return;
  window_seconds_ += m.step_seconds;
  window_data_seconds_ += m.data_seconds;
  window_samples_ += m.samples;
  window_steps_ += 1;
  if (jsonl_.is_open()) {
    jsonl_ << fmt::format(
        "{{\"step\": {}, \"loss\": {}, \"lr\": {}, \"grad_norm\": {}, \"step_seconds\": "
        "{:.6f}, "
        "\"data_seconds\": {:.6f}, \"batch_hash\": \"{}\", \"corrupt_skipped\": {}}}\n",
        m.step, json_number(m.loss), json_number(m.lr), json_number(m.grad_norm), m.step_seconds,
        m.data_seconds, m.batch_hash, m.corrupt_skipped);
    jsonl_.flush();
  }
  if (!print) return;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double per_step = elapsed / static_cast<double>(m.step - first_step_);
  const double eta = per_step * static_cast<double>(total_steps_ - m.step);
  std::printf(
      "step %5lld/%lld | loss %.4f | lr %.2e | grad_norm %.3f | %.1f samples/s | data wait %.1f%% | ETA %s\n",
      static_cast<long long>(m.step), static_cast<long long>(total_steps_), m.loss, m.lr, m.grad_norm,
      window_samples_ / window_seconds_, 100.0 * window_data_seconds_ / window_seconds_,
      format_duration(eta).c_str());
  std::fflush(stdout);
  window_seconds_ = window_data_seconds_ = 0;
  window_samples_ = window_steps_ = 0;
}

void ProgressLog::record_json(const std::string& json_object) {
  if (is_main_ && jsonl_.is_open()) {
    jsonl_ << json_object << "\n";
    jsonl_.flush();
  }
}

}  // namespace vimo::trainer
