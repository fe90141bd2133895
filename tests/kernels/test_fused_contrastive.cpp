// The fused, tiled symmetric InfoNCE against the eager composition (kernels::symmetric_infonce on explicitly
// built [n, N] score matrices, differentiated by autograd): loss and the gradients of all four embeddings and
// of the scale, on fresh random inputs, over the tiling edge cases.
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/contrastive_loss.h"
#include "kernels/fused_contrastive.h"
#include "tests/random_seed.h"

namespace {

using vimo::kernels::fused_symmetric_infonce;
using vimo::kernels::symmetric_infonce;

// One problem: local rows sit at `offset` among the N gathered rows, as on rank offset / n.
struct Problem {
  int64_t n, N, D, offset, tile;
};

std::string describe(const Problem& p) {
  return "n=" + std::to_string(p.n) + " N=" + std::to_string(p.N) + " D=" + std::to_string(p.D) +
         " offset=" + std::to_string(p.offset) + " tile=" + std::to_string(p.tile);
}

// The inputs of one loss evaluation; every tensor is a leaf of its own so each gradient can be read apart.
struct Inputs {
  at::Tensor text_local, text_all, video_local, video_all, scale;
};

at::Tensor unit_rows(int64_t rows, int64_t D) {
  at::Tensor x = at::randn({rows, D}, at::kDouble);
  return x / x.norm(2, 1, true);
}

// L2-normalized embeddings in float64; the local rows are the gathered rows at the offset, as after
// all_gather, plus a little noise so a wrong local/all pairing in the kernel would show.
Inputs random_inputs(const Problem& p, double scale) {
  Inputs x;
  x.text_all = unit_rows(p.N, p.D);
  x.video_all = unit_rows(p.N, p.D);
  x.text_local = x.text_all.narrow(0, p.offset, p.n) + 0.01 * at::randn({p.n, p.D}, at::kDouble);
  x.video_local = x.video_all.narrow(0, p.offset, p.n) + 0.01 * at::randn({p.n, p.D}, at::kDouble);
  x.scale = at::scalar_tensor(scale, at::kDouble);
  return x;
}

// Fresh leaves of `dtype` holding the values of `x`; the scale keeps its own dtype (float64).
Inputs leaves(const Inputs& x, at::ScalarType dtype, bool embeddings_grad = true, bool scale_grad = true) {
  auto leaf = [&](const at::Tensor& t, at::ScalarType type, bool grad) {
    return t.detach().to(type).clone().requires_grad_(grad);
  };
  return {leaf(x.text_local, dtype, embeddings_grad), leaf(x.text_all, dtype, embeddings_grad),
          leaf(x.video_local, dtype, embeddings_grad), leaf(x.video_all, dtype, embeddings_grad),
          leaf(x.scale, x.scale.scalar_type(), scale_grad)};
}

at::Tensor eager_loss(const Inputs& x, int64_t offset) {
  at::Tensor text_to_video = x.scale * at::mm(x.text_local, x.video_all.t());  // [n, N]
  at::Tensor video_to_text = x.scale * at::mm(x.video_local, x.text_all.t());  // [n, N]
  return symmetric_infonce(text_to_video, video_to_text, offset);
}

at::Tensor fused_loss(const Inputs& x, const Problem& p) {
  return fused_symmetric_infonce(x.text_local, x.text_all, x.video_local, x.video_all, x.scale, p.offset,
                                 p.tile);
}

// max |got − want| / max(max |want|, floor): the error relative to the tensor's largest entry. The floor
// keeps near-zero scalars (dL/dscale can cancel to ~0) from demanding an absolute error below rounding; the
// loss and dL/dscale are O(1) quantities for unit embeddings, so a floor of 1 is their natural unit.
double relative_error(const at::Tensor& got, const at::Tensor& want, double floor = 0) {
  const at::Tensor w = want.to(at::kDouble);
  const double magnitude = std::max(w.abs().max().item<double>(), floor);
  if (magnitude == 0) return got.to(at::kDouble).abs().max().item<double>();
  return (got.to(at::kDouble) - w).abs().max().item<double>() / magnitude;
}

// Expects the gradient of leaf `got` (fused) to match that of `want` (eager, float64): both absent, or
// within `tolerance` of relative_error with `floor`. Floors: 1 for dL/dscale; for an embedding (or a router
// weight) the gradient's natural unit scale / (2n), the size of one term s·c·C_j of Note [Two-pass symmetric
// InfoNCE]. When a row's positive dominates by a wide margin (scale 100 or 1e4), its gradient is ~e^-gap
// times that unit and comes from 1 − softmax_pos, which both implementations resolve only to ~u of the unit:
// measured against the tiny gradient itself, float64 showed errors of 1e-2 at scale 100.
void expect_gradient_matches(const char* name, const at::Tensor& got, const at::Tensor& want, double floor,
                             double tolerance, const Problem& p) {
  if (!want.requires_grad()) {
    EXPECT_FALSE(got.grad().defined()) << describe(p) << ": unexpected gradient for " << name;
    return;
  }
  ASSERT_TRUE(got.grad().defined()) << describe(p) << ": no gradient for " << name;
  ASSERT_EQ(got.grad().sizes(), got.sizes()) << name;
  ASSERT_EQ(got.grad().scalar_type(), got.scalar_type()) << name;
  EXPECT_TRUE(at::isfinite(got.grad()).all().item<bool>()) << describe(p) << ": " << name;
  EXPECT_LE(relative_error(got.grad(), want.grad(), floor), tolerance)
      << describe(p) << ": gradient of " << name;
}

// Runs the fused kernel on `dtype` copies of `x` and the eager composition on float64 copies, and expects
// the loss and every gradient that is asked for to agree within `tolerance` (relative_error); the gradients
// within `gradient_tolerance` when it is given.
void expect_matches_eager(const Inputs& x, const Problem& p, at::ScalarType dtype, double tolerance,
                          bool embeddings_grad = true, bool scale_grad = true,
                          double gradient_tolerance = 0) {
  if (gradient_tolerance == 0) gradient_tolerance = tolerance;
  const Inputs fused = leaves(x, dtype, embeddings_grad, scale_grad);
  const Inputs eager = leaves(x, at::kDouble, embeddings_grad, scale_grad);
  at::Tensor fused_value = fused_loss(fused, p), eager_value = eager_loss(eager, p.offset);
  ASSERT_EQ(fused_value.scalar_type(), dtype);
  ASSERT_EQ(fused_value.dim(), 0);
  EXPECT_TRUE(std::isfinite(fused_value.item<double>())) << describe(p);
  EXPECT_LE(relative_error(fused_value, eager_value, 1), tolerance)
      << describe(p) << ": loss " << fused_value.item<double>() << " vs " << eager_value.item<double>();
  if (!embeddings_grad && !scale_grad) return;
  fused_value.backward();
  eager_value.backward();
  const double embedding_unit = x.scale.item<double>() / (2.0 * p.n);
  expect_gradient_matches("text_local", fused.text_local, eager.text_local, embedding_unit,
                          gradient_tolerance, p);
  expect_gradient_matches("text_all", fused.text_all, eager.text_all, embedding_unit, gradient_tolerance, p);
  expect_gradient_matches("video_local", fused.video_local, eager.video_local, embedding_unit,
                          gradient_tolerance, p);
  expect_gradient_matches("video_all", fused.video_all, eager.video_all, embedding_unit, gradient_tolerance,
                          p);
  expect_gradient_matches("scale", fused.scale, eager.scale, 1, gradient_tolerance, p);
}

constexpr double kInitialScale = 1 / 0.07;  // exp(τ) at τ's initial value ln(1/0.07)

const std::vector<Problem> kTilingCases = {
    {1, 1, 8, 0, 256},     // one pair, one column
    {1, 9, 8, 4, 4},       // n = 1 among N = 9 gathered rows, N not a multiple of the tile
    {5, 5, 16, 0, 2},      // N = 5 not a multiple of tile 2
    {4, 12, 16, 8, 1},     // tile = 1, positives at offset 8 (rank 2 of 3)
    {6, 6, 16, 0, 1000},   // tile > N: one partial tile
    {3, 13, 32, 7, 5},     // offset > 0, last tile of 3 columns
    {16, 64, 32, 16, 16},  // several full tiles, rank 1 of 4
    {40, 80, 4, 40, 3},    // narrow D, many strips (no score cache in data parallelism)
};

TEST(FusedContrastive, MatchesEagerInFloat64AcrossTilings) {
  vimo::testing::seed_torch();
  for (const Problem& p : kTilingCases)
    expect_matches_eager(random_inputs(p, kInitialScale), p, at::kDouble, 1e-10);
}

TEST(FusedContrastive, SingleProcessSameTensorAsLocalAndAll) {
  vimo::testing::seed_torch();
  // One process: the same leaf is local and all, and autograd adds the row and column gradients.
  const int64_t N = 11, D = 16;
  at::Tensor texts = unit_rows(N, D).requires_grad_(), videos = unit_rows(N, D).requires_grad_();
  at::Tensor scale = at::scalar_tensor(kInitialScale, at::kDouble).requires_grad_();
  fused_symmetric_infonce(texts, texts, videos, videos, scale, 0, 3).backward();
  const at::Tensor fused_grads[] = {texts.grad().clone(), videos.grad().clone(), scale.grad().clone()};
  for (at::Tensor* t : {&texts, &videos, &scale}) t->mutable_grad().reset();
  symmetric_infonce(scale * at::mm(texts, videos.t()), scale * at::mm(videos, texts.t()), 0).backward();
  EXPECT_LE(relative_error(fused_grads[0], texts.grad()), 1e-10);
  EXPECT_LE(relative_error(fused_grads[1], videos.grad()), 1e-10);
  EXPECT_LE(relative_error(fused_grads[2], scale.grad(), 1), 1e-10);
}

// The gradients are computed in the forward, so a gradient of a gradient (create_graph) would have no
// second-order terms: refused with a hint, where eager gives a real one (the scale's here).
TEST(FusedContrastive, DoubleBackwardIsRefusedNotSilentlyZero) {
  vimo::testing::seed_torch();
  at::Tensor texts = unit_rows(6, 8).requires_grad_(), videos = unit_rows(6, 8).requires_grad_();
  at::Tensor scale = at::scalar_tensor(kInitialScale, at::kDouble).requires_grad_();
  const at::Tensor fused = fused_symmetric_infonce(texts, texts, videos, videos, scale, 0, 3);
  try {
    (void)torch::autograd::grad({fused}, {texts}, {}, /*retain_graph=*/true, /*create_graph=*/true);
    ADD_FAILURE() << "double backward through the fused loss was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("double backward (create_graph=true) is not supported"),
              std::string::npos)
        << e.what();
  }
  const at::Tensor eager =
      symmetric_infonce(scale * at::mm(texts, videos.t()), scale * at::mm(videos, texts.t()), 0);
  const at::Tensor dtexts =
      torch::autograd::grad({eager}, {texts}, {}, /*retain_graph=*/true, /*create_graph=*/true)[0];
  const at::Tensor second = torch::autograd::grad({dtexts.pow(2).sum()}, {scale})[0];
  EXPECT_GT(second.abs().item<double>(), 1e-6) << "the eager composition has a second-order term here";
}

