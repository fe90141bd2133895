// Fused, tiled symmetric InfoNCE on CPU (see fused_contrastive.h).
//
// Note [Tiled symmetric InfoNCE]
// Each direction is a row-wise cross-entropy over logits S [n, N] that are a sum of branches
//   S = Σ_b s_b · (R_b · C_bᵀ) ⊙ W_b        R_b [n, D_b] rows, C_b [N, D_b] columns, s_b a scalar scale,
// W_b a weight per column [N] or per row [n] broadcast over the other axis, or 1. Single branch: text→video
// has R = text_local, C = video_all; video→text R = video_local, C = text_all. Gemini router stage: an action
// and an object branch weighted by the router softmax of the video (per column text→video, per row
// video→text), DESIGN.md "The two losses".
//   forward:  for each column tile [start, start + w): logits [n, w] from one matmul per branch, folded into
//             a running row max m and a running Σ exp(logit − m) (online softmax, Milakov & Gimelshein);
//             lse = m + log Σ. The positive logit S[i, offset + i] is a row-wise dot product, so no tile has
//             to look for it. loss_direction = mean_i (lse_i − positive_i); L = (loss_t2v + loss_v2t) / 2.
//   backward: dL/dS[i, j] = c · (softmax_ij − [j == offset + i]) with c = dL_out / (2n). The softmax part is
//             recomputed per tile from the saved lse (n values per direction): P = exp(S_tile − lse), and
//             with G_b = c · P ⊙ W_b and dots_b = R_b · C_b,tileᵀ
//               grad_R_b += s_b · G_b · C_b,tile    grad_C_b,tile += s_b · G_bᵀ · R_b    grad_s_b += Σ G_b ⊙
//               dots_b grad_W_b += s_b · (c · P ⊙ dots_b) summed over the axis W_b is broadcast along
//             and the one-hot part is applied once, outside the tile loop, on the n positive pairs.
// Memory beyond inputs and gradients: a few [n, tile] tiles per branch and O(n) vectors, never [n, N]. Tiles
// are visited in order and each matmul is one BLAS call, so results are deterministic for a given thread
// count. Accumulation is float32 for float32/bfloat16 inputs and float64 for float64 inputs.
#include "kernels/fused_contrastive.h"

#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace vimo::kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Where a branch's operands sit in the input list of one loss (see kSingleLayout, kGeminiLayout).
struct BranchSpec {
  int rows, columns, scale;
  int weights = -1;  // router weights [rows, 2] input, or −1 for none
  int weight_column = 0;
};

// Input lists and their branches, per direction. The names are those of the public functions' parameters.
struct Layout {
  std::vector<const char*> names;
  std::vector<BranchSpec> text_to_video, video_to_text;
};

const Layout kSingleLayout = {
    {"text_local", "text_all", "video_local", "video_all", "scale"}, {{0, 3, 4}}, {{2, 1, 4}}};
const Layout kGeminiLayout = {
    {"text_action_local", "text_action_all", "text_object_local", "text_object_all", "video_action_local",
     "video_action_all", "video_object_local", "video_object_all", "router_local", "router_all",
     "action_scale", "object_scale"},
    {{0, 5, 10, 9, 0}, {2, 7, 11, 9, 1}},  // captions against every video, weighted per column (video)
    {{4, 1, 10, 8, 0}, {6, 3, 11, 8, 1}},  // local videos against every caption, weighted per row (video)
};

const Layout& layout_for(bool gemini) { return gemini ? kGeminiLayout : kSingleLayout; }

