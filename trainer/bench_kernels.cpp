// `vimo bench kernels`: the fused losses against their eager compositions (see bench_kernels.h).
//
// Note [What the kernel benchmark measures]
// One row = one loss at one size; each implementation runs forward + backward once as a warm-up, then
// `repetitions` rounds in which each runs once, on the same leaves, gradients cleared between runs. Ratios
// are paired (Note [Paired ratios] in trainer/bench_stats.h). Time: the median wall-clock time and the median
// process CPU time (all threads; on a shared machine CPU time is the steadier figure, wall time the one that
// matters on an idle one). Memory: LibTorch's CPU allocator is wrapped by a counting allocator
// (c10::SetCPUAllocator) that tracks live tensor bytes; `peak_MiB` is the high-water mark during one forward
// + backward above what was live before it, gradients of the leaves included, allocations that bypass c10
// (BLAS workspaces, std::vector) excluded. The same method as bench/bench_dpo.cpp. Blocks allocated before
// the counter was installed are freed through their own allocator and never counted. The McDPO floor: the
// three LM-head products (X·Wᵀ, G·W, Gᵀ·X) on the answer tokens only, the minimum any implementation must
// compute; the fused kernel visits answer tokens only, eager every position. The contrastive eager baseline
// is the plain composition, S computed once (Note [The eager baseline computes S once] in
// kernels/contrastive_loss.cpp), with the two-product composition as a reference row beside it.
//
// On CUDA (`--device cuda`) the same rows run on the GPU: each step is bracketed by device synchronizes, its
// time is wall time (process CPU time there is the host waiting) and its peak is the high-water mark of
// LibTorch's CUDA caching allocator (allocated bytes, not reserved) above what was allocated before it.
// cuBLAS workspaces are allocated through that allocator on first use, so the warm-up run takes them out of
// the counts. Ratios and goals then use wall time.
//
// Note [CPU time with more than one thread]
// LibTorch's OpenMP (libgomp) workers spin for a while after each parallel region before they sleep, and
// that spinning is process CPU time: on the 2-core machine with 2 threads it added up to 174 % to the
// contrastive rows' CPU time, unevenly between fused and eager, so that it moved their ratio (measured in
// bench/README.md, "(2026-11-25) The eager baseline computed S twice"). Runs with more than one thread are
// therefore taken with OMP_WAIT_POLICY=passive (workers sleep at once; bench/README.md gives the commands),
// and the report records the policy in effect (machine.omp_wait_policy, "unset" = libgomp's spinning
// default) so that a CPU time is never read without it. Wall time, also reported, has no such term.
#include "trainer/bench_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#if defined(VIMO_HAVE_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include "kernels/cuda/cuda_probe.h"
#endif
#include <fmt/format.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "bench/counting_allocator.h"
#include "kernels/contrastive_loss.h"
#include "kernels/fused_contrastive.h"
#include "kernels/fused_linear_dpo.h"
#include "trainer/bench_stats.h"

namespace vimo::trainer {
namespace {

constexpr double kMiB = 1024.0 * 1024.0;
// Issue 4's goals.
constexpr double kDpoSpeedupGoal = 1.5, kDpoMemoryGoal = 3.0, kDpoFloorGoal = 1.3,
                 kContrastiveSpeedupGoal = 2.0;

using bench::counting_allocator;

double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// One implementation of a row: `step` runs one forward + backward, `reset` clears gradients after it.
struct Contender {
  std::function<void()> step;
  std::function<void()> reset;
};

// Where the rows run, and how a step's end and its memory are observed there (Note [What the kernel
// benchmark measures]).
class BenchDevice {
 public:
  explicit BenchDevice(const std::string& name) : device_(parse(name)) {}

  const at::Device& device() const { return device_; }
  // The time the ratios and goals use: process CPU time on CPU, wall time on CUDA.
  std::string time_key() const { return device_.is_cuda() ? "wall_ms" : "cpu_ms"; }

