// The fused linear McDPO / cross-entropy / sequence log-prob kernels against the eager LibTorch composition
// (logits = h·Wᵀ, log_softmax, gather, masked sums, the formula; differentiated by autograd): loss, metrics
// and the gradients of hidden states and LM head, on fresh random inputs, over the chunking edge cases.
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/fused_linear_dpo.h"
#include "tests/random_seed.h"

namespace {

using vimo::kernels::LmHeadChunking;
using vimo::kernels::McDpoConfig;
using vimo::kernels::McDpoResult;

// B pairs (2B rows) of T positions, hidden H, vocabulary V, and the kernel's chunking.
struct Problem {
  int64_t B, T, H, V;
  LmHeadChunking chunking;
};

std::string describe(const Problem& p) {
  return "B=" + std::to_string(p.B) + " T=" + std::to_string(p.T) + " H=" + std::to_string(p.H) +
         " V=" + std::to_string(p.V) + " chunk tokens=" + std::to_string(p.chunking.tokens) +
         " vocabulary=" + std::to_string(p.chunking.vocabulary);
}

std::string describe(const McDpoConfig& c) {
  return " beta=" + std::to_string(c.beta) + " alpha=" + std::to_string(c.alpha) +
         " gamma=" + std::to_string(c.gamma) + " epsilon=" + std::to_string(c.epsilon);
}

// Float64 inputs. Each row has a prompt of random length, then an answer of random length, then padding
// (targets −100 outside answers, as a data loader would leave them: the kernel must not read them).
// `logit_scale` is the typical size of a logit. The reference log-probs sit a few nats from the policy's,
// so βΔ spans the sigmoid's curved part.
struct Inputs {
  at::Tensor hidden, weight, targets, mask, reference;  // [2B, T, H], [V, H], [2B, T], [2B, T], [2B]
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
  const at::Tensor policy =
      vimo::kernels::eager_sequence_logps(x.hidden, x.weight, x.targets, x.mask);  // [2B]
  x.reference = policy + 3 * at::randn({R}, at::kDouble);
  return x;
}

// max |got − want| / max(max |want|, floor) (see test_fused_contrastive.cpp).
double relative_error(const at::Tensor& got, const at::Tensor& want, double floor = 1) {
  const at::Tensor w = want.detach().to(at::kDouble), g = got.detach().to(at::kDouble);
  const double magnitude = std::max(w.numel() ? w.abs().max().item<double>() : 0.0, floor);
  if (w.numel() == 0) return 0;
  const double error = (g - w).abs().max().item<double>();
  return magnitude == 0 ? error : error / magnitude;  // an all-zero reference (everything off) is met exactly
}

// One run of a loss: leaves in `dtype` holding the values of `x`, the result, and the gradients after
// backward.
struct LossRun {
  at::Tensor hidden, weight;
  McDpoResult result;
};

LossRun run_mcdpo(const Inputs& x, at::ScalarType dtype, bool fused, const McDpoConfig& config,
                  const LmHeadChunking& chunking, bool hidden_grad = true, bool weight_grad = true) {
  LossRun run;
  run.hidden = x.hidden.detach().to(dtype).clone().requires_grad_(hidden_grad);
  run.weight = x.weight.detach().to(dtype).clone().requires_grad_(weight_grad);
  run.result =
      fused ? vimo::kernels::fused_linear_mcdpo(run.hidden, run.weight, x.targets, x.mask, x.reference,
                                                config, chunking)
            : vimo::kernels::eager_mcdpo(run.hidden, run.weight, x.targets, x.mask, x.reference, config);
  if (hidden_grad || weight_grad) run.result.loss.backward();
  return run;
}

// The named tensors of a run to compare: loss, metrics, gradients (undefined where not asked for).
std::vector<std::pair<std::string, at::Tensor>> outputs(const LossRun& r) {
  const McDpoResult& m = r.result;
  return {{"loss", m.loss},
          {"dpo_loss", m.dpo_loss},
          {"sft_loss", m.sft_loss},
          {"logps_chosen", m.logps_chosen},
          {"logps_rejected", m.logps_rejected},
          {"rewards_chosen", m.rewards_chosen},
          {"rewards_rejected", m.rewards_rejected},
          {"accuracy", m.accuracy},
          {"margin", m.margin},
          {"grad hidden", r.hidden.grad()},
          {"grad weight", r.weight.grad()}};
}

// Expects every output of `got` within `tolerance` of `want` (relative_error, floor 1: the loss and the
// log-probs are O(1) or larger; the gradients are compared against their largest entry).
void expect_close(const LossRun& got, const LossRun& want, double tolerance, const std::string& context) {
  const auto g = outputs(got), w = outputs(want);
  for (size_t k = 0; k < g.size(); ++k) {
    const auto& [name, value] = g[k];
    ASSERT_EQ(value.defined(), w[k].second.defined()) << context << ": " << name << " defined differently";
    if (!value.defined()) continue;
    ASSERT_EQ(value.sizes(), w[k].second.sizes()) << context << ": " << name;
    EXPECT_TRUE(at::isfinite(value.to(at::kDouble)).all().item<bool>()) << context << ": " << name;
    const double floor = name.rfind("grad", 0) == 0 ? 0 : 1;
    EXPECT_LE(relative_error(value, w[k].second, floor), tolerance) << context << ": " << name;
  }
}

void expect_mcdpo_matches_eager_float64(const Problem& p, const McDpoConfig& config) {
  const Inputs x = random_inputs(p);
  const LossRun fused = run_mcdpo(x, at::kDouble, true, config, p.chunking);
  const LossRun eager = run_mcdpo(x, at::kDouble, false, config, p.chunking);
  EXPECT_EQ(fused.result.loss.scalar_type(), at::kDouble);
  EXPECT_EQ(fused.result.loss.dim(), 0);
  expect_close(fused, eager, 1e-10, describe(p) + describe(config));
}

const std::vector<Problem> kChunkingCases = {
    {2, 7, 8, 37, {4, 0}},     // pairs longer than the chunk: logits recomputed in pass 2
    {3, 5, 8, 50, {1000, 0}},  // chunk larger than all tokens: one tile, logits computed once
    {2, 6, 8, 37, {5, 8}},     // V = 37 not a multiple of the vocabulary chunk 8
    {1, 9, 16, 40, {6, 0}},    // B = 1 pair
    {3, 1, 8, 30, {2, 7}},     // T = 1
    {2, 4, 4, 11, {1, 1}},     // one token, one vocabulary entry per tile
    {4, 12, 16, 64, {24, 0}},  // several pairs packed per group
    {2, 10, 8, 33, {64, 16}},  // whole pairs in one token chunk, vocabulary chunked: online log-sum-exp
};

TEST(FusedLinearDpo, MatchesEagerInFloat64AcrossChunkings) {
  vimo::testing::seed_torch();
  for (const Problem& p : kChunkingCases) expect_mcdpo_matches_eager_float64(p, McDpoConfig{});
}

TEST(FusedLinearDpo, MatchesEagerForEveryTermSwitchedOnAndOff) {
  vimo::testing::seed_torch();
  const std::vector<McDpoConfig> configs = {
      {0.1, 1.0, 0.1, 0.0},  // defaults
      {0.5, 1.0, 1.0, 0.2},  // ε > 0 (cDPO smoothing), γ = 1 as in the released code
      {0.1, 1.0, 0.0, 0.0},  // γ = 0: the DPO term alone
      {0.1, 0.0, 0.1, 0.0},  // α = 0: the CE term alone (no coupling between the tokens of a pair)
      {0.0, 0.0, 0.0, 0.0},  // everything off: the loss is 0 and so are the gradients
  };
  for (const McDpoConfig& config : configs) {
    for (const Problem& p : {Problem{2, 7, 8, 37, {4, 0}}, Problem{3, 6, 8, 29, {100, 10}}}) {
      expect_mcdpo_matches_eager_float64(p, config);
    }
  }
}

TEST(FusedLinearDpo, AllMaskedSequences) {
  vimo::testing::seed_torch();
  const Problem p{3, 6, 8, 21, {5, 0}};
  Inputs x = random_inputs(p);
  x.mask[0].fill_(false);          // a chosen answer with no token: logπ = 0
  x.mask[2 * 3 - 1].fill_(false);  // the last rejected answer empty
  const LossRun fused = run_mcdpo(x, at::kDouble, true, {}, p.chunking);
  const LossRun eager = run_mcdpo(x, at::kDouble, false, {}, p.chunking);
  expect_close(fused, eager, 1e-10, "one empty chosen and one empty rejected row");
  EXPECT_EQ(fused.result.logps_chosen[0].item<double>(), 0.0);
  EXPECT_EQ(fused.hidden.grad()[0].abs().max().item<double>(), 0.0);  // no answer token, no gradient
  // No answer token anywhere: the CE term is defined as 0 (eager: a sum over nothing divided by max(N, 1)).
  x.mask.fill_(false);
  const LossRun empty = run_mcdpo(x, at::kDouble, true, {}, p.chunking);
  expect_close(empty, run_mcdpo(x, at::kDouble, false, {}, p.chunking), 1e-10, "no answer token");
  EXPECT_EQ(empty.weight.grad().abs().max().item<double>(), 0.0);
}

// Float32 against the exact (float64) answer for the same float32-rounded inputs. Error budget, unit
// roundoff u = 2^-24 ≈ 6e-8: a logit is an H-term dot product with |z| ≈ 3, off by about u·3·√H ≈ 1e-6 at
// worst-typical; a log-prob sums ≈ 50 tokens of z − lse, so |logπ| ≈ 200 with an absolute error ≈ 1e-5, i.e.
// 5e-8 relative to its size; the loss (≈ 1) moves by β·1e-5 = 1e-6; the gradients inherit the softmax's
// relative error ≈ 1e-6. Measured over 100 runs: ≤ 1.6e-6 (gradients), ≤ 4e-7 (loss), ≤ 1e-7 (log-probs),
// ≤ 3e-6 (rewards, before they were formed in float64). 1e-5 leaves a margin while any structural mistake (a
// wrong tile edge, a dropped token, a misplaced sign) is O(1e-2) or more.
TEST(FusedLinearDpo, MatchesFloat64ReferenceInFloat32) {
  vimo::testing::seed_torch();
  for (const Problem& p : {Problem{2, 48, 64, 300, {40, 0}}, Problem{3, 32, 64, 257, {512, 64}}}) {
    Inputs x = random_inputs(p);
    x.hidden = x.hidden.to(at::kFloat).to(at::kDouble);
    x.weight = x.weight.to(at::kFloat).to(at::kDouble);
    const McDpoConfig config{0.1, 1.0, 0.1, 0.1};
    const LossRun fused = run_mcdpo(x, at::kFloat, true, config, p.chunking);
    const LossRun truth = run_mcdpo(x, at::kDouble, false, config, p.chunking);
    EXPECT_EQ(fused.result.loss.scalar_type(), at::kFloat);
    EXPECT_EQ(fused.hidden.grad().scalar_type(), at::kFloat);
    expect_close(fused, truth, 1e-5, describe(p) + " float32");
  }
}

// bfloat16 (8 significant bits): the CCE criterion, |fused − truth| ≤ |eager bf16 − truth| + 1e-2, with truth
// the float64 composition on the same bf16-rounded inputs. The fused kernel accumulates in float32/float64
// where eager rounds logits, log-softmax and sums to bfloat16, so it is usually far more accurate.
TEST(FusedLinearDpo, Bfloat16NoWorseThanEagerBfloat16) {
  vimo::testing::seed_torch();
  const Problem p{2, 24, 32, 200, {32, 0}};
  Inputs x = random_inputs(p);
  x.hidden = x.hidden.to(at::kBFloat16).to(at::kDouble);
  x.weight = x.weight.to(at::kBFloat16).to(at::kDouble);
  const McDpoConfig config{0.1, 1.0, 0.1, 0.0};
  const LossRun fused = run_mcdpo(x, at::kBFloat16, true, config, p.chunking);
  const LossRun eager = run_mcdpo(x, at::kBFloat16, false, config, p.chunking);
  const LossRun truth = run_mcdpo(x, at::kDouble, false, config, p.chunking);
  EXPECT_EQ(fused.result.loss.scalar_type(), at::kBFloat16);
  EXPECT_EQ(fused.hidden.grad().scalar_type(), at::kBFloat16);
  EXPECT_EQ(fused.weight.grad().scalar_type(), at::kBFloat16);
  const auto f = outputs(fused), e = outputs(eager), t = outputs(truth);
  for (size_t k = 0; k < f.size(); ++k) {
    const double floor = f[k].first.rfind("grad", 0) == 0 ? 0 : 1;
    const double fused_error = relative_error(f[k].second, t[k].second, floor);
    const double eager_error = relative_error(e[k].second, t[k].second, floor);
    EXPECT_LE(fused_error, eager_error + 1e-2)
        << f[k].first << ": fused " << fused_error << ", eager " << eager_error;
  }
}

// Logits of ±1e4: far beyond exp's range in any dtype; the log-sum-exp must subtract the max first.
TEST(FusedLinearDpo, LogitsOfTenThousandStayFinite) {
  vimo::testing::seed_torch();
  const Problem p{2, 6, 16, 40, {5, 16}};
  const Inputs x = random_inputs(p, 1e4);
  const McDpoConfig config{0.1, 1.0, 0.1, 0.1};
  const LossRun fused = run_mcdpo(x, at::kDouble, true, config, p.chunking);
  const LossRun eager = run_mcdpo(x, at::kDouble, false, config, p.chunking);
  expect_close(fused, eager, 1e-10, "logits 1e4, float64");
  // float32: every output finite; the log-probs (≈ −1e4·tokens) within float32's relative precision.
  Inputs rounded = x;
  rounded.hidden = x.hidden.to(at::kFloat).to(at::kDouble);
  rounded.weight = x.weight.to(at::kFloat).to(at::kDouble);
  const LossRun single = run_mcdpo(rounded, at::kFloat, true, config, p.chunking);
  const LossRun truth = run_mcdpo(rounded, at::kDouble, false, config, p.chunking);
  for (const auto& [name, value] : outputs(single)) {
    EXPECT_TRUE(at::isfinite(value).all().item<bool>()) << name;
  }
  EXPECT_LE(relative_error(single.result.logps_chosen, truth.result.logps_chosen), 1e-5);
  EXPECT_LE(relative_error(single.result.logps_rejected, truth.result.logps_rejected), 1e-5);
}

TEST(FusedLinearDpo, FrozenInputsGetNoGradient) {
  vimo::testing::seed_torch();
  const Problem p{2, 5, 8, 23, {4, 0}};
  const Inputs x = random_inputs(p);
  // Frozen LM head (e.g. LoRA on the body only): only hidden learns.
  expect_close(run_mcdpo(x, at::kDouble, true, {}, p.chunking, true, false),
               run_mcdpo(x, at::kDouble, false, {}, p.chunking, true, false), 1e-10, "frozen weight");
  // Only the head learns.
  expect_close(run_mcdpo(x, at::kDouble, true, {}, p.chunking, false, true),
               run_mcdpo(x, at::kDouble, false, {}, p.chunking, false, true), 1e-10, "frozen hidden");
  // Nothing learns: a plain evaluation; and no graph under NoGradGuard although both require grad.
  expect_close(run_mcdpo(x, at::kDouble, true, {}, p.chunking, false, false),
               run_mcdpo(x, at::kDouble, false, {}, p.chunking, false, false), 1e-10, "evaluation");
  at::NoGradGuard no_grad;
  const at::Tensor h = x.hidden.clone().requires_grad_(), w = x.weight.clone().requires_grad_();
  EXPECT_FALSE(vimo::kernels::fused_linear_mcdpo(h, w, x.targets, x.mask, x.reference).loss.requires_grad());
}

TEST(FusedLinearDpo, UpstreamGradientScalesTheResult) {
  vimo::testing::seed_torch();
  const Problem p{2, 6, 8, 19, {5, 0}};
  const Inputs x = random_inputs(p);
  const at::Tensor h = x.hidden.clone().requires_grad_(), w = x.weight.clone().requires_grad_();
  const at::Tensor he = x.hidden.clone().requires_grad_(), we = x.weight.clone().requires_grad_();
  // As in gradient accumulation: the loss divided by the micro-steps, plus another term on the same leaves.
  (vimo::kernels::fused_linear_mcdpo(h, w, x.targets, x.mask, x.reference, {}, p.chunking).loss * -0.25 +
   h.sum())
      .backward();
  (vimo::kernels::eager_mcdpo(he, we, x.targets, x.mask, x.reference).loss * -0.25 + he.sum()).backward();
  EXPECT_LE(relative_error(h.grad(), he.grad(), 0), 1e-10);
  EXPECT_LE(relative_error(w.grad(), we.grad(), 0), 1e-10);
  // The gradients are computed in the forward and handed over once: a second backward is an error, not a
  // silent zero.
  const at::Tensor loss = vimo::kernels::fused_linear_mcdpo(h, w, x.targets, x.mask, x.reference).loss;
  loss.backward({}, /*retain_graph=*/true);
  EXPECT_THROW(loss.backward(), std::exception);
  // ... and a gradient of a gradient (create_graph) would have no second-order terms: refused, named.
  const at::Tensor again = vimo::kernels::fused_linear_mcdpo(h, w, x.targets, x.mask, x.reference).loss;
  try {
    (void)torch::autograd::grad({again}, {h}, {}, /*retain_graph=*/true, /*create_graph=*/true);
    ADD_FAILURE() << "double backward through the fused loss was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("double backward (create_graph=true) is not supported"),
              std::string::npos)
        << e.what();
  }
}