// float32 against the exact (float64) answer for the same float32-rounded inputs. Error budget, with unit
// roundoff u = 2^-24 ≈ 6e-8: a D-term dot product of unit vectors is off by ≲ D·u in the worst case and by
// about u·|partial sums|·√D ≈ u typically (its terms are ~1/D); times the scale 1/0.07 ≈ 14.3 that is a logit
// error δ ≈ 1e-6 (worst case 64·u·14.3 ≈ 5e-5). δ moves exp(logit − lse) relatively by δ, so the softmax, the
// loss (an O(1) quantity) and the gradients (against their largest entry) are off by ~1e-6; exp, log and the
// sums add a few u. Measured over 300 runs: ≤ 6e-7. So 1e-5 holds with margin > 10× while any structural
// mistake (a wrong tile edge, a missing 1/2, a dropped column) is O(1e-2) or more. At the action scale 100
// the same budget gives ~7e-6, too close to 1e-5, which is why this test uses the initial object scale.
TEST(FusedContrastive, MatchesFloat64ReferenceInFloat32) {
  vimo::testing::seed_torch();
  for (const Problem& p : {Problem{48, 48, 64, 0, 16}, Problem{24, 96, 64, 48, 20}}) {
    const Inputs x = random_inputs(p, kInitialScale);
    // Round once to float32 so both sides see the same inputs; the reference then runs in float64.
    Inputs rounded = leaves(x, at::kFloat);
    for (at::Tensor* t : {&rounded.text_local, &rounded.text_all, &rounded.video_local, &rounded.video_all}) {
      *t = t->detach().to(at::kDouble);
    }
    rounded.scale = rounded.scale.detach().to(at::kFloat).to(at::kDouble);
    expect_matches_eager(rounded, p, at::kFloat, 1e-5);
  }
}

