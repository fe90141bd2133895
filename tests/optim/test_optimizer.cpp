// AdamW against LibTorch's own torch::optim::AdamW (an independent implementation), the schedule
// against its closed form, clipping against a float64 norm, and the state round trip.
#include <gtest/gtest.h>
#include <torch/optim/adamw.h>

#include <cmath>

#include "tests/random_seed.h"
#include "trainer/optimizer.h"

namespace {
using vimo::trainer::AdamW;

TEST(AdamW, MatchesTorchOptimAdamWStepForStep) {
  vimo::testing::seed_torch();
  std::vector<at::Tensor> ours = {at::randn({5, 3}, at::kDouble), at::randn({7}, at::kDouble)};
  std::vector<at::Tensor> theirs;
  std::vector<std::pair<std::string, at::Tensor>> named;
  for (size_t i = 0; i < ours.size(); ++i) {
    ours[i].requires_grad_();
    theirs.push_back(ours[i].detach().clone().requires_grad_());
    named.emplace_back("p" + std::to_string(i), ours[i]);
  }
  vimo::trainer::AdamWOptions options{0.9, 0.95, 1e-8, 0.1};
  AdamW optimizer(named, options, /*decay_all=*/true);
  torch::optim::AdamW reference(
      theirs, torch::optim::AdamWOptions(1e-3).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.1));
  for (int step = 1; step <= 6; ++step) {
    const double lr = 1e-2 / step;  // a changing learning rate, as the schedule gives
    static_cast<torch::optim::AdamWOptions&>(reference.param_groups()[0].options()).lr(lr);
    for (size_t i = 0; i < ours.size(); ++i) {
      at::Tensor grad = at::randn(ours[i].sizes(), at::kDouble);
      ours[i].mutable_grad() = grad.clone();
      theirs[i].mutable_grad() = grad.clone();
    }
    optimizer.step(lr);
    reference.step();
    for (size_t i = 0; i < ours.size(); ++i) {
      // float64: the two differ only in the order of the bias corrections, ~1e-16 relative per step.
      EXPECT_TRUE(at::allclose(ours[i], theirs[i], 1e-12, 1e-14)) << "step " << step << " param " << i;
    }
  }
  EXPECT_EQ(optimizer.steps_taken(), 6);
}

TEST(AdamW, NoDecayForVectorsByDefault) {
  at::Tensor matrix = at::ones({2, 2}, at::kDouble).requires_grad_(),
             vector = at::ones({2}, at::kDouble).requires_grad_();
  AdamW optimizer({{"m", matrix}, {"v", vector}}, {0.9, 0.999, 1e-8, 0.5});
  matrix.mutable_grad() = at::zeros({2, 2}, at::kDouble);
  vector.mutable_grad() = at::zeros({2}, at::kDouble);
  optimizer.step(0.1);  // zero gradient: only decay moves a parameter
  EXPECT_TRUE(at::allclose(matrix, at::full({2, 2}, 1 - 0.1 * 0.5, at::kDouble)));
  EXPECT_TRUE(at::equal(vector, at::ones({2}, at::kDouble)));
}

TEST(AdamW, StateRoundTripContinuesIdentically) {
  vimo::testing::seed_torch();
  at::Tensor a = at::randn({4, 4}).requires_grad_(), b = a.detach().clone().requires_grad_();
  AdamW first({{"w", a}}, {}), second({{"w", b}}, {});
  std::vector<at::Tensor> grads;
  for (int i = 0; i < 5; ++i) grads.push_back(at::randn({4, 4}));
  for (int i = 0; i < 3; ++i) {
    a.mutable_grad() = grads[i].clone();
    first.step(1e-2);
  }
  at::NoGradGuard no_grad;
  b.copy_(a);
  std::map<std::string, at::Tensor> saved;
  for (auto& [k, v] : first.state_tensors()) saved[k] = v.clone();
  second.load_state_tensors(saved, first.steps_taken());
  for (int i = 3; i < 5; ++i) {
    a.mutable_grad() = grads[i].clone();
    b.mutable_grad() = grads[i].clone();
    first.step(1e-2);
    second.step(1e-2);
  }
  EXPECT_TRUE(at::equal(a, b));  // bitwise: same state, same ops
}

TEST(Schedule, WarmupThenCosineToFloor) {
  using vimo::trainer::warmup_cosine_lr;
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(1, 100, 10, 1.0, 0.1), 0.1);
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(10, 100, 10, 1.0, 0.1), 1.0);
  EXPECT_NEAR(warmup_cosine_lr(55, 100, 10, 1.0, 0.1), 0.1 + 0.9 * 0.5, 1e-12);  // halfway through the cosine
  EXPECT_NEAR(warmup_cosine_lr(100, 100, 10, 1.0, 0.1), 0.1, 1e-12);
  for (int s = 11; s < 100; ++s)
    EXPECT_LT(warmup_cosine_lr(s + 1, 100, 10, 1.0, 0.1), warmup_cosine_lr(s, 100, 10, 1.0, 0.1));
}

TEST(Clip, ScalesToMaxNormAndReportsTheNormBefore) {
  vimo::testing::seed_torch();
  std::vector<at::Tensor> params = {at::zeros({3, 3}).requires_grad_(), at::zeros({5}).requires_grad_()};
  params[0].mutable_grad() = at::randn({3, 3}) * 10;
  params[1].mutable_grad() = at::randn({5}) * 10;
  const double expected = std::sqrt(params[0].grad().to(at::kDouble).pow(2).sum().item<double>() +
                                    params[1].grad().to(at::kDouble).pow(2).sum().item<double>());
  const double norm = vimo::trainer::clip_gradients(params, 1.0);
  EXPECT_NEAR(norm, expected, 1e-5 * expected);
  const double after =
      std::sqrt(params[0].grad().pow(2).sum().item<double>() + params[1].grad().pow(2).sum().item<double>());
  EXPECT_NEAR(after, 1.0, 1e-5);
  EXPECT_NEAR(vimo::trainer::clip_gradients(params, 0.0), after, 1e-6);  // 0 = report only
}

}  // namespace