// Note [Threads in the fused LM-head kernel]: pass 1's element work (max, exp, sums of a tile) runs in blocks
// of kCacheBlockValues / V rows spread over the threads by at::parallel_for, and the products are threaded by
// the BLAS. The suite runs with one thread (tests/serial_main.cpp), so here 4 threads (on any number of
// cores). Answers cover at least the last 3/4 of every row, so a pair has ≥ 144 answer tokens. V = 4096
// makes blocks of 32 rows: each pair fills a 128-token chunk, 4 blocks, one per thread. With vocabulary
// chunks of 512, blocks of 256 rows: both pairs (≥ 288 tokens) form one chunk of 512, 2 blocks. The threads
// change only the order of the BLAS's sums: float64 within 1e-12 of the one-thread result and 1e-10 of eager;
// float32 within 1e-5 of the float64 truth, the bound of MatchesFloat64ReferenceInFloat32.
TEST(FusedLinearDpo, ThreadCountDoesNotChangeTheResult) {
  vimo::testing::seed_torch();
  struct RestoreThreads {
    int threads = at::get_num_threads();
    ~RestoreThreads() { at::set_num_threads(threads); }
  } restore;
  const McDpoConfig config{0.1, 1.0, 0.1, 0.1};
  for (const Problem& p : {Problem{2, 96, 32, 4096, {128, 0}}, Problem{2, 96, 32, 4096, {512, 512}}}) {
    Inputs x = random_inputs(p);
    const at::Tensor position = at::arange(p.T, at::kLong).unsqueeze(0);                   // [1, T]
    x.mask = (position >= at::randint(0, p.T / 4, {2 * p.B, 1}, at::kLong)).contiguous();  // [2B, T]
    x.targets = at::where(x.mask, at::randint(0, p.V, x.mask.sizes(), at::kLong), -100);
    x.hidden = x.hidden.to(at::kFloat).to(at::kDouble);  // float32-representable, for the float32 runs
    x.weight = x.weight.to(at::kFloat).to(at::kDouble);
    x.reference = vimo::kernels::eager_sequence_logps(x.hidden, x.weight, x.targets, x.mask) +
                  3 * at::randn({2 * p.B}, at::kDouble);
    at::set_num_threads(1);
    const LossRun truth = run_mcdpo(x, at::kDouble, false, config, p.chunking);
    const LossRun serial = run_mcdpo(x, at::kDouble, true, config, p.chunking);
    const LossRun serial32 = run_mcdpo(x, at::kFloat, true, config, p.chunking);
    at::set_num_threads(4);
    ASSERT_EQ(at::get_num_threads(), 4);
    const LossRun parallel = run_mcdpo(x, at::kDouble, true, config, p.chunking);
    const LossRun parallel32 = run_mcdpo(x, at::kFloat, true, config, p.chunking);
    expect_close(parallel, serial, 1e-12, describe(p) + " 4 threads vs 1, float64");
    expect_close(parallel, truth, 1e-10, describe(p) + " 4 threads vs eager, float64");
    expect_close(parallel32, truth, 1e-5, describe(p) + " 4 threads float32 vs float64");
    expect_close(serial32, truth, 1e-5, describe(p) + " 1 thread float32 vs float64");
  }
}