TEST(FusedContrastive, LogitsOfTenThousandStayFiniteAndExact) {
  vimo::testing::seed_torch();
  // scale 1e4 on unit vectors: logits in ±1e4, far beyond exp's range in any dtype.
  const Problem p{8, 24, 16, 8, 5};
  const Inputs x = random_inputs(p, 1e4);
  expect_matches_eager(x, p, at::kDouble, 1e-10);
  // float32: logits carry δ ≈ 1e4 · u ≈ 1e-3 absolute error (worst case 1e4 · D·u ≈ 1e-2), so the loss
  // (≈ 1e2..1e4, measured against max(|loss|, 1)) stays within 1e-5 relative. The gradients cannot: a column
  // whose logit lies within a few units of its row's maximum (cosines within ~1e-4: not rare at N = 24) gets
  // a softmax weight that moves relatively by δ itself. Eager float32 shares this limit. Measured over 300
  // runs: ≤ 1.5e-4; the check uses the worst-case 1e-2, still far below any structural mistake (O(1)).
  Inputs rounded = leaves(x, at::kFloat);
  for (at::Tensor* t : {&rounded.text_local, &rounded.text_all, &rounded.video_local, &rounded.video_all}) {
    *t = t->detach().to(at::kDouble);
  }
  expect_matches_eager(rounded, p, at::kFloat, 1e-5, true, true, /*gradient_tolerance=*/1e-2);
}

TEST(FusedContrastive, FixedScaleAndFrozenInputsGetNoGradient) {
  vimo::testing::seed_torch();
  const Problem p{4, 8, 16, 4, 3};
  // The action branch's fixed scale 100: no gradient for it, the embeddings still get theirs.
  expect_matches_eager(random_inputs(p, 100), p, at::kDouble, 1e-10, /*embeddings_grad=*/true,
                       /*scale_grad=*/false);
  // Only the scale learns (frozen encoders).
  expect_matches_eager(random_inputs(p, kInitialScale), p, at::kDouble, 1e-10, /*embeddings_grad=*/false,
                       /*scale_grad=*/true);
  // Nothing learns: a plain evaluation.
  expect_matches_eager(random_inputs(p, kInitialScale), p, at::kDouble, 1e-10, false, false);
}

TEST(FusedContrastive, ScaleOfShapeOneAndInFloat32) {
  vimo::testing::seed_torch();
  const Problem p{3, 6, 8, 3, 4};
  const Inputs x = random_inputs(p, kInitialScale);
  Inputs fused = leaves(x, at::kDouble);
  fused.scale = x.scale.to(at::kFloat).reshape({1}).requires_grad_();
  fused_loss(fused, p).backward();
  ASSERT_EQ(fused.scale.grad().sizes(), fused.scale.sizes());
  ASSERT_EQ(fused.scale.grad().scalar_type(), at::kFloat);
  Inputs eager = leaves(x, at::kDouble);
  eager.scale = x.scale.to(at::kFloat).to(at::kDouble).requires_grad_();
  eager_loss(eager, p.offset).backward();
  EXPECT_LE(relative_error(fused.scale.grad(), eager.scale.grad(), 1), 1e-6);  // float32 gradient
  EXPECT_LE(relative_error(fused.text_local.grad(), eager.text_local.grad()), 1e-10);
}

