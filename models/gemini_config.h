// Defines the sizes of the Gemini-MVR model (DESIGN.md, "Models"). Tiny in configs/demo, paper-scale
// elsewhere. The trainer's config (trainer/config.h) uses this struct as its `model` section.
#pragma once

#include <cstdint>

namespace vimo::models {

// Sizes of the Gemini-MVR model (DESIGN.md, "Models"). Tiny in configs/demo, paper-scale elsewhere.
struct GeminiConfig {
  int64_t vocab_size = 64;    // text vocabulary (must cover the dataset's vocab.txt)
  int64_t max_text_len = 12;  // L
  int64_t frames = 16;        // F, max frames per video
  int64_t feature_dim = 32;   // Dv, per-frame visual feature size
  int64_t joints = 17;        // keypoint joints (H36M-17)
  int64_t embed_dim = 64;     // D, joint embedding space
  int64_t width = 64;         // transformer width of text and object-video encoders
  int64_t heads = 4;          // attention heads (must divide width, keypoint_width and embed_dim)
  int64_t text_layers = 2;
  int64_t video_layers = 2;            // object branch temporal transformer
  int64_t keypoint_width = 32;         // action branch spatio-temporal width (512 in the paper)
  int64_t spatio_temporal_layers = 1;  // pairs of (joint attention, frame attention) blocks
  int64_t temporal_layers = 2;  // action branch temporal transformer after flattening joints (4 in the paper)
  double action_scale = 100.0;  // fixed scale of s_act
  double logit_scale_init = 2.659260036932778;  // ln(1/0.07)
  double logit_scale_max = 4.605170185988092;   // ln(100)
};

}  // namespace vimo::models