  // Returns once the device has finished all work queued so far (a no-op on CPU).
  void synchronize() const {
#if defined(VIMO_HAVE_CUDA)
    if (device_.is_cuda()) c10::cuda::device_synchronize();
#endif
  }
  int64_t live_bytes() const {
#if defined(VIMO_HAVE_CUDA)
    if (device_.is_cuda()) return allocated().current;
#endif
    return counting_allocator().live();
  }
  void reset_peak() const {
#if defined(VIMO_HAVE_CUDA)
    if (device_.is_cuda()) return c10::cuda::CUDACachingAllocator::resetPeakStats(device_.index());
#endif
    counting_allocator().reset_peak();
  }
  int64_t peak_bytes() const {
#if defined(VIMO_HAVE_CUDA)
    if (device_.is_cuda()) return allocated().peak;
#endif
    return counting_allocator().peak();
  }
  std::string describe() const {
#if defined(VIMO_HAVE_CUDA)
    if (device_.is_cuda()) return vimo::kernels::describe_cuda_devices();
#endif
    return "cpu";
  }

 private:
  static at::Device parse(const std::string& name) {
    if (name == "cpu") return at::Device(at::kCPU);
    if (name != "cuda" && name.rfind("cuda:", 0) != 0) {
      throw std::invalid_argument("bench kernels: --device must be cpu, cuda or cuda:K, got '" + name + "'");
    }
#if defined(VIMO_HAVE_CUDA)
    at::Device device(name);
    if (!device.has_index()) device.set_index(0);
    const int64_t visible = at::globalContext().hasCUDA() ? c10::cuda::device_count() : 0;
    if (device.index() >= visible) {
      throw std::invalid_argument("bench kernels: --device " + name + " but " + std::to_string(visible) +
                                  " CUDA device(s) are visible (" + vimo::kernels::describe_cuda_devices() +
                                  ")");
    }
    return device;
#else
    throw std::invalid_argument("bench kernels: --device " + name +
                                " but vimo was built without CUDA; HINT: configure with -DVIMO_CUDA=ON on a "
                                "machine with nvcc and a CUDA LibTorch");
#endif
  }
#if defined(VIMO_HAVE_CUDA)
  c10::CachingAllocator::Stat allocated() const {
    return c10::cuda::CUDACachingAllocator::getDeviceStats(device_.index())
        .allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
  }
#endif