TEST(FusedContrastive, Bfloat16AccumulatesInFloat32) {
  vimo::testing::seed_torch();
  const Problem p{8, 16, 32, 8, 5};
  const Inputs x = random_inputs(p, kInitialScale);
  Inputs bf16 = leaves(x, at::kBFloat16), f32 = leaves(x, at::kBFloat16);
  for (at::Tensor* t : {&f32.text_local, &f32.text_all, &f32.video_local, &f32.video_all}) {
    *t = t->detach().to(at::kFloat).requires_grad_();
  }
  at::Tensor low = fused_loss(bf16, p), high = fused_loss(f32, p);
  EXPECT_EQ(low.scalar_type(), at::kBFloat16);
  // Same float32 arithmetic on the same values: only the bfloat16 rounding of the results differs (2^-8).
  EXPECT_LE(relative_error(low, high, 1), 1e-2);
  low.backward();
  high.backward();
  EXPECT_EQ(bf16.video_all.grad().scalar_type(), at::kBFloat16);
  EXPECT_LE(relative_error(bf16.video_all.grad(), f32.video_all.grad()), 1e-2);
  EXPECT_LE(relative_error(bf16.scale.grad(), f32.scale.grad(), 1), 1e-6);  // accumulated as a double
}

// ----- Gemini router stage: two branches weighted per video -----

using vimo::kernels::fuse_scores;
using vimo::kernels::fused_gemini_infonce;
using vimo::kernels::GeminiInfoNCEInputs;

constexpr double kActionScale = 100;  // DESIGN.md: s_act = 100 · cos

// Local rows = the gathered rows at the offset plus a little noise (see random_inputs); the object branch is
// 8 wider than the action branch so a mixed-up width would show. Router weights are a softmax per video.
GeminiInfoNCEInputs random_gemini_inputs(const Problem& p) {
  GeminiInfoNCEInputs x;
  auto pair = [&](at::Tensor& local, at::Tensor& all, int64_t D) {
    all = unit_rows(p.N, D);
    local = all.narrow(0, p.offset, p.n) + 0.01 * at::randn({p.n, D}, at::kDouble);
  };
  pair(x.text_action_local, x.text_action_all, p.D);
  pair(x.text_object_local, x.text_object_all, p.D + 8);
  pair(x.video_action_local, x.video_action_all, p.D);
  pair(x.video_object_local, x.video_object_all, p.D + 8);
  x.router_all = at::softmax(at::randn({p.N, 2}, at::kDouble), 1);
  x.router_local = x.router_all.narrow(0, p.offset, p.n).clone();
  x.action_scale = at::scalar_tensor(kActionScale, at::kDouble);
  x.object_scale = at::scalar_tensor(kInitialScale, at::kDouble);
  return x;
}

std::vector<at::Tensor*> fields(GeminiInfoNCEInputs& x) {
  return {&x.text_action_local,  &x.text_action_all,  &x.text_object_local,  &x.text_object_all,
          &x.video_action_local, &x.video_action_all, &x.video_object_local, &x.video_object_all,
          &x.router_local,       &x.router_all,       &x.action_scale,       &x.object_scale};
}

const char* const kGeminiNames[] = {"text_action_local",  "text_action_all",    "text_object_local",
                                    "text_object_all",    "video_action_local", "video_action_all",
                                    "video_object_local", "video_object_all",   "router_local",
                                    "router_all",         "action_scale",       "object_scale"};

// Fresh leaves: tensors in `dtype` (scales keep float64); `requires_grad[k]` per field in fields() order.
GeminiInfoNCEInputs gemini_leaves(GeminiInfoNCEInputs x, at::ScalarType dtype,
                                  const std::vector<bool>& grad) {
  std::vector<at::Tensor*> f = fields(x);
  for (size_t k = 0; k < f.size(); ++k) {
    const at::ScalarType type = k >= 10 ? f[k]->scalar_type() : dtype;
    *f[k] = f[k]->detach().to(type).clone().requires_grad_(grad[k]);
  }
  return x;
}

// As GeminiMVR::score and ::contrastive_loss build it: the video→text scores are the gathered captions scored
// against the local videos (weighted per video = per column), transposed.
at::Tensor eager_gemini_loss(const GeminiInfoNCEInputs& x, int64_t offset) {
  at::Tensor text_to_video =
      fuse_scores(x.action_scale * at::mm(x.text_action_local, x.video_action_all.t()),
                  x.object_scale * at::mm(x.text_object_local, x.video_object_all.t()), x.router_all, false);
  at::Tensor video_to_text =
      fuse_scores(x.action_scale * at::mm(x.text_action_all, x.video_action_local.t()),
                  x.object_scale * at::mm(x.text_object_all, x.video_object_local.t()), x.router_local, false)
          .t();
  return symmetric_infonce(text_to_video, video_to_text, offset);
}

void expect_gemini_matches_eager(const GeminiInfoNCEInputs& x, const Problem& p, at::ScalarType dtype,
                                 double tolerance, const std::vector<bool>& grad) {
  GeminiInfoNCEInputs fused = gemini_leaves(x, dtype, grad), eager = gemini_leaves(x, at::kDouble, grad);
  at::Tensor fused_value = fused_gemini_infonce(fused, p.offset, p.tile),
             eager_value = eager_gemini_loss(eager, p.offset);
  ASSERT_EQ(fused_value.scalar_type(), dtype);
  EXPECT_LE(relative_error(fused_value, eager_value, 1), tolerance)
      << describe(p) << ": loss " << fused_value.item<double>() << " vs " << eager_value.item<double>();
  fused_value.backward();
  eager_value.backward();
  const double unit = (kActionScale + kInitialScale) / (2.0 * p.n);  // see expect_gradient_matches
  std::vector<at::Tensor*> got = fields(fused), want = fields(eager);
  for (size_t k = 0; k < got.size(); ++k) {
    expect_gradient_matches(kGeminiNames[k], *got[k], *want[k], k >= 10 ? 1 : unit, tolerance, p);
  }
}

const std::vector<bool> kEverythingLearns(12, true);

TEST(FusedContrastive, GeminiRouterScoreMatchesEagerInFloat64AcrossTilings) {
  vimo::testing::seed_torch();
  for (const Problem& p : kTilingCases) {
    expect_gemini_matches_eager(random_gemini_inputs(p), p, at::kDouble, 1e-10, kEverythingLearns);
  }
}

