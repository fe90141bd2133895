// Defines the symmetric InfoNCE loss of Gemini-MVR as a plain LibTorch composition (DESIGN.md, "The two
// losses"). The fused, tiled CPU/CUDA kernels of the fused-kernels issue must match these functions.
#pragma once

#include <ATen/ATen.h>

namespace vimo::kernels {

// Mean cross-entropy of the rows of `scores` [n, N] whose positive for row i is column positive_offset + i
// (the local rows sit at that offset among the N gathered columns).
at::Tensor infonce_rows(const at::Tensor& scores, int64_t positive_offset);

// L = (CE over text→video rows + CE over video→text rows) / 2.
//   text_to_video [n, N]: local captions scored against every rank's videos
//   video_to_text [n, N]: local videos scored against every rank's captions
at::Tensor symmetric_infonce(const at::Tensor& text_to_video, const at::Tensor& video_to_text,
                             int64_t positive_offset);

// The same loss composed from the embeddings, as plain LibTorch writes it (the eager baseline the fused
// kernel is benchmarked against; Note [The eager baseline computes S once] in the .cpp):
//   symmetric_infonce(S, S', offset), S = scale · text_local · video_allᵀ [n, N],
//                                     S' = scale · video_local · text_allᵀ [n, N]
// where S' is Sᵀ (no product of its own) when text_local is text_all and video_local is video_all (the
// identical tensors, as in one process: fused_symmetric_infonce's condition too), and a second product
// otherwise. text_local, video_local [n, D]; text_all, video_all [N, D]; scale a scalar tensor. Returns the
// loss only, so that what autograd does not save is freed before backward.
at::Tensor eager_symmetric_infonce(const at::Tensor& text_local, const at::Tensor& text_all,
                                   const at::Tensor& video_local, const at::Tensor& video_all,
                                   const at::Tensor& scale, int64_t positive_offset);

// Gemini fused score S[i, j] = w[j, 0] * s_act[i, j] + w[j, 1] * s_obj[i, j]     (DESIGN.md)
//   s_act [n, N], s_obj [n, N]: branch scores; video_weights [N, 2]: router softmax of video j
// For the video→text direction pass the local videos' weights as [n, 2] and transposed = true: then
// S[i, j] = w[i, 0] * s_act[i, j] + w[i, 1] * s_obj[i, j] (row i is the video).
at::Tensor fuse_scores(const at::Tensor& s_act, const at::Tensor& s_obj, const at::Tensor& video_weights,
                       bool weights_per_row);

}  // namespace vimo::kernels