// ----- the same machinery for the reference model and SFT -----

TEST(FusedLinearDpo, SequenceLogProbsMatchEagerWithoutGradient) {
  vimo::testing::seed_torch();
  for (const Problem& p : kChunkingCases) {
    const Inputs x = random_inputs(p);
    const at::Tensor h = x.hidden.clone().requires_grad_();
    const at::Tensor fused =
        vimo::kernels::fused_linear_sequence_logps(h, x.weight, x.targets, x.mask, p.chunking);
    EXPECT_FALSE(fused.requires_grad()) << describe(p);
    ASSERT_EQ(fused.sizes(), at::IntArrayRef{2 * p.B});
    EXPECT_LE(
        relative_error(fused, vimo::kernels::eager_sequence_logps(x.hidden, x.weight, x.targets, x.mask)),
        1e-10)
        << describe(p);
  }
  // Any number of rows (not only pairs), and float32 results for bfloat16 inputs.
  const Inputs x = random_inputs({2, 4, 8, 17, {}});
  const at::Tensor three = vimo::kernels::fused_linear_sequence_logps(
      x.hidden.narrow(0, 0, 3).to(at::kBFloat16), x.weight.to(at::kBFloat16), x.targets.narrow(0, 0, 3),
      x.mask.narrow(0, 0, 3));
  EXPECT_EQ(three.scalar_type(), at::kFloat);
  EXPECT_EQ(three.size(0), 3);
}

