// Defines the Gemini Motion Video Retriever (DESIGN.md, "Models"): two text encoders, the object branch
// over per-frame visual features, the action branch over 2D keypoints, and the router; plus the stage
// logic (which parameters train) and the contrastive loss with negatives gathered from every DP rank.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "models/gemini_config.h"
#include "models/transformer.h"

namespace vimo::models {

enum class GeminiStage { Action, Object, Router };
GeminiStage parse_stage(const std::string& name);  // "action" | "object" | "router"; throws otherwise
const char* stage_name(GeminiStage stage);

// Token embedding + learned positions + causal transformer, pooled at the last real token (<eot>),
// projected to D and L2-normalized.
class TextEncoderImpl : public torch::nn::Module {
 public:
  explicit TextEncoderImpl(const GeminiConfig& config);
  at::Tensor forward(const at::Tensor& text_ids, const at::Tensor& text_mask);  // [B, L], [B, L] → [B, D]

 private:
  torch::nn::Embedding token_embedding_{nullptr};
  at::Tensor positions_;  // [L, W]
  Transformer transformer_{nullptr};
  torch::nn::Linear projection_{nullptr};
};
TORCH_MODULE(TextEncoder);

// Per-frame visual features → linear → frame positions → temporal transformer → masked mean → D.
class ObjectVideoEncoderImpl : public torch::nn::Module {
 public:
  explicit ObjectVideoEncoderImpl(const GeminiConfig& config);
  at::Tensor forward(const at::Tensor& frames, const at::Tensor& frame_mask);  // [B, F, Dv], [B, F] → [B, D]

 private:
  torch::nn::Linear input_{nullptr}, projection_{nullptr};
  at::Tensor positions_;  // [F, W]
  Transformer transformer_{nullptr};
};
TORCH_MODULE(ObjectVideoEncoder);

// 2D keypoints [B, F, J, 3] → per-joint embedding + joint and frame positions → alternating attention over
// joints and over frames → flatten joints → Linear(J·Wk → D) → frame positions → temporal transformer
// with a residual → masked mean → D.
class ActionVideoEncoderImpl : public torch::nn::Module {
 public:
  explicit ActionVideoEncoderImpl(const GeminiConfig& config);
  at::Tensor forward(const at::Tensor& keypoints, const at::Tensor& frame_mask);  // → [B, D]

 private:
  torch::nn::Linear joint_input_{nullptr}, flatten_joints_{nullptr};
  at::Tensor joint_positions_, frame_positions_, temporal_positions_;  // [J, Wk], [F, Wk], [F, D]
  torch::nn::ModuleList joint_blocks_, frame_blocks_;
  Transformer temporal_{nullptr};
};
TORCH_MODULE(ActionVideoEncoder);

// L2-normalized embeddings of a batch; a branch not computed for the stage is left undefined.
struct GeminiEmbeddings {
  at::Tensor text_action, text_object;    // [B, D] from θ_P and θ_G
  at::Tensor video_action, video_object;  // [B, D] from θ_A and θ_O
  at::Tensor router_weights;              // [B, 2] (w_act, w_obj) per video; router stage only
};

class GeminiMVRImpl : public torch::nn::Module {
 public:
  explicit GeminiMVRImpl(const GeminiConfig& config);

  // Freezes every parameter the stage does not train (DESIGN.md): action → θ_P, θ_A; object → θ_G, θ_O and
  // the logit scale τ; router → the router only.
  void set_stage(GeminiStage stage);
  GeminiStage stage() const { return stage_; }

  // Computes what the stage needs. Frozen branches run without autograd.
  GeminiEmbeddings encode_texts(const at::Tensor& text_ids, const at::Tensor& text_mask);
  GeminiEmbeddings encode_videos(const at::Tensor& frames, const at::Tensor& keypoints,
                                 const at::Tensor& frame_mask);

  // The stage's score matrix between captions (rows) and videos (columns) [n_t, n_v]:
  // action s_act, object s_obj, router S = w_act·s_act + w_obj·s_obj with the weights of each video.
  at::Tensor score(const GeminiEmbeddings& texts, const GeminiEmbeddings& videos);

  // Symmetric InfoNCE over the global batch: the local captions against every rank's videos and the local
  // videos against every rank's captions. `comm` may be null (single process).
  at::Tensor contrastive_loss(const GeminiEmbeddings& texts, const GeminiEmbeddings& videos,
                              const std::shared_ptr<comm::Communicator>& comm);

  // Parameters that train in the current stage, by name (sorted, as named_parameters gives them).
  std::vector<std::pair<std::string, at::Tensor>> trainable_parameters() const;
  at::Tensor logit_scale() const { return logit_scale_; }
  // τ ← min(τ, logit_scale_max): after each optimizer step and after weights load, as the paper's code does.
  // The scores use e^τ as it is: a clamp in the forward pass would pass no gradient at or above the bound,
  // and τ, once there, could never come back down.
  void clamp_logit_scale();

 private:
  GeminiConfig config_;
  GeminiStage stage_ = GeminiStage::Action;
  TextEncoder text_action_{nullptr}, text_object_{nullptr};
  ActionVideoEncoder video_action_{nullptr};
  ObjectVideoEncoder video_object_{nullptr};
  torch::nn::Linear router_{nullptr};
  at::Tensor logit_scale_;  // τ, scalar
};
TORCH_MODULE(GeminiMVR);

}  // namespace vimo::models
