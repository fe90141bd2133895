// Symmetric InfoNCE forward + backward on CPU: the fused two-pass kernel (kernels::fused_symmetric_infonce)
// against the eager composition (kernels::eager_symmetric_infonce: the full [n, N] score matrices, autograd).
// float32, D = 768. Args: N gathered rows, ranks R (n = N / R local rows), strip rows (fused only).
//   R = 1: one process, the same tensors are local and gathered (n = N): one score matrix serves both
//          directions, in the fused kernel (3 to 4 products of N·N·D) as in eager (3: S, then dL/dS · V and
//          dL/dSᵀ · T; Note [The eager baseline computes S once] in kernels/contrastive_loss.cpp).
//          BM_EagerSeparateProductsSymmetricInfoNCE is a reference only: OpenCLIP's single-process
//          composition, both directions as separate products (6), the baseline of the figures before
//          2026-11-25.
//   R = 4: rank 0's view in data parallelism (n = N / 4 local rows, distinct gathered tensors): two score
//          matrices (6 to 8 products of n·N·D), eager 6.
//   build/bench/bench_contrastive --benchmark_min_time=0.3 --benchmark_repetitions=3
//       --benchmark_report_aggregates_only=true                                        (one command line)
// Threads: VIMO_BENCH_THREADS (default 1, so the figures compare kernels and not thread scheduling). "Time"
// is wall-clock, "CPU" the whole process's CPU time (all threads): the steadier figure on a shared machine.
//
// Counter `peak_MiB` is MEASURED (bench/counting_allocator.h): the high-water mark of live CPU tensor bytes
// during one forward + backward above what was live before it (the inputs), gradients of the inputs included
// (2·N·D·4 bytes = 24 MiB at N = 4096 in one process), BLAS workspaces excluded.
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "bench/counting_allocator.h"
#include "kernels/contrastive_loss.h"
#include "kernels/fused_contrastive.h"

namespace {

constexpr int64_t kDim = 768;
constexpr const char* kThreadsVariable = "VIMO_BENCH_THREADS";
constexpr double kMiB = 1024.0 * 1024.0;

using vimo::bench::counting_allocator;
using vimo::bench::CountingAllocator;

int bench_threads() {
  const char* value = std::getenv(kThreadsVariable);
  return value ? std::max(1, std::stoi(value)) : 1;
}

at::Tensor unit_rows(int64_t rows) {
  at::Tensor x = at::randn({rows, kDim});
  return (x / x.norm(2, 1, true)).requires_grad_();
}

// Rank 0 of `ranks`: local rows are the first n of the gathered ones (separate leaves unless ranks = 1).
struct Leaves {
  at::Tensor text_local, text_all, video_local, video_all, scale;  // [n, D], [N, D], [n, D], [N, D], scalar
};

Leaves make_leaves(int64_t N, int64_t ranks) {
  at::manual_seed(0);
  Leaves x;
  x.text_all = unit_rows(N);
  x.video_all = unit_rows(N);
  if (ranks == 1) {
    x.text_local = x.text_all;
    x.video_local = x.video_all;
  } else {
    x.text_local = x.text_all.detach().narrow(0, 0, N / ranks).clone().requires_grad_();
    x.video_local = x.video_all.detach().narrow(0, 0, N / ranks).clone().requires_grad_();
  }
  x.scale = at::scalar_tensor(1 / 0.07).requires_grad_();
  return x;
}

void clear_grads(Leaves& x) {
  for (at::Tensor* t : {&x.text_local, &x.text_all, &x.video_local, &x.video_all, &x.scale}) {
    t->mutable_grad().reset();
  }
}

// Times `step` (one forward + backward) and records the peak of live tensor bytes above the inputs.
template <typename Step>
void run(benchmark::State& state, Leaves& x, Step step) {
  at::set_num_threads(bench_threads());
  CountingAllocator& allocator = counting_allocator();
  int64_t peak = 0;
  for (auto _ : state) {
    const int64_t before = allocator.live();
    allocator.reset_peak();
    step();
    peak = std::max(peak, allocator.peak() - before);
    benchmark::DoNotOptimize(x.text_all.grad().data_ptr());
    clear_grads(x);
  }
  state.counters["peak_MiB"] = static_cast<double>(peak) / kMiB;
}

void BM_FusedSymmetricInfoNCE(benchmark::State& state) {
  Leaves x = make_leaves(state.range(0), state.range(1));
  const int64_t strip_rows = state.range(2);
  run(state, x, [&] {
    vimo::kernels::fused_symmetric_infonce(x.text_local, x.text_all, x.video_local, x.video_all, x.scale, 0,
                                           strip_rows)
        .backward();
  });
}

// The loss is built by a function that returns it, as in a training step, so the score matrices autograd does
// not save are freed before backward and stay out of peak_MiB.
void BM_EagerSymmetricInfoNCE(benchmark::State& state) {
  Leaves x = make_leaves(state.range(0), state.range(1));
  run(state, x, [&] {
    vimo::kernels::eager_symmetric_infonce(x.text_local, x.text_all, x.video_local, x.video_all, x.scale, 0)
        .backward();
  });
}

at::Tensor separate_products_loss(const Leaves& x) {
  const at::Tensor text_to_video = x.scale * at::mm(x.text_local, x.video_all.t());  // [n, N]
  const at::Tensor video_to_text = x.scale * at::mm(x.video_local, x.text_all.t());  // [n, N]
  return vimo::kernels::symmetric_infonce(text_to_video, video_to_text, 0);
}

void BM_EagerSeparateProductsSymmetricInfoNCE(benchmark::State& state) {
  Leaves x = make_leaves(state.range(0), state.range(1));
  run(state, x, [&] { separate_products_loss(x).backward(); });
}

// One bare score-shaped product, [N, D] · [D, N]: in one process eager makes 3 of them (1 forward, 2
// backward), the fused kernel 3 to 4 (Note [Two-pass symmetric InfoNCE]), the separate-products reference 6,
// so this is the unit all are measured in.
void BM_ScoreProduct(benchmark::State& state) {
  Leaves x = make_leaves(state.range(0), 1);
  const at::Tensor texts = x.text_all.detach(), videos = x.video_all.detach();
  run(state, x, [&] {
    benchmark::DoNotOptimize(at::mm(texts, videos.t()).data_ptr());
    x.text_all.mutable_grad() = at::zeros({1});  // run() reads a gradient
  });
}

BENCHMARK(BM_ScoreProduct)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FusedSymmetricInfoNCE)
    ->Args({1024, 1, 256})
    ->Args({4096, 1, 128})
    ->Args({4096, 1, 256})
    ->Args({4096, 1, 512})
    ->Args({4096, 4, 256})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EagerSymmetricInfoNCE)
    ->Args({1024, 1})
    ->Args({4096, 1})
    ->Args({4096, 4})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EagerSeparateProductsSymmetricInfoNCE)
    ->Args({1024, 1})
    ->Args({4096, 1})
    ->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  counting_allocator();  // installed before any tensor exists, so every block is counted on both sides
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