TEST(FusedLinearDpo, CrossEntropyMatchesEager) {
  vimo::testing::seed_torch();
  for (const Problem& p : kChunkingCases) {
    const Inputs x = random_inputs(p);
    const at::Tensor h = x.hidden.clone().requires_grad_(), w = x.weight.clone().requires_grad_();
    const at::Tensor he = x.hidden.clone().requires_grad_(), we = x.weight.clone().requires_grad_();
    const at::Tensor fused = vimo::kernels::fused_linear_cross_entropy(h, w, x.targets, x.mask, p.chunking);
    const at::Tensor eager = vimo::kernels::eager_cross_entropy(he, we, x.targets, x.mask);
    EXPECT_LE(relative_error(fused, eager), 1e-10) << describe(p);
    fused.backward();
    eager.backward();
    EXPECT_LE(relative_error(h.grad(), he.grad(), 0), 1e-10) << describe(p);
    EXPECT_LE(relative_error(w.grad(), we.grad(), 0), 1e-10) << describe(p);
  }
}

// ----- errors -----

// Expects `body` to throw std::invalid_argument whose message contains `part`.
void expect_invalid(const std::function<void()>& body, const std::string& part) {
  try {
    body();
    ADD_FAILURE() << "expected an error containing '" << part << "'";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << "'" << part << "' not in: " << e.what();
  }
}