TEST(FusedContrastive, GeminiRouterStageTrainsOnlyTheRouter) {
  vimo::testing::seed_torch();
  // Stage router: both branches frozen, the router weights (local and gathered) learn; τ frozen too.
  std::vector<bool> router_only(12, false);
  router_only[8] = router_only[9] = true;
  const Problem p{4, 12, 16, 4, 5};
  expect_gemini_matches_eager(random_gemini_inputs(p), p, at::kDouble, 1e-10, router_only);
}

// float32: the action branch's scale 100 gives logit errors δ ≈ 100·u ≈ 6e-6 at most typically (see
// MatchesFloat64ReferenceInFloat32), so the loss and the gradients (against their natural unit) are off by
// ~1e-6. Measured over 200 runs: ≤ 2e-6, so 1e-5 holds with margin 5×.
TEST(FusedContrastive, GeminiRouterScoreInFloat32) {
  vimo::testing::seed_torch();
  const Problem p{24, 72, 32, 24, 16};
  GeminiInfoNCEInputs x = random_gemini_inputs(p);
  for (int k = 0; k < 10; ++k) *fields(x)[k] = fields(x)[k]->to(at::kFloat).to(at::kDouble);
  expect_gemini_matches_eager(x, p, at::kFloat, 1e-5, kEverythingLearns);
}

// ----- bfloat16: the rule, |fused − float64 truth| ≤ |eager bfloat16 − truth| + 1e-2 -----

// A loss and the gradients of its leaves, each with the floor of relative_error it is measured with.
struct Outcome {
  std::vector<std::string> names;
  std::vector<at::Tensor> values;  // loss first, then gradients (undefined where a leaf got none)
  std::vector<double> floors;
};

// The rule, per output: truth is the float64 composition on the same bfloat16-rounded values, so only the
// arithmetic differs. The fused kernel accumulates in float32 where eager rounds every score, softmax and
// sum to bfloat16 (8 significant bits), so the fused error is usually far smaller; the 1e-2 allows the
// bfloat16 rounding of the fused results themselves (2^-8 relative) where eager happens to be lucky.
void expect_no_worse_than_eager(const Outcome& fused, const Outcome& eager, const Outcome& truth,
                                const std::string& context) {
  ASSERT_EQ(fused.values.size(), truth.values.size());
  for (size_t k = 0; k < fused.values.size(); ++k) {
    ASSERT_EQ(fused.values[k].defined(), truth.values[k].defined()) << context << ": " << fused.names[k];
    if (!truth.values[k].defined()) continue;
    EXPECT_TRUE(at::isfinite(fused.values[k].to(at::kDouble)).all().item<bool>()) << context;
    const double fused_error = relative_error(fused.values[k], truth.values[k], truth.floors[k]);
    const double eager_error = relative_error(eager.values[k], truth.values[k], truth.floors[k]);
    EXPECT_LE(fused_error, eager_error + 1e-2)
        << context << ": " << fused.names[k] << ": fused " << fused_error << ", eager " << eager_error;
  }
}

// Single branch in data parallelism (distinct local and gathered leaves, two score matrices).
Outcome single_branch_outcome(const Inputs& x, const Problem& p, at::ScalarType dtype, bool fused) {
  const Inputs in = leaves(x, dtype);
  const at::Tensor loss = fused ? fused_loss(in, p) : eager_loss(in, p.offset);
  EXPECT_EQ(loss.scalar_type(), dtype);
  loss.backward();
  const double unit = x.scale.item<double>() / (2.0 * p.n);  // see expect_gradient_matches
  return {{"loss", "text_local", "text_all", "video_local", "video_all", "scale"},
          {loss.detach(), in.text_local.grad(), in.text_all.grad(), in.video_local.grad(),
           in.video_all.grad(), in.scale.grad()},
          {1, unit, unit, unit, unit, 1}};
}

TEST(FusedContrastive, DataParallelBfloat16NoWorseThanEagerBfloat16) {
  vimo::testing::seed_torch();
  for (const Problem& p : {Problem{8, 16, 32, 8, 5}, Problem{24, 96, 64, 48, 20}, Problem{1, 9, 8, 4, 4}}) {
    Inputs x = random_inputs(p, kInitialScale);
    for (at::Tensor* t : {&x.text_local, &x.text_all, &x.video_local, &x.video_all}) {
      *t = t->to(at::kBFloat16).to(at::kDouble);  // the values every run sees; the scale stays float64
    }
    const Outcome fused = single_branch_outcome(x, p, at::kBFloat16, true);
    EXPECT_EQ(fused.values[1].scalar_type(), at::kBFloat16);
    expect_no_worse_than_eager(fused, single_branch_outcome(x, p, at::kBFloat16, false),
                               single_branch_outcome(x, p, at::kDouble, false), describe(p) + " bfloat16");
  }
}

// The Gemini router form on `dtype` leaves of x, every input learning; one_process: one leaf per local/all
// pair (as GeminiMVR passes them in one process), so one score matrix serves both directions.
Outcome gemini_outcome(const GeminiInfoNCEInputs& x, const Problem& p, at::ScalarType dtype, bool fused,
                       bool one_process) {
  GeminiInfoNCEInputs in = gemini_leaves(x, dtype, kEverythingLearns);
  std::vector<at::Tensor*> f = fields(in);
  if (one_process) {
    for (int k = 0; k < 10; k += 2) *f[k] = *f[k + 1];
  }
  const at::Tensor loss =
      fused ? fused_gemini_infonce(in, p.offset, p.tile) : eager_gemini_loss(in, p.offset);
  EXPECT_EQ(loss.scalar_type(), dtype);
  loss.backward();
  const double unit = (kActionScale + kInitialScale) / (2.0 * p.n);  // see expect_gradient_matches
  Outcome out{{"loss"}, {loss.detach()}, {1}};
  for (size_t k = 0; k < f.size(); ++k) {
    if (one_process && k < 10 && k % 2 == 0) continue;  // the same leaf as k + 1
    out.names.emplace_back(kGeminiNames[k]);
    out.values.push_back(f[k]->grad());
    out.floors.push_back(k >= 10 ? 1 : unit);
  }
  return out;
}

