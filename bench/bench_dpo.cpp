// McDPO forward + backward on CPU: the fused linear kernel (kernels::fused_linear_mcdpo) against the eager
// composition (kernels::eager_mcdpo: full [2B, T, V] logits, log_softmax, autograd), and the bare LM-head
// matrix products that any implementation must make, as the floor. B = 4 pairs, T = 256, H = 512, float32;
// each row has a prompt of P tokens (P = 64, or 0) and an answer to the end (the loss counts answer tokens
// only; eager computes logits at every position anyway, the fused kernel visits answer tokens only).
//   build/bench/bench_dpo --benchmark_repetitions=3
// Threads: VIMO_BENCH_THREADS (default 2, the cores of the project's machine); LibTorch's matrix products
// and element-wise kernels parallelize internally. "Time" is wall-clock, "CPU" the whole process's CPU time
// (all threads), which is the steadier figure when other processes share the cores.
//
// Counter `peak_MiB` is MEASURED: a counting allocator installed with c10::SetCPUAllocator sees every CPU
// tensor allocation; the counter is the high-water mark of live tensor bytes during one forward + backward,
// above what was live before it (the inputs). It includes the gradients of hidden and weight (4 + V/512·4
// MiB), and excludes allocations that bypass c10's allocator (BLAS workspaces, std::vector).
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "bench/counting_allocator.h"
#include "kernels/fused_linear_dpo.h"

namespace {

constexpr int64_t kPairs = 4, kPositions = 256, kHidden = 512, kPrompt = 64;  // kPrompt: the default P
constexpr const char* kThreadsVariable = "VIMO_BENCH_THREADS";
constexpr double kMiB = 1024.0 * 1024.0;

using vimo::bench::counting_allocator;
using vimo::bench::CountingAllocator;

struct Problem {
  at::Tensor hidden, weight, targets, mask, reference;  // [2B, T, H], [V, H], [2B, T], [2B, T], [2B]
};

Problem make_problem(int64_t V, int64_t prompt = kPrompt) {
  at::manual_seed(0);
  Problem p;
  const int64_t R = 2 * kPairs;
  p.hidden = at::randn({R, kPositions, kHidden}).requires_grad_();
  p.weight = (at::randn({V, kHidden}) / std::sqrt(static_cast<double>(kHidden))).requires_grad_();
  p.targets = at::randint(0, V, {R, kPositions}, at::kLong);
  p.mask = (at::arange(kPositions) >= prompt).unsqueeze(0).expand({R, kPositions}).contiguous();
  p.reference = -9.0 * (kPositions - prompt) + at::randn({R});
  return p;
}

void clear_grads(Problem& p) {
  p.hidden.mutable_grad().reset();
  p.weight.mutable_grad().reset();
}

// Times `step` (one forward + backward) and records the peak of live tensor bytes above the inputs.
template <typename Step>
void run(benchmark::State& state, Problem& p, Step step) {
  CountingAllocator& allocator = counting_allocator();
  int64_t peak = 0;
  for (auto _ : state) {
    const int64_t before = allocator.live();
    allocator.reset_peak();
    step();
    peak = std::max(peak, allocator.peak() - before);
    benchmark::DoNotOptimize(p.weight.grad().data_ptr());
    clear_grads(p);
  }
  state.counters["peak_MiB"] = static_cast<double>(peak) / kMiB;
}

// Args: V, chunk tokens, prompt length P.
void BM_FusedMcDpo(benchmark::State& state) {
  Problem p = make_problem(state.range(0), state.range(2));
  const vimo::kernels::LmHeadChunking chunking{state.range(1), 0};
  run(state, p, [&] {
    vimo::kernels::fused_linear_mcdpo(p.hidden, p.weight, p.targets, p.mask, p.reference, {}, chunking)
        .loss.backward();
  });
}

// Args: V, prompt length P.
void BM_EagerMcDpo(benchmark::State& state) {
  Problem p = make_problem(state.range(0), state.range(1));
  run(state, p, [&] {
    vimo::kernels::eager_mcdpo(p.hidden, p.weight, p.targets, p.mask, p.reference).loss.backward();
  });
}

// The floor: logits = X·Wᵀ [N, V], grad_X = G·W [N, H], grad_W = Gᵀ·X [V, H] for N tokens (arg 1: all 2B·T
// positions, or the answer tokens only, the ones the fused kernel visits).
void BM_LmHeadProducts(benchmark::State& state) {
  Problem p = make_problem(state.range(0));
  const int64_t tokens = state.range(1);
  const at::Tensor x = p.hidden.detach().reshape({-1, kHidden}).narrow(0, 0, tokens);  // [N, H]
  const at::Tensor w = p.weight.detach();                                              // [V, H]
  for (auto _ : state) {
    at::Tensor logits = at::mm(x, w.t());       // [N, V]; stands in for the logit gradient of the same shape
    at::Tensor grad_x = at::mm(logits, w);      // [N, H]
    at::Tensor grad_w = at::mm(logits.t(), x);  // [V, H]
    benchmark::DoNotOptimize(grad_x.data_ptr());
    benchmark::DoNotOptimize(grad_w.data_ptr());
  }
}

constexpr int64_t kAllTokens = 2 * kPairs * kPositions, kAnswerTokens = 2 * kPairs * (kPositions - kPrompt);

BENCHMARK(BM_FusedMcDpo)
    ->ArgsProduct({{8192, 32768}, {256, 512, 1024}, {kPrompt}})
    ->Args({8192, 1024, 0})
    ->Args({32768, 1024, 0})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->UseRealTime();
BENCHMARK(BM_EagerMcDpo)
    ->ArgsProduct({{8192, 32768}, {kPrompt, 0}})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->UseRealTime();
BENCHMARK(BM_LmHeadProducts)
    ->ArgsProduct({{8192, 32768}, {kAllTokens, kAnswerTokens}})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  const char* threads = std::getenv(kThreadsVariable);
  at::set_num_threads(threads ? std::stoi(threads) : 2);
  counting_allocator();  // installed before any tensor exists, so every block is counted on both sides
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("torch_threads", std::to_string(at::get_num_threads()));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