TEST(FusedLinearDpo, RejectsMisshapenInputsWithClearErrors) {
  const at::Tensor h = at::zeros({4, 3, 8}), w = at::zeros({10, 8}), y = at::zeros({4, 3}, at::kLong);
  const at::Tensor m = at::ones({4, 3}, at::kBool), ref = at::zeros({4});
  using Args = std::vector<at::Tensor>;
  auto call = [](Args a, LmHeadChunking chunking = {}) {
    return [=] { vimo::kernels::fused_linear_mcdpo(a[0], a[1], a[2], a[3], a[4], {}, chunking); };
  };
  expect_invalid(call({at::zeros({4, 8}), w, y, m, ref}),
                 "hidden must be [R, T, H] with R, T, H ≥ 1, got [4, 8]");
  expect_invalid(
      call({at::zeros({3, 3, 8}), w, at::zeros({3, 3}, at::kLong), at::ones({3, 3}, at::kBool), ref}),
      "hidden must hold 2B rows");
  expect_invalid(call({h, at::zeros({10, 7}), y, m, ref}),
                 "weight must be [V, 8] (H of hidden [4, 3, 8]), got [10, 7]");
  expect_invalid(call({h, w.to(at::kDouble), y, m, ref}), "weight is Double but hidden is Float");
  expect_invalid(call({h, w, at::zeros({4, 2}, at::kLong), m, ref}), "targets must be int64 [4, 3]");
  expect_invalid(call({h, w, y.to(at::kInt), m, ref}),
                 "targets must be int64 [4, 3] (R, T of hidden), got Int [4, 3]");
  expect_invalid(call({h, w, y, at::ones({4, 3}), ref}), "mask must be bool [4, 3]");
  expect_invalid(call({h, w, y, m, at::zeros({2})}), "reference_logps must be a floating tensor [4]");
  expect_invalid(call({h, w, at::full({4, 3}, 10, at::kLong), m, ref}),
                 "targets at answer positions must lie in [0, 10), found 10");
  expect_invalid(call({h.to(at::kInt), w, y, m, ref}), "hidden must be float32, float64 or bfloat16");
  expect_invalid(call({h, w, y, m, ref}, {0, 0}), "chunking.tokens must be ≥ 1, got 0");
  expect_invalid(call({h, w, y, m, ref}, {4, -1}), "chunking.vocabulary must be ≥ 0");
  expect_invalid(
      [&] {
        vimo::kernels::fused_linear_cross_entropy(h, w, y, at::ones({4, 2}, at::kBool));
      },
      "fused_linear_cross_entropy: mask must be bool [4, 3] (R, T of hidden), got Bool [4, 2]");
  // Targets outside the answer are never read: padding ids like −100 are fine.
  EXPECT_NO_THROW(vimo::kernels::fused_linear_sequence_logps(h, w, at::full({4, 3}, -100, at::kLong),
                                                             at::zeros({4, 3}, at::kBool)));
}

}  // namespace