TEST(FusedContrastive, GeminiRouterScoreBfloat16NoWorseThanEagerBfloat16) {
  vimo::testing::seed_torch();
  for (const Problem& p : {Problem{8, 24, 16, 8, 5}, Problem{12, 12, 16, 0, 5}}) {
    const bool one_process = p.n == p.N;
    GeminiInfoNCEInputs x = random_gemini_inputs(p);
    for (int k = 0; k < 10; ++k) *fields(x)[k] = fields(x)[k]->to(at::kBFloat16).to(at::kDouble);
    const Outcome fused = gemini_outcome(x, p, at::kBFloat16, true, one_process);
    EXPECT_EQ(fused.values[1].scalar_type(), at::kBFloat16);
    expect_no_worse_than_eager(fused, gemini_outcome(x, p, at::kBFloat16, false, one_process),
                               gemini_outcome(x, p, at::kDouble, false, one_process),
                               describe(p) + (one_process ? " one process" : "") + " bfloat16");
  }
}

// Expects `body` to throw std::invalid_argument whose message contains `part`.
void expect_invalid(const std::function<void()>& body, const std::string& part) {
  try {
    body();
    ADD_FAILURE() << "expected an error containing '" << part << "'";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << "'" << part << "' not in: " << e.what();
  }
}

// tile 0 chooses the strip for the device (Note [Strips on CUDA]): 256 rows on the CPU, so with 300 rows
// (two strips) the loss and the gradients are bit for bit those of tile 256.
TEST(FusedContrastive, TileZeroIsTheCpuDefaultOf256Rows) {
  vimo::testing::seed_torch();
  const at::Tensor texts0 = at::randn({300, 16}), videos0 = at::randn({300, 16});
  auto run = [&](int64_t tile) {
    at::Tensor texts = texts0.clone().requires_grad_(), videos = videos0.clone().requires_grad_();
    at::Tensor scale = at::scalar_tensor(10.0).requires_grad_();
    at::Tensor loss = fused_symmetric_infonce(texts, texts, videos, videos, scale, 0, tile);
    loss.backward();
    return std::vector<at::Tensor>{loss.detach(), texts.grad(), videos.grad(), scale.grad()};
  };
  const std::vector<at::Tensor> chosen = run(0), explicit_256 = run(256);
  for (size_t k = 0; k < chosen.size(); ++k)
    EXPECT_TRUE(at::equal(chosen[k], explicit_256[k])) << "output " << k;
}

TEST(FusedContrastive, RejectsMismatchedInputsWithClearErrors) {
  const at::Tensor a = at::zeros({4, 8}), all = at::zeros({8, 8}), s = at::scalar_tensor(1.0);
  auto call = [&](const at::Tensor& tl, const at::Tensor& ta, const at::Tensor& vl, const at::Tensor& va,
                  const at::Tensor& scale, int64_t offset, int64_t tile) {
    return [=] { fused_symmetric_infonce(tl, ta, vl, va, scale, offset, tile); };
  };
  expect_invalid(call(at::zeros({4}), all, a, all, s, 0, 4), "text_local must be [n ≥ 1, D], got [4]");
  expect_invalid(call(a, all, a, at::zeros({8, 7}), s, 0, 4), "video_all must be [8, 8], got [8, 7]");
  expect_invalid(call(a, all, at::zeros({3, 8}), all, s, 0, 4), "video_local must be [4, D], got [3, 8]");
  expect_invalid(call(a, at::zeros({9, 8}), a, all, s, 0, 4), "text_all must be [8, 8], got [9, 8]");
  expect_invalid(call(a, all, a, all, s, 5, 4), "positives [5, 9) fall outside 8 columns");
  expect_invalid(call(a, all, a, all, s, -1, 4), "fall outside");
  expect_invalid(call(a, all, a, all, at::ones({2}), 0, 4), "scale must be a tensor of one element, got [2]");
  expect_invalid(call(a, all, a, all, s, 0, -1), "tile must be ≥ 1, or 0 to choose by device, got -1");
  expect_invalid(call(a, all.to(at::kDouble), a, all, s, 0, 4), "text_all is Double but text_local is Float");
  expect_invalid(call(a.to(at::kInt), all, a, all, s, 0, 4), "float32, float64 or bfloat16");
}

TEST(FusedContrastive, GeminiRejectsMisshapenInputs) {
  vimo::testing::seed_torch();
  const Problem p{2, 4, 8, 2, 2};
  GeminiInfoNCEInputs x = random_gemini_inputs(p);
  x.router_all = at::ones({4, 3}, at::kDouble);
  expect_invalid([&] { fused_gemini_infonce(x, p.offset, p.tile); }, "router_all must be [4, 2], got [4, 3]");
  x = random_gemini_inputs(p);
  x.video_object_all = at::ones({4, 8}, at::kDouble);  // the object branch is D + 8 = 16 wide
  expect_invalid([&] { fused_gemini_infonce(x, p.offset, p.tile); },
                 "video_object_all must be [4, 16], got [4, 8]");
}

