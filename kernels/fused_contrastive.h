// Defines the fused, two-pass symmetric InfoNCE of Gemini-MVR on CPU and CUDA (DESIGN.md, "The two losses"):
// the same loss as kernels::symmetric_infonce, on single-branch scores (stages action and object) and on the
// router's two-branch fused score (stage router), computed from the embeddings in strips of rows so the
// [n, N] score matrix is never materialized (beyond a cache the size of the inputs). See Note [Two-pass
// symmetric InfoNCE] in fused_contrastive.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace vimo::kernels {

// L = ( CE_rows(scale · text_local · video_allᵀ) + CE_rows(scale · video_local · text_allᵀ) ) / 2
// with the positive of local row i at column positive_offset + i, i.e. exactly
//   symmetric_infonce(scale * text_local.mm(video_all.t()), scale * video_local.mm(text_all.t()), offset).
//   text_local  [n, D]  this rank's caption embeddings (rows of the text→video direction)
//   text_all    [N, D]  every rank's captions (columns of video→text; all_gather_with_grad in DP)
//   video_local [n, D]  this rank's video embeddings (rows of video→text)
//   video_all   [N, D]  every rank's videos (columns of text→video)
//   scale       scalar tensor (0-dim or one element), e.g. exp(τ) with grad or the fixed action scale 100
//   tile        rows per strip, ≥ 1 (a strip spans all N columns), or 0: chosen for the device (256 on CPU;
//               on CUDA enough rows for 4 Mi scores, at least 256: Note [Strips on CUDA] in the .cpp);
//               memory beyond the inputs and their gradients is O((n + N) · D) plus O(tile · N + N · D) per
//               thread
// Differentiable w.r.t. the four embeddings and `scale` (a custom autograd function); the gradients are
// computed in the forward pass when autograd will need them (so double backward, create_graph=true, is
// refused rather than silently missing its second-order terms). In one process pass the same tensor as local
// and all (the identical tensor, not a copy): then one score matrix serves both directions (3 to 4 matrix
// products instead of 8) and autograd sums both contributions. CPU or CUDA tensors (CUDA when built with it).
// Inputs are float32, float64 or bfloat16, all of one dtype; float32/bfloat16 accumulate in float32, float64
// in float64. Embeddings are expected L2-normalized (not required: any values give the formula above).
at::Tensor fused_symmetric_infonce(const at::Tensor& text_local, const at::Tensor& text_all,
                                   const at::Tensor& video_local, const at::Tensor& video_all,
                                   const at::Tensor& scale, int64_t positive_offset, int64_t tile = 0);

// The Gemini-MVR router-stage loss: the same symmetric InfoNCE on the fused score
//   S(t, v) = w_act(v) · action_scale · ⟨p_t, a_v⟩ + w_obj(v) · object_scale · ⟨g_t, o_v⟩
// i.e. exactly what GeminiMVR::contrastive_loss computes in the router stage:
//   symmetric_infonce(fuse_scores(s_act(p_local, a_all), s_obj(g_local, o_all), router_all, false),
//                     fuse_scores(s_act(p_all, a_local), s_obj(g_all, o_local), router_local, false).t(),
//                     offset)
// with s_act(x, y) = action_scale · x · yᵀ and s_obj(x, y) = object_scale · x · yᵀ. Every tensor may require
// grad (in the router stage only the router weights and perhaps object_scale do); n local rows, N gathered
// rows, D_act and D_obj the branch widths.
struct GeminiInfoNCEInputs {
  at::Tensor text_action_local, text_action_all;    // p: [n, D_act], [N, D_act]
  at::Tensor text_object_local, text_object_all;    // g: [n, D_obj], [N, D_obj]
  at::Tensor video_action_local, video_action_all;  // a: [n, D_act], [N, D_act]
  at::Tensor video_object_local, video_object_all;  // o: [n, D_obj], [N, D_obj]
  at::Tensor router_local, router_all;              // (w_act, w_obj) per video: [n, 2], [N, 2]
  at::Tensor action_scale, object_scale;            // one element each, e.g. 100 and exp(τ)
};
at::Tensor fused_gemini_infonce(const GeminiInfoNCEInputs& inputs, int64_t positive_offset, int64_t tile = 0);

}  // namespace vimo::kernels