  at::Device device_;
};

std::string time_words(const BenchDevice& device) {
  return device.time_key() == "wall_ms" ? "wall time" : "CPU time";
}

// Runs each contender once untimed, then `repetitions` rounds in which every contender runs once (Note
// [Paired ratios] in trainer/bench_stats.h). Returns per contender {"wall_ms", "cpu_ms" (medians), "peak_MiB"
// (largest), "cpu_ms_runs", "wall_ms_runs" (each round's, in round order)}.
std::vector<nlohmann::json> measure_side_by_side(const BenchDevice& device, int repetitions,
                                                 const std::vector<Contender>& contenders) {
  for (const Contender& c : contenders) {
    c.step();
    c.reset();
  }
  device.synchronize();
  const size_t k = contenders.size();
  std::vector<std::vector<double>> wall(k, std::vector<double>(repetitions)), cpu = wall;
  std::vector<int64_t> peak(k, 0);
  for (int r = 0; r < repetitions; ++r) {
    for (size_t j = 0; j < k; ++j) {
      const size_t i = round_order(static_cast<size_t>(r), j, k);
      const int64_t before = device.live_bytes();
      device.reset_peak();
      const double cpu_start = process_cpu_seconds();
      const auto start = std::chrono::steady_clock::now();
      contenders[i].step();
      device.synchronize();
      wall[i][r] =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      cpu[i][r] = 1e3 * (process_cpu_seconds() - cpu_start);
      peak[i] = std::max(peak[i], device.peak_bytes() - before);
      contenders[i].reset();
    }
  }
  std::vector<nlohmann::json> results;
  for (size_t i = 0; i < k; ++i) {
    results.push_back({{"wall_ms", median(wall[i])},
                       {"cpu_ms", median(cpu[i])},
                       {"peak_MiB", static_cast<double>(peak[i]) / kMiB},
                       {"wall_ms_runs", wall[i]},
                       {"cpu_ms_runs", cpu[i]}});
  }
  return results;
}

// paired_ratio of two contenders' `key` ("cpu_ms" or "wall_ms") times.
double paired_times_ratio(const nlohmann::json& numerator, const nlohmann::json& denominator,
                          const std::string& key) {
  return paired_ratio(numerator[key + "_runs"].get<std::vector<double>>(),
                      denominator[key + "_runs"].get<std::vector<double>>());
}

double ratio(const nlohmann::json& numerator, const nlohmann::json& denominator, const char* key) {
  const double d = denominator[key].get<double>();
  return d > 0 ? numerator[key].get<double>() / d : 0.0;
}

nlohmann::json mcdpo_row(const KernelBenchOptions& o, const BenchDevice& bench_device, int64_t V) {
  at::manual_seed(0);
  const int64_t R = 2 * o.dpo_pairs, T = o.dpo_positions, H = o.dpo_hidden;
  const int64_t prompt = std::clamp<int64_t>(o.dpo_prompt, 0, T - 1);
  // Drawn on the CPU, so both devices see the same inputs.
  const at::Device& device = bench_device.device();
  at::Tensor hidden = at::randn({R, T, H}).to(device).requires_grad_();  // [2B, T, H]
  at::Tensor weight =
      (at::randn({V, H}) / std::sqrt(static_cast<double>(H))).to(device).requires_grad_();  // [V, H]
  const at::Tensor targets = at::randint(0, V, {R, T}, at::kLong).to(device);               // [2B, T]
  const at::Tensor mask = (at::arange(T) >= prompt).unsqueeze(0).expand({R, T}).contiguous().to(device);
  const at::Tensor reference = (-9.0 * static_cast<double>(T - prompt) + at::randn({R})).to(device);  // [2B]
  const auto reset = [&] {
    hidden.mutable_grad().reset();
    weight.mutable_grad().reset();
  };
  const vimo::kernels::LmHeadChunking chunking{o.dpo_chunk_tokens, 0};
  const int64_t answer_tokens = R * (T - prompt);
  const at::Tensor x = hidden.detach().narrow(1, prompt, T - prompt).reshape({answer_tokens, H});  // [N, H]
  const at::Tensor w = weight.detach();                                                            // [V, H]
  // Eager on the answer positions only: the same composition on the rows' answer span (every row's answer
  // here is positions prompt..T-1), so it makes [N, V] logits instead of [2B, T, V]. A reference row: the
  // goals are judged against the eager composition of the whole sequence, as a trainer without the kernel
  // runs it (TRL-style), which the kernel's "never materializes [2B, T, V]" is measured against.
  const auto answers_only = [&] {
    return vimo::kernels::eager_mcdpo(hidden.narrow(1, prompt, T - prompt), weight,
                                      targets.narrow(1, prompt, T - prompt),
                                      mask.narrow(1, prompt, T - prompt), reference);
  };
  {
    at::NoGradGuard no_grad;
    const double whole =
        vimo::kernels::eager_mcdpo(hidden, weight, targets, mask, reference).loss.item<double>();
    const double answers = answers_only().loss.item<double>();
    if (std::abs(whole - answers) > 1e-4 * std::max(1.0, std::abs(whole))) {
      throw std::runtime_error(
          fmt::format("McDPO eager on the answer positions gives loss {}, on the whole "
                      "sequence {}: the benchmark's contenders disagree",
                      answers, whole));
    }
  }
  const std::vector<nlohmann::json> measured = measure_side_by_side(
      bench_device, o.repetitions,
      {{[&] {
          vimo::kernels::fused_linear_mcdpo(hidden, weight, targets, mask, reference, {}, chunking)
              .loss.backward();
        },
        reset},
       {[&] { vimo::kernels::eager_mcdpo(hidden, weight, targets, mask, reference).loss.backward(); }, reset},
       {[&] {
          const at::Tensor logits =
              at::mm(x, w.t());  // [N, V]; stands in for the logit gradient of that shape
          const at::Tensor grad_x = at::mm(logits, w);      // [N, H]
          const at::Tensor grad_w = at::mm(logits.t(), x);  // [V, H]
        },
        [] {}},
       {[&] { answers_only().loss.backward(); }, reset}});
  const nlohmann::json &fused = measured[0], &eager = measured[1], &products = measured[2],
                       &eager_answers = measured[3];
  nlohmann::json row = {{"loss", "mcdpo"},
                        {"shape", {{"B", o.dpo_pairs}, {"T", T}, {"H", H}, {"V", V}, {"prompt", prompt}}},
                        {"answer_tokens", answer_tokens},
                        {"fused", fused},
                        {"eager", eager},
                        {"bare_products", products},
                        {"eager_answer_positions", eager_answers}};
  const std::string time = bench_device.time_key(), time_name = time_words(bench_device);
  const double speedup = paired_times_ratio(eager, fused, time), memory = ratio(eager, fused, "peak_MiB"),
               floor = paired_times_ratio(fused, products, time);
  row["eager_over_fused_cpu_time"] = paired_times_ratio(eager, fused, "cpu_ms");
  row["eager_over_fused_wall_time"] = paired_times_ratio(eager, fused, "wall_ms");
  row["eager_over_fused_memory"] = memory;
  row["eager_answer_positions_over_fused_cpu_time"] = paired_times_ratio(eager_answers, fused, "cpu_ms");
  row["eager_answer_positions_over_fused_wall_time"] = paired_times_ratio(eager_answers, fused, "wall_ms");
  row["eager_answer_positions_over_fused_memory"] = ratio(eager_answers, fused, "peak_MiB");
  row["fused_over_products_cpu_time"] = paired_times_ratio(fused, products, "cpu_ms");
  row["fused_over_products_wall_time"] = paired_times_ratio(fused, products, "wall_ms");
  row["goals"] = {
      {{"goal", "≥ 1.5× faster than eager (" + time_name + ")"},
       {"value", speedup},
       {"met", speedup >= kDpoSpeedupGoal}},
      {{"goal", "≥ 3× less peak memory than eager"}, {"value", memory}, {"met", memory >= kDpoMemoryGoal}},
      {{"goal", "within 1.3× of the bare LM-head products (" + time_name + ")"},
       {"value", floor},
       {"met", floor > 0 && floor <= kDpoFloorGoal}}};
  return row;
}

// max |got − want| / max(max |want|, floor): the error relative to the tensor's largest entry (the floor
// keeps a scalar near 0 from demanding an absolute error below rounding).
double relative_difference(const at::Tensor& got, const at::Tensor& want, double floor) {
  const at::Tensor w = want.detach().to(at::kCPU, at::kDouble), g = got.detach().to(at::kCPU, at::kDouble);
  return (g - w).abs().max().item<double>() / std::max(w.abs().max().item<double>(), floor);
}

// Note [Checking the contrastive contenders]
// A baseline that computes something else times something else, so before a contrastive row is timed every
// eager contender's loss and gradients (texts, videos, scale) are compared with the fused kernel's, in
// float32 on the row's own inputs; the row records the largest relative difference and the benchmark stops
// above kContrastiveAgreement. The tests compare the two in float64
// (tests/kernels/test_fused_contrastive.cpp); this guards the benchmark's own wiring at its sizes.
constexpr double kContrastiveAgreement = 1e-3;

nlohmann::json contrastive_row(const KernelBenchOptions& o, const BenchDevice& bench_device, int64_t N) {
  at::manual_seed(0);
  const int64_t D = o.contrastive_dim;
  const auto unit_rows = [&] {
    const at::Tensor x = at::randn({N, D});
    return (x / x.norm(2, 1, true)).to(bench_device.device()).requires_grad_();  // [N, D]
  };
  at::Tensor texts = unit_rows(), videos = unit_rows();
  at::Tensor scale =
      at::scalar_tensor(1 / 0.07).to(bench_device.device()).requires_grad_();  // exp(τ) at its initial value
  const auto reset = [&] {
    for (at::Tensor* t : {&texts, &videos, &scale}) t->mutable_grad().reset();
  };
  // Each returns the loss, as a training step's loss function does, so that the score matrices autograd does
  // not save are freed before backward and stay out of the peak.
  const std::function<at::Tensor()> fused = [&] {
    return vimo::kernels::fused_symmetric_infonce(texts, texts, videos, videos, scale, 0, o.contrastive_tile);
  };
  // The plain composition: S once, Sᵀ for video→text (Note [The eager baseline computes S once] in
  // kernels/contrastive_loss.cpp). The goal is judged against it.
  const std::function<at::Tensor()> eager = [&] {
    return vimo::kernels::eager_symmetric_infonce(texts, texts, videos, videos, scale, 0);
  };
  // A reference only: OpenCLIP's single-process composition, both directions as separate products (6 instead
  // of 3), the baseline of the figures before 2026-11-25.
  const std::function<at::Tensor()> separate_products = [&] {
    const at::Tensor text_to_video = scale * at::mm(texts, videos.t());  // [N, N]
    const at::Tensor video_to_text = scale * at::mm(videos, texts.t());  // [N, N]
    return vimo::kernels::symmetric_infonce(text_to_video, video_to_text, 0);
  };

  // Note [Checking the contrastive contenders]
  const auto loss_and_gradients = [&](const std::function<at::Tensor()>& loss_of) {
    const at::Tensor loss = loss_of();
    loss.backward();
    std::vector<at::Tensor> values = {loss.detach(), texts.grad(), videos.grad(), scale.grad()};
    reset();
    return values;
  };
  const std::vector<at::Tensor> want = loss_and_gradients(fused);
  const double gradient_unit = (1 / 0.07) / (2.0 * static_cast<double>(N));  // one term's size
  double agreement = 0;
  for (const auto& [name, loss_of] :
       {std::pair{"eager", eager}, std::pair{"eager, separate products", separate_products}}) {
    const std::vector<at::Tensor> got = loss_and_gradients(loss_of);
    for (size_t i = 0; i < got.size(); ++i) {
      const double difference = relative_difference(got[i], want[i], i == 1 || i == 2 ? gradient_unit : 1.0);
      agreement = std::max(agreement, difference);
      if (!(difference <= kContrastiveAgreement)) {
        constexpr const char* kValues[] = {"loss", "dL/dtexts", "dL/dvideos", "dL/dscale"};
        throw std::logic_error(fmt::format(
            "bench kernels: the {} contrastive composition differs from the fused kernel at N = {}: "
            "{} relative difference {:.3g} > {:.0e}",
            name, N, kValues[i], difference, kContrastiveAgreement));
      }
    }
  }

  const std::vector<nlohmann::json> measured =
      measure_side_by_side(bench_device, o.repetitions,
                           {{[&] { fused().backward(); }, reset},
                            {[&] { eager().backward(); }, reset},
                            {[&] { separate_products().backward(); }, reset}});
  const nlohmann::json &fused_times = measured[0], &eager_times = measured[1], &separate = measured[2];
  nlohmann::json row = {{"loss", "contrastive"},
                        {"shape", {{"N", N}, {"D", D}, {"tile", o.contrastive_tile}}},
                        {"fused", fused_times},
                        {"eager", eager_times},
                        {"eager_separate_products", separate},
                        {"largest_relative_difference_to_fused", agreement}};
  const double speedup = paired_times_ratio(eager_times, fused_times, bench_device.time_key());
  row["eager_over_fused_cpu_time"] = paired_times_ratio(eager_times, fused_times, "cpu_ms");
  row["eager_over_fused_wall_time"] = paired_times_ratio(eager_times, fused_times, "wall_ms");
  row["eager_over_fused_memory"] = ratio(eager_times, fused_times, "peak_MiB");
  row["separate_products_over_fused_cpu_time"] = paired_times_ratio(separate, fused_times, "cpu_ms");
  row["separate_products_over_fused_wall_time"] = paired_times_ratio(separate, fused_times, "wall_ms");
  row["goals"] = {{{"goal", "≥ 2× faster than eager (" + time_words(bench_device) + ")"},
                   {"value", speedup},
                   {"met", speedup >= kContrastiveSpeedupGoal}}};
  return row;
}

// Note [CPU time with more than one thread]
constexpr const char* kOmpWaitPolicyVariable = "OMP_WAIT_POLICY";

std::string omp_wait_policy() {
  const char* value = std::getenv(kOmpWaitPolicyVariable);
  return value ? value : "unset";
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string one;
  in >> one;
  return one.empty() ? "unknown" : one;
}

}  // namespace

KernelBenchOptions KernelBenchOptions::quick() {
  KernelBenchOptions o;
  o.dpo_positions = 64;
  o.dpo_hidden = 128;
  o.dpo_prompt = 16;
  o.dpo_vocabularies = {1024, 2048};
  o.contrastive_sizes = {256, 512};
  o.contrastive_dim = 128;
  o.contrastive_tile = 128;
  o.repetitions = 3;
  return o;
}

nlohmann::json run_kernel_bench(const KernelBenchOptions& options) {
  if (options.repetitions < 1) {
    throw std::invalid_argument("bench kernels: repetitions must be ≥ 1, got " +
                                std::to_string(options.repetitions));
  }
  if (options.dpo_pairs < 1 || options.dpo_positions < 2 || options.dpo_hidden < 1 ||
      options.contrastive_dim < 1 || options.contrastive_tile < 0) {
    throw std::invalid_argument("bench kernels: sizes must be positive (and T ≥ 2; the tile ≥ 0)");
  }
  const BenchDevice device(options.device);
  counting_allocator();
  const int previous_threads = at::get_num_threads();
  if (options.threads > 0) at::set_num_threads(options.threads);
  nlohmann::json report;
  report["machine"] = {{"device", device.describe()},
                       {"nproc", std::thread::hardware_concurrency()},
                       {"torch_threads", at::get_num_threads()},
                       {"omp_wait_policy", omp_wait_policy()},
                       {"load_average_before", load_average()}};
  report["options"] = {{"dpo_pairs", options.dpo_pairs},
                       {"dpo_positions", options.dpo_positions},
                       {"dpo_hidden", options.dpo_hidden},
                       {"dpo_prompt", options.dpo_prompt},
                       {"dpo_vocabularies", options.dpo_vocabularies},
                       {"dpo_chunk_tokens", options.dpo_chunk_tokens},
                       {"contrastive_sizes", options.contrastive_sizes},
                       {"contrastive_dim", options.contrastive_dim},
                       {"contrastive_tile", options.contrastive_tile},
                       {"repetitions", options.repetitions},
                       {"device", device.device().str()},
                       {"dtype", "float32"}};
  nlohmann::json rows = nlohmann::json::array();
  for (int64_t V : options.dpo_vocabularies) rows.push_back(mcdpo_row(options, device, V));
  for (int64_t N : options.contrastive_sizes) rows.push_back(contrastive_row(options, device, N));
  report["rows"] = rows;
  report["machine"]["load_average_after"] = load_average();
  if (options.threads > 0) at::set_num_threads(previous_threads);
  if (!options.out.empty()) {
    namespace fs = std::filesystem;
    const fs::path out(options.out);
    if (out.has_parent_path()) fs::create_directories(out.parent_path());
    std::ofstream file(out);
    if (!(file << report.dump(2) << '\n')) {
      throw std::runtime_error("bench kernels: cannot write the report to " + options.out +
                               "; HINT: check that the directory is writable");
    }
  }
  return report;
}

void print_kernel_bench(const nlohmann::json& report) {
  const nlohmann::json& m = report["machine"];
  fmt::print(
      "fused kernels vs eager, forward + backward, float32, on {}, {} torch threads ({}={}), {} cores, load "
      "average {} before, {} after (medians of {} interleaved rounds; ratios: median of the rounds' ratios; "
      "CPU time = all threads)\n",
      m["device"].get<std::string>(), m["torch_threads"].get<int>(), kOmpWaitPolicyVariable,
      m.value("omp_wait_policy", std::string("unknown")), m["nproc"].get<unsigned>(),
      m["load_average_before"].get<std::string>(), m["load_average_after"].get<std::string>(),
      report["options"]["repetitions"].get<int>());
  const auto cell = [](const nlohmann::json& r) {
    return fmt::format("{:>9.1f} {:>9.1f} {:>9.1f}", r["wall_ms"].get<double>(), r["cpu_ms"].get<double>(),
                       r["peak_MiB"].get<double>());
  };
  fmt::print("\n  {:<34} {:<13} {:>9} {:>9} {:>9}\n", "case", "", "wall ms", "CPU ms", "peak MiB");
  for (const nlohmann::json& row : report["rows"]) {
    const nlohmann::json& s = row["shape"];
    const std::string name =
        row["loss"] == "mcdpo"
            ? fmt::format("McDPO B={} T={} H={} V={}", s["B"].get<int64_t>(), s["T"].get<int64_t>(),
                          s["H"].get<int64_t>(), s["V"].get<int64_t>())
            : fmt::format("contrastive N={} D={}", s["N"].get<int64_t>(), s["D"].get<int64_t>());
    fmt::print("  {:<34} {:<13} {}\n", name, "fused", cell(row["fused"]));
    fmt::print("  {:<34} {:<13} {}\n", "", "eager", cell(row["eager"]));
    if (row.contains("bare_products"))
      fmt::print("  {:<34} {:<13} {}\n", "", "bare products", cell(row["bare_products"]));
    if (row.contains("eager_separate_products"))
      fmt::print("  {:<34} {:<13} {}\n", "", "eager, 2 mm", cell(row["eager_separate_products"]));
    if (row.contains("eager_answer_positions"))
      fmt::print("  {:<34} {:<13} {}\n", "", "eager, answers", cell(row["eager_answer_positions"]));
    fmt::print("  {:<34} eager/fused: {:.2f}× CPU time, {:.2f}× wall time, {:.2f}× peak memory\n", "",
               row["eager_over_fused_cpu_time"].get<double>(),
               row["eager_over_fused_wall_time"].get<double>(), row["eager_over_fused_memory"].get<double>());
    if (row.contains("eager_separate_products")) {
      fmt::print(
          "  {:<34} eager, 2 mm / fused: {:.2f}× CPU time, {:.2f}× wall time (a reference: OpenCLIP's "
          "single-process composition, both directions as separate products)\n",
          "", row["separate_products_over_fused_cpu_time"].get<double>(),
          row["separate_products_over_fused_wall_time"].get<double>());
    }
    if (row.contains("eager_answer_positions")) {
      fmt::print(
          "  {:<34} eager, answers / fused: {:.2f}× CPU time, {:.2f}× wall time, {:.2f}× peak memory (a "
          "reference: eager on the answer positions only)\n",
          "", row["eager_answer_positions_over_fused_cpu_time"].get<double>(),
          row["eager_answer_positions_over_fused_wall_time"].get<double>(),
          row["eager_answer_positions_over_fused_memory"].get<double>());
    }
    for (const nlohmann::json& goal : row["goals"]) {
      fmt::print("  {:<34} goal {:<52} {:>6.2f}  {}\n", "", goal["goal"].get<std::string>(),
                 goal["value"].get<double>(), goal["met"].get<bool>() ? "met" : "NOT met");
    }
  }
}

}  // namespace vimo::trainer
