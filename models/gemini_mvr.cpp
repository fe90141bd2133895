// Gemini-MVR encoders, stages and contrastive loss (see gemini_mvr.h).
#include "models/gemini_mvr.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <cmath>
#include <stdexcept>

#include "kernels/contrastive_loss.h"
#include "kernels/fused_contrastive.h"

namespace vimo::models {
namespace {

at::Tensor normalize(const at::Tensor& x) { return x / x.norm(2, -1, true).clamp_min(1e-6); }

at::Tensor make_positions(torch::nn::Module& module, const std::string& name, int64_t count, int64_t width) {
  return module.register_parameter(name, at::randn({count, width}) * 0.02);
}

// Gathers every defined field of `local` from all ranks along dim 0, keeping autograd.
GeminiEmbeddings gather(const GeminiEmbeddings& local, const std::shared_ptr<comm::Communicator>& comm) {
  auto one = [&](const at::Tensor& t) {
    return t.defined() ? comm::all_gather_with_grad(t, comm) : at::Tensor();
  };
  return {one(local.text_action), one(local.text_object), one(local.video_action), one(local.video_object),
          one(local.router_weights)};
}

}  // namespace

GeminiStage parse_stage(const std::string& name) {
  if (name == "action") return GeminiStage::Action;
  if (name == "object") return GeminiStage::Object;
  if (name == "router") return GeminiStage::Router;
  throw std::invalid_argument("unknown Gemini-MVR stage '" + name + "' (expected action, object or router)");
}

const char* stage_name(GeminiStage stage) {
  switch (stage) {
    case GeminiStage::Action:
      return "action";
    case GeminiStage::Object:
      return "object";
    case GeminiStage::Router:
      return "router";
  }
  return "?";
}

TextEncoderImpl::TextEncoderImpl(const GeminiConfig& c) {
  token_embedding_ = register_module("token_embedding", torch::nn::Embedding(c.vocab_size, c.width));
  positions_ = make_positions(*this, "positions", c.max_text_len, c.width);
  transformer_ = register_module("transformer", Transformer(c.width, c.heads, c.text_layers));
  projection_ = register_module(
      "projection", torch::nn::Linear(torch::nn::LinearOptions(c.width, c.embed_dim).bias(false)));
}

at::Tensor TextEncoderImpl::forward(const at::Tensor& text_ids, const at::Tensor& text_mask) {
  const int64_t length = text_ids.size(1);
  at::Tensor h = token_embedding_->forward(text_ids) + positions_.narrow(0, 0, length);  // [B, L, W]
  // Causal attention alone keeps padding out: every real token precedes the padding.
  h = transformer_->forward(h, at::Tensor(), /*causal=*/true);
  at::Tensor last = text_mask.sum(1).clamp_min(1) - 1;  // [B] position of <eot>
  at::Tensor pooled = h.gather(1, last.view({-1, 1, 1}).expand({-1, 1, h.size(2)})).squeeze(1);  // [B, W]
  return normalize(projection_->forward(pooled));
}

ObjectVideoEncoderImpl::ObjectVideoEncoderImpl(const GeminiConfig& c) {
  input_ = register_module("input", torch::nn::Linear(c.feature_dim, c.width));
  positions_ = make_positions(*this, "positions", c.frames, c.width);
  transformer_ = register_module("transformer", Transformer(c.width, c.heads, c.video_layers));
  projection_ = register_module(
      "projection", torch::nn::Linear(torch::nn::LinearOptions(c.width, c.embed_dim).bias(false)));
}

at::Tensor ObjectVideoEncoderImpl::forward(const at::Tensor& frames, const at::Tensor& frame_mask) {
  at::Tensor h = input_->forward(frames) + positions_.narrow(0, 0, frames.size(1));  // [B, F, W]
  h = transformer_->forward(h, frame_mask, /*causal=*/false);
  return normalize(projection_->forward(masked_mean(h, frame_mask)));
}

ActionVideoEncoderImpl::ActionVideoEncoderImpl(const GeminiConfig& c) {
  joint_input_ = register_module("joint_input", torch::nn::Linear(3, c.keypoint_width));
  joint_positions_ = make_positions(*this, "joint_positions", c.joints, c.keypoint_width);
  frame_positions_ = make_positions(*this, "frame_positions", c.frames, c.keypoint_width);
  joint_blocks_ = register_module("joint_blocks", torch::nn::ModuleList());
  frame_blocks_ = register_module("frame_blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.spatio_temporal_layers; ++i) {
    joint_blocks_->push_back(TransformerBlock(c.keypoint_width, c.heads));
    frame_blocks_->push_back(TransformerBlock(c.keypoint_width, c.heads));
  }
  flatten_joints_ =
      register_module("flatten_joints", torch::nn::Linear(c.joints * c.keypoint_width, c.embed_dim));
  temporal_positions_ = make_positions(*this, "temporal_positions", c.frames, c.embed_dim);
  temporal_ = register_module("temporal", Transformer(c.embed_dim, c.heads, c.temporal_layers));
}

at::Tensor ActionVideoEncoderImpl::forward(const at::Tensor& keypoints, const at::Tensor& frame_mask) {
  const int64_t batch = keypoints.size(0), frames = keypoints.size(1), joints = keypoints.size(2);
  at::Tensor h = joint_input_->forward(keypoints) + joint_positions_.view({1, 1, joints, -1}) +
                 frame_positions_.narrow(0, 0, frames).view({1, frames, 1, -1});  // [B, F, J, Wk]
  const int64_t width = h.size(3);
  // Frame attention sees only valid frames: the mask repeats for each joint's sequence.
  at::Tensor joint_sequence_mask =
      frame_mask.unsqueeze(1).expand({batch, joints, frames}).reshape({batch * joints, frames});
  for (size_t i = 0; i < joint_blocks_->size(); ++i) {
    h = joint_blocks_[i]->as<TransformerBlock>()->forward(h.reshape({batch * frames, joints, width}),
                                                          at::Tensor(), false);
    h = h.view({batch, frames, joints, width}).transpose(1, 2).reshape({batch * joints, frames, width});
    h = frame_blocks_[i]->as<TransformerBlock>()->forward(h, joint_sequence_mask, false);
    h = h.view({batch, joints, frames, width}).transpose(1, 2).contiguous();  // [B, F, J, Wk]
  }
  const at::Tensor per_frame =
      flatten_joints_->forward(h.reshape({batch, frames, joints * width}));  // [B, F, D]
  // The residual skips the positions, as in the paper's code (CLIP4Clip's seqTransf): out = T(h + pos) + h,
  // so no video-length-dependent mean of the position table enters the embedding.
  const at::Tensor x =
      per_frame + temporal_->forward(per_frame + temporal_positions_.narrow(0, 0, frames), frame_mask, false);
  return normalize(masked_mean(x, frame_mask));
}

GeminiMVRImpl::GeminiMVRImpl(const GeminiConfig& c) : config_(c) {
  text_action_ = register_module("text_action", TextEncoder(c));
  text_object_ = register_module("text_object", TextEncoder(c));
  video_action_ = register_module("video_action", ActionVideoEncoder(c));
  video_object_ = register_module("video_object", ObjectVideoEncoder(c));
  router_ = register_module("router", torch::nn::Linear(c.embed_dim, 2));
  logit_scale_ = register_parameter("logit_scale", at::full({}, c.logit_scale_init));
  set_stage(GeminiStage::Action);
}

void GeminiMVRImpl::set_stage(GeminiStage stage) {
  stage_ = stage;
  auto train = [](torch::nn::Module& m, bool on) {
    for (auto& p : m.parameters()) p.set_requires_grad(on);
  };
  train(*text_action_, stage == GeminiStage::Action);
  train(*video_action_, stage == GeminiStage::Action);
  train(*text_object_, stage == GeminiStage::Object);
  train(*video_object_, stage == GeminiStage::Object);
  logit_scale_.set_requires_grad(stage == GeminiStage::Object);
  train(*router_, stage == GeminiStage::Router);
}

GeminiEmbeddings GeminiMVRImpl::encode_texts(const at::Tensor& text_ids, const at::Tensor& text_mask) {
  GeminiEmbeddings out;
  if (stage_ != GeminiStage::Object) out.text_action = text_action_->forward(text_ids, text_mask);
  if (stage_ != GeminiStage::Action) out.text_object = text_object_->forward(text_ids, text_mask);
  return out;
}

GeminiEmbeddings GeminiMVRImpl::encode_videos(const at::Tensor& frames, const at::Tensor& keypoints,
                                              const at::Tensor& frame_mask) {
  GeminiEmbeddings out;
  if (stage_ != GeminiStage::Object) out.video_action = video_action_->forward(keypoints, frame_mask);
  if (stage_ != GeminiStage::Action) out.video_object = video_object_->forward(frames, frame_mask);
  if (stage_ == GeminiStage::Router) {
    // The router reads the video's action embedding only (DESIGN.md).
    out.router_weights = at::softmax(router_->forward(out.video_action), /*dim=*/1);  // [B, 2]
  }
  return out;
}

void GeminiMVRImpl::clamp_logit_scale() {
  at::NoGradGuard no_grad;
  logit_scale_.clamp_max_(config_.logit_scale_max);
}

at::Tensor GeminiMVRImpl::score(const GeminiEmbeddings& texts, const GeminiEmbeddings& videos) {
  at::Tensor s_act, s_obj;
  if (stage_ != GeminiStage::Object) {
    s_act = config_.action_scale * at::matmul(texts.text_action, videos.video_action.t());  // [n_t, n_v]
  }
  if (stage_ != GeminiStage::Action) {
    at::Tensor scale = logit_scale_.exp();  // τ ≤ logit_scale_max: see clamp_logit_scale()
    s_obj = scale * at::matmul(texts.text_object, videos.video_object.t());  // [n_t, n_v]
  }
  if (stage_ == GeminiStage::Action) return s_act;
  if (stage_ == GeminiStage::Object) return s_obj;
  return kernels::fuse_scores(s_act, s_obj, videos.router_weights, /*weights_per_row=*/false);
}

at::Tensor GeminiMVRImpl::contrastive_loss(const GeminiEmbeddings& texts, const GeminiEmbeddings& videos,
                                           const std::shared_ptr<comm::Communicator>& comm) {
  const bool distributed = comm && comm->size() > 1;
  const int64_t local = (texts.text_action.defined() ? texts.text_action : texts.text_object).size(0);
  const int64_t offset = distributed ? comm->rank() * local : 0;
  const GeminiEmbeddings all_texts = distributed ? gather(texts, comm) : texts;
  const GeminiEmbeddings all_videos = distributed ? gather(videos, comm) : videos;
  // The fused kernel computes exactly
  //   symmetric_infonce(score(texts, all_videos), score(all_texts, videos).t(), offset)
  // without an [n, N] matrix (kernels/fused_contrastive.h). In one process all_* are the very same tensors as
  // the local ones, which lets it serve both directions from one score matrix.
  const at::Tensor any_embedding = texts.text_action.defined() ? texts.text_action : texts.text_object;
  const at::Tensor action_scale = at::scalar_tensor(config_.action_scale, any_embedding.options());
  at::Tensor object_scale;
  if (stage_ != GeminiStage::Action) object_scale = logit_scale_.exp();
  switch (stage_) {
    case GeminiStage::Action:
      return kernels::fused_symmetric_infonce(texts.text_action, all_texts.text_action, videos.video_action,
                                              all_videos.video_action, action_scale, offset);
    case GeminiStage::Object:
      return kernels::fused_symmetric_infonce(texts.text_object, all_texts.text_object, videos.video_object,
                                              all_videos.video_object, object_scale, offset);
    case GeminiStage::Router:
      break;
  }
  kernels::GeminiInfoNCEInputs inputs;
  inputs.text_action_local = texts.text_action;
  inputs.text_action_all = all_texts.text_action;
  inputs.text_object_local = texts.text_object;
  inputs.text_object_all = all_texts.text_object;
  inputs.video_action_local = videos.video_action;
  inputs.video_action_all = all_videos.video_action;
  inputs.video_object_local = videos.video_object;
  inputs.video_object_all = all_videos.video_object;
  inputs.router_local = videos.router_weights;
  inputs.router_all = all_videos.router_weights;
  inputs.action_scale = action_scale;
  inputs.object_scale = object_scale;
  return kernels::fused_gemini_infonce(inputs, offset);
}

std::vector<std::pair<std::string, at::Tensor>> GeminiMVRImpl::trainable_parameters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& item : named_parameters(/*recurse=*/true)) {
    if (item.value().requires_grad()) out.emplace_back(item.key(), item.value());
  }
  return out;
}

}  // namespace vimo::models
