// Gemini-MVR: shapes and normalization, what each stage trains, masking of padding, and the loss on one
// process against the kernels' composition applied by hand.
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include "kernels/contrastive_loss.h"
#include "models/gemini_mvr.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"

namespace {
using vimo::models::GeminiConfig;
using vimo::models::GeminiMVR;
using vimo::models::GeminiStage;
GeminiConfig tiny() { return vimo::testing::tiny_gemini_config(); }

struct Inputs {
  at::Tensor text_ids, text_mask, frames, keypoints, frame_mask;
};

Inputs random_inputs(int64_t batch, const GeminiConfig& c) {
  Inputs in;
  at::Tensor lengths = at::randint(3, c.max_text_len + 1, {batch}, at::kLong);
  at::Tensor positions = at::arange(c.max_text_len, at::kLong).unsqueeze(0);
  in.text_mask = positions < lengths.unsqueeze(1);
  in.text_ids = at::randint(3, c.vocab_size, {batch, c.max_text_len}, at::kLong) * in.text_mask;
  at::Tensor frames_valid = at::randint(c.frames / 2, c.frames + 1, {batch}, at::kLong);
  in.frame_mask = at::arange(c.frames, at::kLong).unsqueeze(0) < frames_valid.unsqueeze(1);
  in.frames = at::randn({batch, c.frames, c.feature_dim}) * in.frame_mask.unsqueeze(2);
  in.keypoints = at::randn({batch, c.frames, c.joints, 3}) * in.frame_mask.view({batch, c.frames, 1, 1});
  return in;
}

TEST(GeminiMVR, EmbeddingsAreUnitVectorsOfSizeD) {
  vimo::testing::seed_torch();
  GeminiMVR model(tiny());
  model->set_stage(GeminiStage::Router);
  Inputs in = random_inputs(5, tiny());
  auto texts = model->encode_texts(in.text_ids, in.text_mask);
  auto videos = model->encode_videos(in.frames, in.keypoints, in.frame_mask);
  for (const at::Tensor& e :
       {texts.text_action, texts.text_object, videos.video_action, videos.video_object}) {
    ASSERT_EQ(e.sizes(), (at::IntArrayRef{5, tiny().embed_dim}));
    EXPECT_TRUE(at::allclose(e.norm(2, 1), at::ones({5}), 1e-5, 1e-5));
  }
  ASSERT_EQ(videos.router_weights.sizes(), (at::IntArrayRef{5, 2}));
  EXPECT_TRUE(at::allclose(videos.router_weights.sum(1), at::ones({5}), 1e-6, 1e-6));
}

TEST(GeminiMVR, EachStageTrainsOnlyItsParameters) {
  GeminiMVR model(tiny());
  const std::map<GeminiStage, std::vector<std::string>> trains = {
      {GeminiStage::Action, {"text_action.", "video_action."}},
      {GeminiStage::Object, {"text_object.", "video_object.", "logit_scale"}},
      {GeminiStage::Router, {"router."}}};
  for (const auto& [stage, prefixes] : trains) {
    model->set_stage(stage);
    for (const auto& item : model->named_parameters()) {
      bool expected = false;
      for (const std::string& prefix : prefixes) expected |= item.key().rfind(prefix, 0) == 0;
      EXPECT_EQ(item.value().requires_grad(), expected)
          << vimo::models::stage_name(stage) << " " << item.key();
    }
  }
}

TEST(GeminiMVR, GradientsReachOnlyTrainedParameters) {
  vimo::testing::seed_torch();
  GeminiMVR model(tiny());
  Inputs in = random_inputs(4, tiny());
  for (GeminiStage stage : {GeminiStage::Action, GeminiStage::Object, GeminiStage::Router}) {
    model->set_stage(stage);
    for (auto& p : model->parameters()) p.mutable_grad() = at::Tensor();
    auto texts = model->encode_texts(in.text_ids, in.text_mask);
    auto videos = model->encode_videos(in.frames, in.keypoints, in.frame_mask);
    model->contrastive_loss(texts, videos, nullptr).backward();
    for (const auto& [name, p] : model->trainable_parameters()) {
      ASSERT_TRUE(p.grad().defined()) << name;
      EXPECT_GT(p.grad().abs().sum().item<double>(), 0) << vimo::models::stage_name(stage) << " " << name;
    }
    for (const auto& item : model->named_parameters()) {
      if (!item.value().requires_grad()) {
        EXPECT_FALSE(item.value().grad().defined()) << item.key();
      }
    }
  }
}

TEST(GeminiMVR, PaddingDoesNotChangeEmbeddings) {
  vimo::testing::seed_torch();
  GeminiConfig c = tiny();
  GeminiMVR model(c);
  model->set_stage(GeminiStage::Router);
  at::NoGradGuard no_grad;
  Inputs in = random_inputs(4, c);
  in.text_mask.index_put_({at::indexing::Slice(), c.max_text_len - 1},
                          false);                                          // at least one pad per caption
  in.frame_mask.index_put_({at::indexing::Slice(), c.frames - 1}, false);  // at least one padded frame
  auto texts = model->encode_texts(in.text_ids * in.text_mask, in.text_mask);
  auto videos = model->encode_videos(in.frames, in.keypoints, in.frame_mask);
  // Garbage in the padded positions must not leak into any embedding.
  at::Tensor text_noise =
      at::randint(3, c.vocab_size, in.text_ids.sizes(), at::kLong) * in.text_mask.logical_not();
  at::Tensor frame_pad = in.frame_mask.logical_not();
  auto texts2 = model->encode_texts(in.text_ids * in.text_mask + text_noise, in.text_mask);
  auto videos2 = model->encode_videos(
      in.frames + at::randn(in.frames.sizes()) * frame_pad.unsqueeze(2) * 100,
      in.keypoints + at::randn(in.keypoints.sizes()) * frame_pad.view({4, c.frames, 1, 1}) * 100,
      in.frame_mask);
  EXPECT_TRUE(at::allclose(texts.text_action, texts2.text_action, 1e-5, 1e-6));
  EXPECT_TRUE(at::allclose(texts.text_object, texts2.text_object, 1e-5, 1e-6));
  EXPECT_TRUE(at::allclose(videos.video_action, videos2.video_action, 1e-5, 1e-6));
  EXPECT_TRUE(at::allclose(videos.video_object, videos2.video_object, 1e-5, 1e-6));
}

TEST(GeminiMVR, RouterLossIsSymmetricInfoNCEOfFusedScores) {
  vimo::testing::seed_torch();
  GeminiConfig c = tiny();
  GeminiMVR model(c);
  model->to(at::kDouble);
  model->set_stage(GeminiStage::Router);
  Inputs in = random_inputs(6, c);
  auto texts = model->encode_texts(in.text_ids, in.text_mask);
  auto videos = model->encode_videos(in.frames.to(at::kDouble), in.keypoints.to(at::kDouble), in.frame_mask);
  const double loss = model->contrastive_loss(texts, videos, nullptr).item<double>();
  // By hand from DESIGN.md: s_act = 100 cos, s_obj = exp(min(τ, ln 100)) cos (τ as stored: float32-rounded
  // init), S = w_act s_act + w_obj s_obj.
  at::Tensor s_act = 100.0 * texts.text_action.matmul(videos.video_action.t());
  at::Tensor s_obj = std::exp(std::min(model->logit_scale().item<double>(), c.logit_scale_max)) *
                     texts.text_object.matmul(videos.video_object.t());
  at::Tensor w = videos.router_weights;  // [6, 2], per video (column)
  at::Tensor S = w.select(1, 0).unsqueeze(0) * s_act + w.select(1, 1).unsqueeze(0) * s_obj;
  at::Tensor targets = at::arange(6, at::kLong);
  const double expected = 0.5 * (at::cross_entropy_loss(S, targets).item<double>() +
                                 at::cross_entropy_loss(S.t(), targets).item<double>());
  EXPECT_NEAR(loss, expected, 1e-10);
}

// The learnable log-scale τ and its bound ln 100 (DESIGN.md), as in the paper's code: the scores use e^τ as
// it is, and clamp_logit_scale() (after every optimizer step, and after weights load) sets τ ← min(τ, ln
// 100). A clamp in the forward pass instead passes no gradient at or above its bound (LibTorch's clamp_max
// backward is 0 at equality too), so τ, once there, could never come back down. Here τ is pushed above the
// bound, clamped, and then must train: the loss and dL/dτ in the object stage (τ trains) and the loss in
// the router stage (τ frozen) against plain LibTorch on the same embeddings detached into leaves, with the
// scale e^(ln 100) = 100 as a leaf, dL/dτ = e^τ · dL/d(e^τ). Float64; within 1e-10 (the fused kernel sums in
// another order, ~1e-14 relative).
TEST(GeminiMVR, TheLogScaleIsClampedAfterStepsAndTrainsAtItsBound) {
  vimo::testing::seed_torch();
  GeminiConfig c = tiny();
  GeminiMVR model(c);
  model->to(at::kDouble);
  {
    at::NoGradGuard no_grad;
    model->logit_scale().fill_(c.logit_scale_max + 0.5);
  }
  model->clamp_logit_scale();
  EXPECT_EQ(model->logit_scale().item<double>(), c.logit_scale_max);
  Inputs in = random_inputs(6, c);
  const at::Tensor targets = at::arange(6, at::kLong);
  auto symmetric_cross_entropy = [&](const at::Tensor& S) {  // S [captions, videos]
    return 0.5 * (at::cross_entropy_loss(S, targets) + at::cross_entropy_loss(S.t(), targets));
  };
  // Object stage: τ trains.
  model->set_stage(GeminiStage::Object);
  ASSERT_TRUE(model->logit_scale().requires_grad());
  auto texts = model->encode_texts(in.text_ids, in.text_mask);
  auto videos = model->encode_videos(in.frames.to(at::kDouble), in.keypoints.to(at::kDouble), in.frame_mask);
  const at::Tensor loss = model->contrastive_loss(texts, videos, nullptr);
  const std::vector<at::Tensor> grads =
      torch::autograd::grad({loss}, {texts.text_object, videos.video_object, model->logit_scale()});
  const at::Tensor t = texts.text_object.detach().requires_grad_(),
                   v = videos.video_object.detach().requires_grad_();
  const at::Tensor scale = at::full({}, std::exp(c.logit_scale_max), at::kDouble).requires_grad_();
  const at::Tensor expected = symmetric_cross_entropy(scale * t.matmul(v.t()));
  expected.backward();
  EXPECT_NEAR(loss.item<double>(), expected.item<double>(), 1e-10);
  EXPECT_LE((grads[0] - t.grad()).abs().max().item<double>(), 1e-10 * t.grad().abs().max().item<double>());
  EXPECT_LE((grads[1] - v.grad()).abs().max().item<double>(), 1e-10 * v.grad().abs().max().item<double>());
  const double expected_tau_grad = std::exp(c.logit_scale_max) * scale.grad().item<double>();
  ASSERT_NE(expected_tau_grad, 0.0);
  EXPECT_NEAR(grads[2].item<double>(), expected_tau_grad, 1e-10 * std::abs(expected_tau_grad))
      << "dL/dτ at τ = ln 100";
  // Router stage: the fused score uses the same scale.
  model->set_stage(GeminiStage::Router);
  texts = model->encode_texts(in.text_ids, in.text_mask);
  videos = model->encode_videos(in.frames.to(at::kDouble), in.keypoints.to(at::kDouble), in.frame_mask);
  const at::Tensor w = videos.router_weights;  // [6, 2] per video (column)
  const at::Tensor S =
      w.select(1, 0).unsqueeze(0) * (c.action_scale * texts.text_action.matmul(videos.video_action.t())) +
      w.select(1, 1).unsqueeze(0) *
          (std::exp(c.logit_scale_max) * texts.text_object.matmul(videos.video_object.t()));
  EXPECT_NEAR(model->contrastive_loss(texts, videos, nullptr).item<double>(),
              symmetric_cross_entropy(S).item<double>(), 1e-10);
  // Below the bound the clamp leaves τ alone.
  {
    at::NoGradGuard no_grad;
    model->logit_scale().fill_(c.logit_scale_max - 1);
  }
  model->clamp_logit_scale();
  EXPECT_EQ(model->logit_scale().item<double>(), c.logit_scale_max - 1);
}

// The action branch's residual skips the frame positions, as in the paper's code: out = T(h + pos) + h.
// With the temporal transformer's output forced to 0 (its final LayerNorm's weight and bias zeroed), the
// embedding is the normalized masked mean of h alone, so new positions must leave it bit for bit the same;
// with the residual taken after the positions (h + pos + T(h + pos)) they moved it by ~0.04.
TEST(GeminiMVR, ActionResidualSkipsTheFramePositions) {
  vimo::testing::seed_torch();
  GeminiConfig c = tiny();
  GeminiMVR model(c);
  model->set_stage(GeminiStage::Action);
  const auto parameters = model->named_parameters();
  {
    at::NoGradGuard no_grad;
    parameters["video_action.temporal.final_norm.weight"].zero_();
    parameters["video_action.temporal.final_norm.bias"].zero_();
  }
  const Inputs in = random_inputs(4, c);
  const at::Tensor before =
      model->encode_videos(in.frames, in.keypoints, in.frame_mask).video_action.detach();
  {
    at::NoGradGuard no_grad;
    at::Tensor positions = parameters["video_action.temporal_positions"];
    positions.add_(at::randn_like(positions));
  }
  const at::Tensor after = model->encode_videos(in.frames, in.keypoints, in.frame_mask).video_action.detach();
  EXPECT_TRUE(at::equal(before, after)) << "max difference " << (before - after).abs().max().item<double>();
}

}  // namespace
