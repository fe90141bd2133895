// Plain LibTorch composition of the Gemini-MVR contrastive loss (see contrastive_loss.h).
#include "kernels/contrastive_loss.h"

#include <stdexcept>
#include <string>

namespace vimo::kernels {

at::Tensor infonce_rows(const at::Tensor& scores, int64_t positive_offset) {
  if (scores.dim() != 2) throw std::invalid_argument("infonce_rows: scores must be [n, N]");
  const int64_t n = scores.size(0), N = scores.size(1);
  if (positive_offset < 0 || positive_offset + n > N) {
    throw std::invalid_argument("infonce_rows: positives [" + std::to_string(positive_offset) + ", " +
                                std::to_string(positive_offset + n) + ") fall outside " + std::to_string(N) +
                                " columns");
  }
  at::Tensor targets = at::arange(positive_offset, positive_offset + n, scores.options().dtype(at::kLong));
  at::Tensor log_probs = at::log_softmax(scores, /*dim=*/1);            // [n, N]
  return -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1).mean();  // scalar
}

at::Tensor symmetric_infonce(const at::Tensor& text_to_video, const at::Tensor& video_to_text,
                             int64_t positive_offset) {
  return (infonce_rows(text_to_video, positive_offset) + infonce_rows(video_to_text, positive_offset)) / 2;
}

// Note [The eager baseline computes S once]
// In one process the video→text scores are the transpose of the text→video scores, so the formula needs one
// product forward (S) and two backward (dL/dS · V and dL/dSᵀ · T): 3 products of N·N·D. A composition that
// builds S' = scale · V · Tᵀ as a product of its own (as OpenCLIP's world_size == 1 path does) makes 6, and a
// benchmark against it credits the fused kernel with the very identity it exploits (bench/README.md,
// "(2026-11-25) The eager baseline computed S twice").
// In data parallelism the two matrices really differ (local texts vs gathered videos, local videos vs
// gathered texts), and both products are needed.
at::Tensor eager_symmetric_infonce(const at::Tensor& text_local, const at::Tensor& text_all,
                                   const at::Tensor& video_local, const at::Tensor& video_all,
                                   const at::Tensor& scale, int64_t positive_offset) {
  const at::Tensor text_to_video = scale * at::mm(text_local, video_all.t());  // [n, N]
  if (text_local.is_same(text_all) && video_local.is_same(video_all)) {
    return symmetric_infonce(text_to_video, text_to_video.t(), positive_offset);
  }
  const at::Tensor video_to_text = scale * at::mm(video_local, text_all.t());  // [n, N]
  return symmetric_infonce(text_to_video, video_to_text, positive_offset);
}

at::Tensor fuse_scores(const at::Tensor& s_act, const at::Tensor& s_obj, const at::Tensor& video_weights,
                       bool weights_per_row) {
  // video_weights [V, 2] broadcast over the caption axis: columns (V = N) or rows (V = n).
  at::Tensor w_act = video_weights.select(1, 0), w_obj = video_weights.select(1, 1);  // [V]
  if (weights_per_row) {
    w_act = w_act.unsqueeze(1);  // [n, 1]
    w_obj = w_obj.unsqueeze(1);
  } else {
    w_act = w_act.unsqueeze(0);  // [1, N]
    w_obj = w_obj.unsqueeze(0);
  }
  return w_act * s_act + w_obj * s_obj;
}

}  // namespace vimo::kernels