std::string shape_of(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

std::string dtype_of(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

// Checks one input list against its layout; names the offending input, what was expected and what was found.
void check_inputs(const Layout& layout, at::TensorList inputs, int64_t positive_offset, int64_t tile) {
  const std::string where = "fused symmetric InfoNCE: ";
  auto name = [&](int index) { return std::string(layout.names[index]); };
  const at::Tensor& first = inputs[0];
  for (size_t k = 0; k < inputs.size(); ++k) {
    const at::Tensor& t = inputs[k];
    if (!t.defined()) throw std::invalid_argument(where + name(k) + " is an undefined tensor");
    if (!t.is_floating_point()) {
      throw std::invalid_argument(where + name(k) + " must be float32, float64 or bfloat16, got " +
                                  dtype_of(t));
    }
    if (t.device() != first.device()) {
      throw std::invalid_argument(where + name(k) + " is on " + t.device().str() + " but " + name(0) +
                                  " on " + first.device().str());
    }
  }
  const int64_t n = first.size(0), N = inputs[layout.text_to_video[0].columns].size(0);
  auto check_matrix = [&](int index, int64_t rows, int64_t columns) {
    const at::Tensor& t = inputs[index];
    const at::ScalarType type = t.scalar_type();
    if (type != at::kFloat && type != at::kDouble && type != at::kBFloat16) {
      throw std::invalid_argument(where + name(index) + " must be float32, float64 or bfloat16, got " +
                                  dtype_of(t));
    }
    if (type != first.scalar_type()) {
      throw std::invalid_argument(where + name(index) + " is " + dtype_of(t) + " but " + name(0) + " is " +
                                  dtype_of(first) + "; HINT: pass all embeddings in one dtype");
    }
    if (t.dim() != 2 || t.size(0) != rows || (columns >= 0 && t.size(1) != columns)) {
      throw std::invalid_argument(where + name(index) + " must be [" + std::to_string(rows) + ", " +
                                  (columns >= 0 ? std::to_string(columns) : std::string("D")) + "], got " +
                                  shape_of(t));
    }
  };
  if (first.dim() != 2 || n < 1) {
    throw std::invalid_argument(where + name(0) + " must be [n ≥ 1, D], got " + shape_of(first));
  }
  for (const auto* direction : {&layout.text_to_video, &layout.video_to_text}) {
    for (const BranchSpec& b : *direction) {
      check_matrix(b.rows, n, -1);
      check_matrix(b.columns, N, inputs[b.rows].size(1));
      if (inputs[b.scale].numel() != 1) {
        throw std::invalid_argument(where + name(b.scale) + " must be a tensor of one element, got " +
                                    shape_of(inputs[b.scale]));
      }
      if (b.weights >= 0) {
        check_matrix(b.weights, direction == &layout.text_to_video ? N : n, 2);
      }
    }
  }
  if (positive_offset < 0 || positive_offset + n > N) {
    throw std::invalid_argument(where + "positives [" + std::to_string(positive_offset) + ", " +
                                std::to_string(positive_offset + n) + ") fall outside " + std::to_string(N) +
                                " columns; HINT: positive_offset is rank · n in data parallelism, 0 alone");
  }
  if (tile < 1) throw std::invalid_argument(where + "tile must be ≥ 1, got " + std::to_string(tile));
}

// One branch of one direction, in the accumulation dtype (see Note [Tiled symmetric InfoNCE]).
struct Branch {
  at::Tensor rows;     // [n, D_b], contiguous
  at::Tensor columns;  // [N, D_b], contiguous
  double scale = 1;
  at::Tensor weights;  // [N] per column, [n] per row, or undefined (all ones)
  bool weights_per_row = false;
};

std::vector<Branch> make_branches(const std::vector<BranchSpec>& specs, const std::vector<at::Tensor>& inputs,
                                  const std::vector<double>& scales, bool weights_per_row) {
  std::vector<Branch> out;
  for (const BranchSpec& s : specs) {
    Branch b{inputs[s.rows], inputs[s.columns], scales[s.scale], at::Tensor(), weights_per_row};
    if (s.weights >= 0) b.weights = inputs[s.weights].select(1, s.weight_column).contiguous();
    out.push_back(b);
  }
  return out;
}

// The branch's weights for the tile columns [start, start + width), shaped to broadcast on [n, width].
at::Tensor tile_weights(const Branch& b, int64_t start, int64_t width) {
  return b.weights_per_row ? b.weights.unsqueeze(1) : b.weights.narrow(0, start, width).unsqueeze(0);
}

// The branch's weight of each row's positive pair [n].
at::Tensor positive_weights(const Branch& b, int64_t positive_offset) {
  return b.weights_per_row ? b.weights : b.weights.narrow(0, positive_offset, b.rows.size(0));
}

// ⟨rows_i, columns_{offset+i}⟩ [n], the raw positive dot products.
at::Tensor positive_dots(const Branch& b, int64_t positive_offset) {
  return (b.rows * b.columns.narrow(0, positive_offset, b.rows.size(0))).sum(1);
}

// Logits of the tile columns [start, start + width) [n, width]; `dots` receives each branch's raw
// rows · columns_tileᵀ when given (backward needs them).
at::Tensor tile_logits(const std::vector<Branch>& branches, int64_t start, int64_t width,
                       std::vector<at::Tensor>* dots) {
  at::Tensor logits;
  for (const Branch& b : branches) {
    at::Tensor dot = at::mm(b.rows, b.columns.narrow(0, start, width).t());  // [n, width]
    at::Tensor term = dots ? dot * b.scale : dot.mul_(b.scale);
    if (dots) dots->push_back(dot);
    if (b.weights.defined()) term.mul_(tile_weights(b, start, width));
    logits = logits.defined() ? logits.add_(term) : term;
  }
  return logits;
}

// Row-wise log-sum-exp of the direction's logits, one column tile at a time → lse [n].
at::Tensor tiled_row_logsumexp(const std::vector<Branch>& branches, int64_t tile) {
  const at::Tensor& rows = branches[0].rows;
  const int64_t n = rows.size(0), N = branches[0].columns.size(0);
  at::Tensor running_max = at::full({n}, -INFINITY, rows.options());  // [n]
  at::Tensor running_sum = at::zeros({n}, rows.options());            // [n], Σ exp(logit − running_max)
  for (int64_t start = 0; start < N; start += tile) {
    const int64_t width = std::min(tile, N - start);
    at::Tensor logits = tile_logits(branches, start, width, nullptr);  // [n, width]
    at::Tensor new_max = at::maximum(running_max, logits.amax(1));     // [n]
    // exp(−inf − finite) = 0 clears the empty sum on the first tile.
    running_sum.mul_((running_max - new_max).exp_()).add_(logits.sub_(new_max.unsqueeze(1)).exp_().sum(1));
    running_max = new_max;
  }
  return running_max + running_sum.log();  // [n]
}

// Positive logits S[i, offset + i] [n].
at::Tensor positive_logits(const std::vector<Branch>& branches, int64_t positive_offset) {
  at::Tensor total;
  for (const Branch& b : branches) {
    at::Tensor term = positive_dots(b, positive_offset).mul_(b.scale);
    if (b.weights.defined()) term.mul_(positive_weights(b, positive_offset));
    total = total.defined() ? total.add_(term) : term;
  }
  return total;
}

// Where one branch's gradients go; an undefined tensor means not needed. `weights` is the [N] or [n] column
// of the router weights' gradient (a view).
struct BranchGrads {
  at::Tensor rows, columns, weights;
  double* scale = nullptr;
};

// Adds coefficient · d(Σ_i CE_i)/d(inputs) of one direction into `grads` (one entry per branch).
void accumulate_direction_grads(const std::vector<Branch>& branches, const at::Tensor& lse,
                                int64_t positive_offset, int64_t tile, double coefficient,
                                std::vector<BranchGrads>& grads) {
  const int64_t n = branches[0].rows.size(0), N = branches[0].columns.size(0);
  for (int64_t start = 0; start < N; start += tile) {
    const int64_t width = std::min(tile, N - start);
    std::vector<at::Tensor> dots;  // per branch [n, width]
    // c · softmax of the tile [n, width]
    const at::Tensor weighted_softmax =
        tile_logits(branches, start, width, &dots).sub_(lse.unsqueeze(1)).exp_().mul_(coefficient);
    for (size_t k = 0; k < branches.size(); ++k) {
      const Branch& b = branches[k];
      BranchGrads& g = grads[k];
      if (g.weights.defined()) {
        const at::Tensor contribution = weighted_softmax * dots[k];  // [n, width]
        if (b.weights_per_row) {
          g.weights.add_(contribution.sum(1), b.scale);
        } else {
          g.weights.narrow(0, start, width).add_(contribution.sum(0), b.scale);
        }
      }
      if (!g.scale && !g.rows.defined() && !g.columns.defined()) continue;
      // G_b = c · P ⊙ W_b [n, width]
      const at::Tensor grad_logits =
          b.weights.defined() ? weighted_softmax * tile_weights(b, start, width) : weighted_softmax;
      if (g.scale) *g.scale += at::dot(grad_logits.reshape(-1), dots[k].reshape(-1)).item<double>();
      if (g.rows.defined()) g.rows.addmm_(grad_logits, b.columns.narrow(0, start, width), 1, b.scale);
      if (g.columns.defined()) g.columns.narrow(0, start, width).addmm_(grad_logits.t(), b.rows, 1, b.scale);
    }
  }
  // The one-hot part of (softmax − onehot): each row's positive column, all n at once.
  for (size_t k = 0; k < branches.size(); ++k) {
    const Branch& b = branches[k];
    BranchGrads& g = grads[k];
    const at::Tensor positive_columns = b.columns.narrow(0, positive_offset, n);  // [n, D_b]
    at::Tensor pair_weights;                                                      // [n, 1] or undefined
    if (b.weights.defined()) pair_weights = positive_weights(b, positive_offset).unsqueeze(1);
    auto weighted = [&](const at::Tensor& t) { return pair_weights.defined() ? t * pair_weights : t; };
    const double factor = coefficient * b.scale;
    if (g.rows.defined()) g.rows.sub_(weighted(positive_columns), factor);
    if (g.columns.defined()) g.columns.narrow(0, positive_offset, n).sub_(weighted(b.rows), factor);
    if (g.scale || g.weights.defined()) {
      const at::Tensor dots = positive_dots(b, positive_offset);  // [n]
      if (g.scale) {
        *g.scale -=
            coefficient *
            (pair_weights.defined() ? (dots * pair_weights.squeeze(1)).sum() : dots.sum()).item<double>();
      }
      if (g.weights.defined()) {
        (b.weights_per_row ? g.weights : g.weights.narrow(0, positive_offset, n)).sub_(dots, factor);
      }
    }
  }
}

at::ScalarType accumulation_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// Inputs in the accumulation dtype, contiguous; the scales as numbers (index → value, 0 where not a scale).
struct Prepared {
  std::vector<at::Tensor> tensors;
  std::vector<double> scales;
};

Prepared prepare(const Layout& layout, at::TensorList inputs) {
  const at::ScalarType acc = accumulation_type(inputs[0].scalar_type());
  Prepared p;
  p.scales.assign(inputs.size(), 0);
  for (const at::Tensor& t : inputs) p.tensors.push_back(t.to(acc).contiguous());
  for (const auto* direction : {&layout.text_to_video, &layout.video_to_text}) {
    for (const BranchSpec& b : *direction) p.scales[b.scale] = inputs[b.scale].item<double>();
  }
  return p;
}

// The loss of either layout; the inputs are one flat list so one autograd function serves both.
class FusedSymmetricInfoNCE : public torch::autograd::Function<FusedSymmetricInfoNCE> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList inputs, bool gemini, int64_t positive_offset,
                            int64_t tile) {
    const Layout& layout = layout_for(gemini);
    const Prepared p = prepare(layout, inputs);
    const std::vector<Branch> text_to_video = make_branches(layout.text_to_video, p.tensors, p.scales, false);
    const std::vector<Branch> video_to_text = make_branches(layout.video_to_text, p.tensors, p.scales, true);
    const at::Tensor lse_text_to_video = tiled_row_logsumexp(text_to_video, tile);  // [n]
    const at::Tensor lse_video_to_text = tiled_row_logsumexp(video_to_text, tile);  // [n]
    const at::Tensor loss = ((lse_text_to_video - positive_logits(text_to_video, positive_offset)).mean() +
                             (lse_video_to_text - positive_logits(video_to_text, positive_offset)).mean()) /
                            2;
    std::vector<at::Tensor> saved(inputs.begin(), inputs.end());
    saved.push_back(lse_text_to_video);
    saved.push_back(lse_video_to_text);
    ctx->save_for_backward(saved);
    ctx->saved_data["gemini"] = gemini;
    ctx->saved_data["positive_offset"] = positive_offset;
    ctx->saved_data["tile"] = tile;
    // Which inputs want a gradient (this LibTorch has no ctx->needs_input_grad).
    std::vector<bool> needs;
    for (const at::Tensor& t : inputs) needs.push_back(t.requires_grad());
    ctx->saved_data["needs_grad"] = needs;
    return loss.to(inputs[0].scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list saved = ctx->get_saved_variables();
    const at::Tensor lse_video_to_text = saved.back();
    saved.pop_back();
    const at::Tensor lse_text_to_video = saved.back();
    saved.pop_back();
    const Layout& layout = layout_for(ctx->saved_data["gemini"].toBool());
    const int64_t positive_offset = ctx->saved_data["positive_offset"].toInt();
    const int64_t tile = ctx->saved_data["tile"].toInt();
    const c10::List<bool> needs = ctx->saved_data["needs_grad"].toBoolList();
    const Prepared p = prepare(layout, saved);
    const int64_t n = saved[0].size(0);
    // Each direction is a mean over n rows and the two directions are averaged.
    const double coefficient = grad_outputs[0].item<double>() / static_cast<double>(2 * n);

    std::vector<at::Tensor> grads(saved.size());  // accumulation dtype; undefined where not needed
    std::vector<double> scale_grads(saved.size(), 0);
    auto run = [&](const std::vector<BranchSpec>& specs, const at::Tensor& lse, bool weights_per_row) {
      std::vector<BranchGrads> targets;
      bool any = false;
      for (const BranchSpec& s : specs) {
        BranchGrads g;
        auto slot = [&](int index) {
          if (!needs.get(index)) return at::Tensor();
          if (!grads[index].defined()) grads[index] = at::zeros_like(p.tensors[index]);
          any = true;
          return grads[index];
        };
        g.rows = slot(s.rows);
        g.columns = slot(s.columns);
        if (s.weights >= 0) {
          at::Tensor weights = slot(s.weights);
          if (weights.defined()) g.weights = weights.select(1, s.weight_column);
        }
        if (needs.get(s.scale)) {
          g.scale = &scale_grads[s.scale];
          any = true;
        }
        targets.push_back(g);
      }
      if (!any) return;
      accumulate_direction_grads(make_branches(specs, p.tensors, p.scales, weights_per_row), lse,
                                 positive_offset, tile, coefficient, targets);
    };
    run(layout.text_to_video, lse_text_to_video, false);
    run(layout.video_to_text, lse_video_to_text, true);

    std::vector<bool> is_scale(saved.size(), false);
    for (const auto* direction : {&layout.text_to_video, &layout.video_to_text}) {
      for (const BranchSpec& b : *direction) is_scale[b.scale] = true;
    }
    variable_list out;
    for (size_t k = 0; k < saved.size(); ++k) {
      if (!needs.get(k)) {
        out.emplace_back();
      } else if (is_scale[k]) {
        out.push_back(at::full(saved[k].sizes(), scale_grads[k], saved[k].options()));
      } else {
        out.push_back(grads[k].to(saved[k].scalar_type()));
      }
    }
    out.resize(saved.size() + 3);  // gemini, positive_offset, tile
    return out;
  }
};

}  // namespace

at::Tensor fused_symmetric_infonce(const at::Tensor& text_local, const at::Tensor& text_all,
                                   const at::Tensor& video_local, const at::Tensor& video_all,
                                   const at::Tensor& scale, int64_t positive_offset, int64_t tile) {
  const std::vector<at::Tensor> inputs = {text_local, text_all, video_local, video_all, scale};
  check_inputs(kSingleLayout, inputs, positive_offset, tile);
  return FusedSymmetricInfoNCE::apply(at::TensorList(inputs), false, positive_offset, tile);
}

at::Tensor fused_gemini_infonce(const GeminiInfoNCEInputs& in, int64_t positive_offset, int64_t tile) {
  const std::vector<at::Tensor> inputs = {in.text_action_local,  in.text_action_all,    in.text_object_local,
                                          in.text_object_all,    in.video_action_local, in.video_action_all,
                                          in.video_object_local, in.video_object_all,   in.router_local,
                                          in.router_all,         in.action_scale,       in.object_scale};
  check_inputs(kGeminiLayout, inputs, positive_offset, tile);
  return FusedSymmetricInfoNCE::apply(at::TensorList(inputs), true, positive_offset, tile);
}

}  // namespace vimo::kernels