// ----- One process: the same tensors as local and gathered, one score matrix for both directions -----

// Loss and gradients of the single-branch loss in one process (texts and videos passed as local and all).
struct SingleProcessResult {
  at::Tensor loss, texts_grad, videos_grad, scale_grad;
};

SingleProcessResult single_process(const at::Tensor& texts_values, const at::Tensor& videos_values,
                                   double scale_value, at::ScalarType dtype, int64_t tile, bool fused) {
  at::Tensor texts = texts_values.to(dtype).clone().requires_grad_();
  at::Tensor videos = videos_values.to(dtype).clone().requires_grad_();
  at::Tensor scale = at::scalar_tensor(scale_value, at::kDouble).requires_grad_();
  at::Tensor loss =
      fused ? fused_symmetric_infonce(texts, texts, videos, videos, scale, 0, tile)
            : symmetric_infonce(scale * at::mm(texts, videos.t()), scale * at::mm(videos, texts.t()), 0);
  loss.backward();
  return {loss.detach(), texts.grad(), videos.grad(), scale.grad()};
}

void expect_single_process_close(const SingleProcessResult& got, const SingleProcessResult& want, int64_t N,
                                 double scale, double tolerance, const std::string& what) {
  const double unit = scale / (2.0 * N);  // see expect_gradient_matches
  EXPECT_LE(relative_error(got.loss, want.loss, 1), tolerance) << what << ": loss";
  EXPECT_LE(relative_error(got.texts_grad, want.texts_grad, unit), tolerance) << what << ": texts";
  EXPECT_LE(relative_error(got.videos_grad, want.videos_grad, unit), tolerance) << what << ": videos";
  EXPECT_LE(relative_error(got.scale_grad, want.scale_grad, 1), tolerance) << what << ": scale";
}

TEST(FusedContrastive, SingleProcessMatchesEagerAcrossStripsAndDtypes) {
  vimo::testing::seed_torch();
  struct Case {
    int64_t N, D, tile;
  };
  for (const Case c :
       {Case{1, 8, 4}, Case{5, 16, 2}, Case{11, 16, 1}, Case{40, 32, 7}, Case{64, 32, 1000},
        Case{96, 8, 5}}) {  // N = 96, D = 8: 6 of 20 strips in the score cache, the rest recomputed
    const std::string what = "N=" + std::to_string(c.N) + " tile=" + std::to_string(c.tile);
    const at::Tensor texts = unit_rows(c.N, c.D), videos = unit_rows(c.N, c.D);
    const SingleProcessResult truth =
        single_process(texts, videos, kInitialScale, at::kDouble, c.tile, false);
    expect_single_process_close(single_process(texts, videos, kInitialScale, at::kDouble, c.tile, true),
                                truth, c.N, kInitialScale, 1e-10, what + " float64");
    // float32 on float32-rounded values against float64 on the same values
    // (MatchesFloat64ReferenceInFloat32).
    const at::Tensor texts32 = texts.to(at::kFloat).to(at::kDouble),
                     videos32 = videos.to(at::kFloat).to(at::kDouble);
    expect_single_process_close(single_process(texts32, videos32, kInitialScale, at::kFloat, c.tile, true),
                                single_process(texts32, videos32, kInitialScale, at::kDouble, c.tile, false),
                                c.N, kInitialScale, 1e-5, what + " float32");
    // bfloat16: no worse than eager bfloat16 against the float64 truth on the same bfloat16 values, plus
    // 1e-2.
    const at::Tensor texts16 = texts.to(at::kBFloat16).to(at::kDouble);
    const at::Tensor videos16 = videos.to(at::kBFloat16).to(at::kDouble);
    const SingleProcessResult truth16 =
        single_process(texts16, videos16, kInitialScale, at::kDouble, c.tile, false);
    const SingleProcessResult fused16 =
        single_process(texts16, videos16, kInitialScale, at::kBFloat16, c.tile, true);
    const SingleProcessResult eager16 =
        single_process(texts16, videos16, kInitialScale, at::kBFloat16, c.tile, false);
    const double unit = kInitialScale / (2.0 * c.N);
    EXPECT_LE(relative_error(fused16.loss, truth16.loss, 1),
              relative_error(eager16.loss, truth16.loss, 1) + 1e-2)
        << what << " bfloat16 loss";
    EXPECT_LE(relative_error(fused16.texts_grad, truth16.texts_grad, unit),
              relative_error(eager16.texts_grad, truth16.texts_grad, unit) + 1e-2)
        << what << " bfloat16 texts";
    EXPECT_LE(relative_error(fused16.videos_grad, truth16.videos_grad, unit),
              relative_error(eager16.videos_grad, truth16.videos_grad, unit) + 1e-2)
        << what << " bfloat16 videos";
  }
}

// Note [Shared exponentials] in kernels/fused_contrastive.cpp: a column whose largest score lies more than 40
// below the matrix's largest is "far" and takes its own path. Videos equal to e_0, a direction no caption has
// (their first coordinate is 0), score exactly 0 against every caption while matched pairs score ~0.9·scale:
// at scale 100 (the action branch) those columns are ~90 below the top and the rest are not; at scale 1e4
// nearly every column is far.
TEST(FusedContrastive, SingleProcessFarColumnsMatchEager) {
  vimo::testing::seed_torch();
  const int64_t N = 24, D = 16, far_videos = 3;
  at::Tensor texts = at::randn({N, D}, at::kDouble);
  texts.select(1, 0).zero_();
  texts = texts / texts.norm(2, 1, true);  // [N, D]
  at::Tensor videos = texts + 0.3 * at::randn({N, D}, at::kDouble);
  videos = videos / videos.norm(2, 1, true);  // [N, D]
  videos.narrow(0, 0, far_videos).zero_().select(1, 0).fill_(1);
  for (const double scale : {100.0, 1e4}) {
    for (const int64_t tile : {5, 1000}) {
      const std::string what = "scale=" + std::to_string(scale) + " tile=" + std::to_string(tile);
      expect_single_process_close(single_process(texts, videos, scale, at::kDouble, tile, true),
                                  single_process(texts, videos, scale, at::kDouble, tile, false), N, scale,
                                  1e-10, what);
    }
  }
}

