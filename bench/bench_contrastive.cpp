// Symmetric InfoNCE forward + backward on CPU, one thread: the fused, tiled kernel
// (kernels::fused_symmetric_infonce) against the eager composition (kernels::symmetric_infonce on the full
// [n, N] score matrices). Single process: n = N, the same tensors are local and gathered. float32, D = 768.
//   build-fused/bench/bench_contrastive --benchmark_min_time=0.01
// Counter `temp_MiB_computed` is the size of the score-shaped temporaries, COMPUTED from the shapes (not
// measured): eager keeps per direction at least the raw dot [n, N] (for the scale's gradient) and the
// log-softmax [n, N] for backward, and backward makes a gradient [n, N] of each, so ≥ 2·2·n·N floats live at
// once; fused holds two [n, tile] tiles (dot products and softmax weights).
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>

#include <algorithm>

#include "kernels/contrastive_loss.h"
#include "kernels/fused_contrastive.h"

namespace {

constexpr int64_t kDim = 768;
constexpr int64_t kTile = 256;
constexpr double kMiB = 1024.0 * 1024.0;

at::Tensor unit_rows(int64_t rows) {
  at::Tensor x = at::randn({rows, kDim});
  return (x / x.norm(2, 1, true)).requires_grad_();
}

struct Leaves {
  at::Tensor texts, videos, scale;  // texts, videos [N, D]; scale scalar
};

Leaves make_leaves(int64_t N) {
  at::manual_seed(0);
  return {unit_rows(N), unit_rows(N), at::scalar_tensor(1 / 0.07).requires_grad_()};
}

void clear_grads(Leaves& x) {
  for (at::Tensor* t : {&x.texts, &x.videos, &x.scale}) t->mutable_grad().reset();
}

void BM_FusedSymmetricInfoNCE(benchmark::State& state) {
  at::set_num_threads(1);
  const int64_t N = state.range(0);
  Leaves x = make_leaves(N);
  for (auto _ : state) {
    at::Tensor loss =
        vimo::kernels::fused_symmetric_infonce(x.texts, x.texts, x.videos, x.videos, x.scale, 0, kTile);
    loss.backward();
    benchmark::DoNotOptimize(x.texts.grad().data_ptr());
    clear_grads(x);
  }
  state.counters["temp_MiB_computed"] = 2.0 * N * std::min(kTile, N) * sizeof(float) / kMiB;
}

void BM_EagerSymmetricInfoNCE(benchmark::State& state) {
  at::set_num_threads(1);
  const int64_t N = state.range(0);
  Leaves x = make_leaves(N);
  for (auto _ : state) {
    at::Tensor text_to_video = x.scale * at::mm(x.texts, x.videos.t());  // [N, N]
    at::Tensor video_to_text = x.scale * at::mm(x.videos, x.texts.t());  // [N, N]
    at::Tensor loss = vimo::kernels::symmetric_infonce(text_to_video, video_to_text, 0);
    loss.backward();
    benchmark::DoNotOptimize(x.texts.grad().data_ptr());
    clear_grads(x);
  }
  state.counters["temp_MiB_computed"] = 2.0 * 2.0 * N * N * sizeof(float) / kMiB;
}

BENCHMARK(BM_FusedSymmetricInfoNCE)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EagerSymmetricInfoNCE)->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(1);  // one thread, so the figures compare kernels and not thread scheduling
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
