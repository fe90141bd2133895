// The fused linear McDPO / cross-entropy / sequence log-prob kernel on CUDA (cuBLAS products + the tile
// kernels of kernels/cuda/fused_linear_dpo.cu) against the same kernel on CPU, on the CPU test's cases: loss,
// metrics and both gradients, float64 within 1e-10, float32 within 1e-5 relative (TF32 off), bfloat16 within
// the bfloat16 bound; chunkings, every loss term on and off, all-masked rows, logits of ±1e4. Skips, naming
// the reason, where no CUDA device is visible (this project's CI machines).
#include <ATen/Context.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "kernels/fused_linear_dpo.h"
#include "tests/random_seed.h"

namespace {

using vimo::kernels::LmHeadChunking;
using vimo::kernels::McDpoConfig;
using vimo::kernels::McDpoResult;

#define SKIP_WITHOUT_CUDA()                                                                              \
  if (!torch::cuda::is_available()) {                                                                    \
    GTEST_SKIP() << "no CUDA device visible to LibTorch (torch::cuda::is_available() is false): the "    \
                    "CUDA kernel is compiled and linked here but can only be compared on a GPU machine"; \
  }

struct Problem {
  int64_t B, T, H, V;
  LmHeadChunking chunking;
};

std::string describe(const Problem& p) {
  return "B=" + std::to_string(p.B) + " T=" + std::to_string(p.T) + " H=" + std::to_string(p.H) +
         " V=" + std::to_string(p.V) + " chunk tokens=" + std::to_string(p.chunking.tokens) +
         " vocabulary=" + std::to_string(p.chunking.vocabulary);
}

// The CPU test's chunking cases (tests/kernels/test_fused_linear_dpo.cpp).
const std::vector<Problem> kChunkingCases = {
    {2, 7, 8, 37, {4, 0}},       {3, 5, 8, 50, {1000, 0}}, {2, 6, 8, 37, {5, 8}},
    {1, 9, 16, 40, {6, 0}},      {3, 1, 8, 30, {2, 7}},    {2, 4, 4, 11, {1, 1}},
    {4, 12, 16, 64, {24, 0}},    {2, 10, 8, 33, {64, 16}}, {2, 48, 64, 300, {40, 0}},
    {3, 32, 64, 2049, {512, 0}},  // a vocabulary wider than one 256-thread block
};

struct Inputs {
  at::Tensor hidden, weight, targets, mask,
      reference;  // CPU float64: [2B, T, H], [V, H], [2B, T], [2B, T], [2B]
};

Inputs random_inputs(const Problem& p, double logit_scale = 3) {
  Inputs x;
  const int64_t R = 2 * p.B;
  x.hidden = at::randn({R, p.T, p.H}, at::kDouble);
  x.weight = at::randn({p.V, p.H}, at::kDouble) * (logit_scale / std::sqrt(static_cast<double>(p.H)));
  x.targets = at::randint(0, p.V, {R, p.T}, at::kLong);
  const at::Tensor position = at::arange(p.T, at::kLong).unsqueeze(0);                        // [1, T]
  const at::Tensor start = at::randint(0, std::max<int64_t>(p.T / 2, 1), {R, 1}, at::kLong);  // [R, 1]
  const at::Tensor length = at::randint(1, p.T + 1, {R, 1}, at::kLong);                       // [R, 1]
  x.mask = (position >= start) & (position < start + length);
  x.targets = at::where(x.mask, x.targets, at::full_like(x.targets, -100));
  x.reference = vimo::kernels::eager_sequence_logps(x.hidden, x.weight, x.targets, x.mask) +
                3 * at::randn({R}, at::kDouble);  // [2B]
  return x;
}

double relative_error(const at::Tensor& got, const at::Tensor& want, double floor = 1) {
  const at::Tensor w = want.detach().cpu().to(at::kDouble), g = got.detach().cpu().to(at::kDouble);
  if (w.numel() == 0) return 0;
  const double magnitude = std::max(w.abs().max().item<double>(), floor);
  const double error = (g - w).abs().max().item<double>();
  return magnitude == 0 ? error : error / magnitude;
}

struct LossRun {
  at::Tensor hidden, weight;
  McDpoResult result;
};

LossRun run_mcdpo(const Inputs& x, at::ScalarType dtype, const at::Device& device, const McDpoConfig& config,
                  const LmHeadChunking& chunking) {
  LossRun run;
  run.hidden = x.hidden.to(device, dtype).clone().requires_grad_(true);
  run.weight = x.weight.to(device, dtype).clone().requires_grad_(true);
  run.result = vimo::kernels::fused_linear_mcdpo(run.hidden, run.weight, x.targets.to(device),
                                                 x.mask.to(device), x.reference.to(device), config, chunking);
  run.result.loss.backward();
  return run;
}

void expect_close(const LossRun& cuda, const LossRun& cpu, double tolerance, const std::string& context) {
  const McDpoResult &g = cuda.result, &w = cpu.result;
  EXPECT_TRUE(g.loss.is_cuda()) << context;
  const std::vector<std::pair<const char*, std::pair<at::Tensor, at::Tensor>>> values = {
      {"loss", {g.loss, w.loss}},
      {"dpo_loss", {g.dpo_loss, w.dpo_loss}},
      {"sft_loss", {g.sft_loss, w.sft_loss}},
      {"logps_chosen", {g.logps_chosen, w.logps_chosen}},
      {"logps_rejected", {g.logps_rejected, w.logps_rejected}},
      {"rewards_chosen", {g.rewards_chosen, w.rewards_chosen}},
      {"rewards_rejected", {g.rewards_rejected, w.rewards_rejected}},
      {"accuracy", {g.accuracy, w.accuracy}},
      {"margin", {g.margin, w.margin}}};
  for (const auto& [name, pair] : values) {
    EXPECT_LE(relative_error(pair.first, pair.second), tolerance) << context << ": " << name;
  }
  EXPECT_TRUE(at::isfinite(cuda.hidden.grad()).all().item<bool>()) << context;
  EXPECT_LE(relative_error(cuda.hidden.grad(), cpu.hidden.grad(), 0), tolerance)
      << context << ": grad hidden";
  EXPECT_LE(relative_error(cuda.weight.grad(), cpu.weight.grad(), 0), tolerance)
      << context << ": grad weight";
}

// TF32 would make float32 products 10-bit-mantissa products: off for the float32 comparison.
struct NoTf32 {
  NoTf32() : previous(at::globalContext().allowTF32CuBLAS()) {
    at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~NoTf32() { at::globalContext().setAllowTF32CuBLAS(previous); }
  bool previous;
};

TEST(FusedLinearDpoCuda, MatchesCpuInFloat64AcrossChunkingsAndTerms) {
  SKIP_WITHOUT_CUDA();
  vimo::testing::seed_torch();
  const at::Device cuda(at::kCUDA);
  // Defaults; ε > 0 with γ = 1; α = 0 (the CE term alone); γ = 0 (the DPO term alone: no gradient from the
  // CE term, so the chosen rows' token weights come from Δ only); everything off.
  for (const McDpoConfig& config :
       {McDpoConfig{}, McDpoConfig{0.5, 1.0, 1.0, 0.2}, McDpoConfig{0.1, 0.0, 0.1, 0},
        McDpoConfig{0.1, 1.0, 0.0, 0.0}, McDpoConfig{0, 0, 0, 0}}) {
    for (const Problem& p : kChunkingCases) {
      const Inputs x = random_inputs(p);
      expect_close(
          run_mcdpo(x, at::kDouble, cuda, config, p.chunking),
          run_mcdpo(x, at::kDouble, at::kCPU, config, p.chunking), 1e-10,
          describe(p) + " alpha=" + std::to_string(config.alpha) + " gamma=" + std::to_string(config.gamma));
    }
  }
}

TEST(FusedLinearDpoCuda, MatchesCpuInFloat32) {
  SKIP_WITHOUT_CUDA();
  vimo::testing::seed_torch();
  const NoTf32 no_tf32;
  for (const Problem& p : kChunkingCases) {
    const Inputs x = random_inputs(p);
    expect_close(run_mcdpo(x, at::kFloat, at::kCUDA, {}, p.chunking),
                 run_mcdpo(x, at::kFloat, at::kCPU, {}, p.chunking), 1e-5, describe(p) + " float32");
  }
}

// bfloat16 inputs, float32 accumulation on both devices: the same bound as the CPU test's bfloat16 case
// against float64 (1e-2 absolute on O(1) values), here between the two devices.
TEST(FusedLinearDpoCuda, Bfloat16MatchesCpu) {
  SKIP_WITHOUT_CUDA();
  vimo::testing::seed_torch();
  const NoTf32 no_tf32;
  for (const Problem& p : {Problem{2, 48, 64, 300, {40, 0}}, Problem{3, 32, 64, 257, {512, 64}}}) {
    const Inputs x = random_inputs(p);
    expect_close(run_mcdpo(x, at::kBFloat16, at::kCUDA, {}, p.chunking),
                 run_mcdpo(x, at::kBFloat16, at::kCPU, {}, p.chunking), 1e-2, describe(p) + " bfloat16");
  }
}

TEST(FusedLinearDpoCuda, AllMaskedRowsAndLogitsOfTenThousand) {
  SKIP_WITHOUT_CUDA();
  vimo::testing::seed_torch();
  const Problem p{3, 6, 8, 21, {5, 0}};
  Inputs x = random_inputs(p);
  x.mask[0].fill_(false);
  x.mask[5].fill_(false);
  expect_close(run_mcdpo(x, at::kDouble, at::kCUDA, {}, p.chunking),
               run_mcdpo(x, at::kDouble, at::kCPU, {}, p.chunking), 1e-10, "empty rows");
  x.mask.fill_(false);
  expect_close(run_mcdpo(x, at::kDouble, at::kCUDA, {}, p.chunking),
               run_mcdpo(x, at::kDouble, at::kCPU, {}, p.chunking), 1e-10, "no answer token");
  const Inputs large = random_inputs({2, 6, 8, 37, {5, 0}}, 1e4);
  expect_close(run_mcdpo(large, at::kDouble, at::kCUDA, {}, {5, 0}),
               run_mcdpo(large, at::kDouble, at::kCPU, {}, {5, 0}), 1e-10, "logits 1e4");
}

// A chunk of more answer tokens than CUDA's 65535 grid rows: the gradient kernel's rows stride over the grid
// (its launch failed with an invalid configuration before). 2 × 36000 tokens, most of them answer tokens,
// in one chunk of 80000; a small head keeps it cheap on both devices.
TEST(FusedLinearDpoCuda, AChunkOfMoreTokensThanGridRows) {
  SKIP_WITHOUT_CUDA();
  vimo::testing::seed_torch();
  const Problem p{1, 36000, 8, 40, {80000, 0}};
  Inputs x = random_inputs(p);
  x.mask.fill_(true);
  x.targets = at::randint(0, p.V, {2, p.T}, at::kLong);
  x.reference = vimo::kernels::eager_sequence_logps(x.hidden, x.weight, x.targets, x.mask) +
                3 * at::randn({2}, at::kDouble);
  expect_close(run_mcdpo(x, at::kDouble, at::kCUDA, {}, p.chunking),
               run_mcdpo(x, at::kDouble, at::kCPU, {}, p.chunking), 1e-10, describe(p));
}

TEST(FusedLinearDpoCuda, SequenceLogProbsAndCrossEntropyMatchCpu) {
  SKIP_WITHOUT_CUDA();
  vimo::testing::seed_torch();
  for (const Problem& p : kChunkingCases) {
    const Inputs x = random_inputs(p);
    const at::Tensor targets = x.targets.cuda(), mask = x.mask.cuda();
    EXPECT_LE(relative_error(vimo::kernels::fused_linear_sequence_logps(x.hidden.cuda(), x.weight.cuda(),
                                                                        targets, mask, p.chunking),
                             vimo::kernels::fused_linear_sequence_logps(x.hidden, x.weight, x.targets, x.mask,
                                                                        p.chunking)),
              1e-10)
        << describe(p);
    const at::Tensor hg = x.hidden.cuda().requires_grad_(true), wg = x.weight.cuda().requires_grad_(true);
    const at::Tensor hc = x.hidden.clone().requires_grad_(true), wc = x.weight.clone().requires_grad_(true);
    const at::Tensor on_gpu = vimo::kernels::fused_linear_cross_entropy(hg, wg, targets, mask, p.chunking);
    const at::Tensor on_cpu =
        vimo::kernels::fused_linear_cross_entropy(hc, wc, x.targets, x.mask, p.chunking);
    on_gpu.backward();
    on_cpu.backward();
    EXPECT_LE(relative_error(on_gpu, on_cpu), 1e-10) << describe(p);
    EXPECT_LE(relative_error(hg.grad(), hc.grad(), 0), 1e-10) << describe(p);
    EXPECT_LE(relative_error(wg.grad(), wc.grad(), 0), 1e-10) << describe(p);
  }
}

}  // namespace