// Copies of the same values are not the same tensors: the kernel must then take the data-parallel path, and
// the gradients stay apart (local vs gathered) yet sum to the one-process gradient.
TEST(FusedContrastive, EqualValuedCopiesTakeTheGeneralPath) {
  vimo::testing::seed_torch();
  const int64_t N = 9, D = 16;
  const at::Tensor texts = unit_rows(N, D), videos = unit_rows(N, D);
  Inputs copies{texts.clone().requires_grad_(), texts.clone().requires_grad_(),
                videos.clone().requires_grad_(), videos.clone().requires_grad_(),
                at::scalar_tensor(kInitialScale, at::kDouble).requires_grad_()};
  fused_symmetric_infonce(copies.text_local, copies.text_all, copies.video_local, copies.video_all,
                          copies.scale, 0, 4)
      .backward();
  const SingleProcessResult one = single_process(texts, videos, kInitialScale, at::kDouble, 4, true);
  const double unit = kInitialScale / (2.0 * N);
  EXPECT_LE(relative_error(copies.text_local.grad() + copies.text_all.grad(), one.texts_grad, unit), 1e-10);
  EXPECT_LE(relative_error(copies.video_local.grad() + copies.video_all.grad(), one.videos_grad, unit),
            1e-10);
  EXPECT_LE(relative_error(copies.scale.grad(), one.scale_grad, 1), 1e-10);
}

TEST(FusedContrastive, GeminiSingleProcessMatchesEager) {
  vimo::testing::seed_torch();
  for (const Problem& p : {Problem{6, 6, 16, 0, 4}, Problem{13, 13, 8, 0, 5}}) {
    const GeminiInfoNCEInputs x = random_gemini_inputs(p);
    for (const bool router_only : {false, true}) {
      // One leaf per field pair: local and all are the same tensor, as GeminiMVR passes them in one process.
      GeminiInfoNCEInputs fused = gemini_leaves(x, at::kDouble, kEverythingLearns);
      GeminiInfoNCEInputs eager = gemini_leaves(x, at::kDouble, kEverythingLearns);
      for (GeminiInfoNCEInputs* in : {&fused, &eager}) {
        std::vector<at::Tensor*> f = fields(*in);
        for (int k = 0; k < 10; k += 2) {
          *f[k] = f[k + 1]->detach().clone().requires_grad_(!router_only || k == 8);
          *f[k + 1] = *f[k];
        }
        if (router_only) {
          in->action_scale = in->action_scale.detach();
          in->object_scale = in->object_scale.detach();
        }
      }
      at::Tensor fused_value = fused_gemini_infonce(fused, 0, p.tile),
                 eager_value = eager_gemini_loss(eager, 0);
      EXPECT_LE(relative_error(fused_value, eager_value, 1), 1e-10) << describe(p);
      fused_value.backward();
      eager_value.backward();
      const double unit = (kActionScale + kInitialScale) / (2.0 * p.n);
      std::vector<at::Tensor*> got = fields(fused), want = fields(eager);
      for (size_t k = 0; k < got.size(); k += (k < 10 ? 2 : 1)) {
        expect_gradient_matches(kGeminiNames[k], *got[k], *want[k], k >= 10 ? 1 : unit, 1e-10, p);
      }
    }
  }
}

TEST(FusedContrastive, ThreadCountDoesNotChangeTheResult) {
  vimo::testing::seed_torch();
  const int threads = at::get_num_threads();
  for (const Problem& p : {Problem{40, 40, 16, 0, 3}, Problem{12, 36, 16, 12, 5}}) {
    const Inputs x = random_inputs(p, kInitialScale);
    std::vector<at::Tensor> results[2];
    for (int run = 0; run < 2; ++run) {
      at::set_num_threads(run == 0 ? 1 : 3);
      const Inputs in = leaves(x, at::kDouble);
      // One process when n = N: the same tensors as local and all.
      const bool one = p.n == p.N;
      at::Tensor loss =
          fused_symmetric_infonce(in.text_local, one ? in.text_local : in.text_all, in.video_local,
                                  one ? in.video_local : in.video_all, in.scale, p.offset, p.tile);
      loss.backward();
      results[run] = {loss.detach(), in.text_local.grad(), in.video_local.grad(), in.scale.grad()};
    }
    for (size_t k = 0; k < results[0].size(); ++k) {
      EXPECT_LE(relative_error(results[1][k], results[0][k], 1e-3), 1e-12) << describe(p) << " output " << k;
    }
  }
  at::set_num_threads(threads);
}

TEST(FusedContrastive, EvaluationWithoutGradModeGivesTheSameLoss) {
  vimo::testing::seed_torch();
  const Problem p{10, 30, 16, 10, 4};
  const Inputs x = leaves(random_inputs(p, kInitialScale), at::kDouble);
  const at::Tensor trained = fused_loss(x, p);
  at::Tensor evaluated;
  {
    at::NoGradGuard no_grad;
    evaluated = fused_loss(x, p);
  }
  EXPECT_FALSE(evaluated.requires_grad());
  EXPECT_EQ(evaluated.item<double>(), trained.item<double>());
}

}  // namespace
