// Defines the fused symmetric InfoNCE losses of fused_contrastive.h around the two passes of
// fused_contrastive.cpp (Note [Two-pass symmetric InfoNCE] there): the input layouts of the single-branch and
// the Gemini router losses and their checks, each direction's branch-concatenated operands R̃ and C̃, the
// chain rule from dL/dR̃ and dL/dC̃ back to the inputs, and the autograd function that runs the passes in its
// forward.
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/fused_contrastive.h"
#include "kernels/fused_contrastive_internal.h"

namespace vimo::kernels {
namespace {

using detail::ScoreMatrix;
using detail::ScorePasses;
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
  if (tile < 0) {
    throw std::invalid_argument(where + "tile must be ≥ 1, or 0 to choose by device, got " +
                                std::to_string(tile));
  }
}

at::ScalarType accumulation_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// One direction's branches as one score matrix: R̃ = [s_b ρ_b R_b]_b, C̃ = [γ_b C_b]_b.
//   tensors: the inputs in the accumulation dtype, contiguous; scales: their values by input index.
ScoreMatrix score_matrix(const std::vector<BranchSpec>& specs, const std::vector<at::Tensor>& tensors,
                         const std::vector<double>& scales, bool weights_per_row, int64_t positive_offset,
                         bool column_softmax) {
  std::vector<at::Tensor> rows, columns;
  for (const BranchSpec& b : specs) {
    at::Tensor row = tensors[b.rows] * scales[b.scale];  // [n, D_b]
    at::Tensor column = tensors[b.columns];              // [N, D_b]
    if (b.weights >= 0) {
      const at::Tensor w = tensors[b.weights].select(1, b.weight_column).unsqueeze(1);  // [n or N, 1]
      if (weights_per_row) {
        row.mul_(w);
      } else {
        column = column * w;
      }
    }
    rows.push_back(row);
    columns.push_back(column);
  }
  return {at::cat(rows, 1), at::cat(columns, 1).contiguous(), positive_offset, column_softmax};
}

// Adds `contribution` to grads[index] (out of place: a contribution may be a view of dL/dR̃ or dL/dC̃).
void add_gradient(std::vector<at::Tensor>& grads, int index, const at::Tensor& contribution) {
  grads[index] = grads[index].defined() ? grads[index] + contribution : contribution;
}

// The chain rule from dL/dR̃ and dL/dC̃ back to the inputs of one direction's branches (Note [Two-pass
// symmetric InfoNCE] in fused_contrastive.cpp); adds to grads[k] for every input k with needs[k].
void branch_gradients(const std::vector<BranchSpec>& specs, const std::vector<at::Tensor>& tensors,
                      const std::vector<double>& scales, bool weights_per_row, const ScorePasses& passes,
                      const std::vector<bool>& needs, std::vector<at::Tensor>& grads) {
  int64_t first = 0;  // the branch's first column in K
  for (const BranchSpec& b : specs) {
    const at::Tensor& rows = tensors[b.rows];        // R_b [n, D_b]
    const at::Tensor& columns = tensors[b.columns];  // C_b [N, D_b]
    const int64_t width = rows.size(1);
    const double scale = scales[b.scale];
    at::Tensor weights;  // ρ_b [n] or γ_b [N]
    if (b.weights >= 0) weights = tensors[b.weights].select(1, b.weight_column);
    const at::Tensor row_weights = weights_per_row ? weights : at::Tensor();
    const at::Tensor column_weights = weights_per_row ? at::Tensor() : weights;
    if (passes.grad_rows.defined()) {
      const at::Tensor x = passes.grad_rows.narrow(1, first, width);  // dL/dR̃_b [n, D_b]
      if (needs[b.rows]) {
        add_gradient(grads, b.rows,
                     row_weights.defined() ? x * (row_weights.unsqueeze(1) * scale) : x * scale);
      }
      const bool row_weights_need = row_weights.defined() && needs[b.weights];
      if (needs[b.scale] || row_weights_need) {
        const at::Tensor dots = (rows * x).sum(1);  // ⟨R_b,i, X_b,i⟩ [n]
        if (needs[b.scale]) {
          add_gradient(grads, b.scale, row_weights.defined() ? (dots * row_weights).sum() : dots.sum());
        }
        if (row_weights_need) {
          if (!grads[b.weights].defined()) grads[b.weights] = at::zeros_like(tensors[b.weights]);
          grads[b.weights].select(1, b.weight_column).add_(dots, scale);
        }
      }
    }
    if (passes.grad_columns.defined()) {
      const at::Tensor y = passes.grad_columns.narrow(1, first, width);  // dL/dC̃_b [N, D_b]
      if (needs[b.columns]) {
        add_gradient(grads, b.columns, column_weights.defined() ? y * column_weights.unsqueeze(1) : y);
      }
      if (column_weights.defined() && needs[b.weights]) {
        if (!grads[b.weights].defined()) grads[b.weights] = at::zeros_like(tensors[b.weights]);
        grads[b.weights].select(1, b.weight_column).add_((columns * y).sum(1));  // ⟨C_b,j, Y_b,j⟩ [N]
      }
    }
    first += width;
  }
}

// Whether a direction needs dL/dR̃ (rows, scales, per-row weights) and dL/dC̃ (columns, per-column weights).
std::pair<bool, bool> wanted_products(const std::vector<BranchSpec>& specs, bool weights_per_row,
                                      const std::vector<bool>& needs) {
  bool rows = false, columns = false;
  for (const BranchSpec& b : specs) {
    rows = rows || needs[b.rows] || needs[b.scale] || (weights_per_row && b.weights >= 0 && needs[b.weights]);
    columns = columns || needs[b.columns] || (!weights_per_row && b.weights >= 0 && needs[b.weights]);
  }
  return {rows, columns};
}

// One process passes the same tensor as local and as gathered for every pair; then one matrix serves both
// directions (Note [Two-pass symmetric InfoNCE] in fused_contrastive.cpp).
bool is_single_process(const Layout& layout, at::TensorList inputs, int64_t positive_offset) {
  if (positive_offset != 0) return false;
  for (size_t k = 0; k < layout.text_to_video.size(); ++k) {
    const BranchSpec &forward = layout.text_to_video[k], &backward = layout.video_to_text[k];
    // text_local is video→text's columns, video_all text→video's columns, and so on.
    if (!inputs[forward.rows].is_same(inputs[backward.columns])) return false;
    if (!inputs[forward.columns].is_same(inputs[backward.rows])) return false;
    if (forward.weights >= 0 && !inputs[forward.weights].is_same(inputs[backward.weights])) return false;
  }
  return true;
}

// The loss of either layout; the inputs are one flat list so one autograd function serves both.
class FusedSymmetricInfoNCE : public torch::autograd::Function<FusedSymmetricInfoNCE> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList inputs, bool gemini, int64_t positive_offset,
                            int64_t tile, bool gradients_enabled) {
    const Layout& layout = layout_for(gemini);
    const at::ScalarType acc = accumulation_type(inputs[0].scalar_type());
    std::vector<at::Tensor> tensors;  // the inputs in the accumulation dtype, contiguous
    std::vector<double> scales(inputs.size(), 0);
    std::vector<bool> needs;
    for (const at::Tensor& t : inputs) {
      tensors.push_back(t.detach().to(acc).contiguous());
      needs.push_back(gradients_enabled && t.requires_grad());
    }
    for (const auto* direction : {&layout.text_to_video, &layout.video_to_text}) {
      for (const BranchSpec& b : *direction) scales[b.scale] = inputs[b.scale].item<double>();
    }
    const int64_t n = inputs[0].size(0);
    const double coefficient = 1.0 / static_cast<double>(2 * n);
    std::vector<at::Tensor> grads(inputs.size());  // accumulation dtype; undefined where not needed
    at::Tensor loss;
    // Mean cross-entropy of a matrix's rows, given their log-sum-exp [n].
    auto mean_cross_entropy = [](const ScoreMatrix& m, const at::Tensor& lse) {
      const at::Tensor positives = (m.rows * m.columns.narrow(0, m.positive_offset, m.rows.size(0))).sum(1);
      return (lse - positives).mean();  // scalar
    };
    if (is_single_process(layout, inputs, positive_offset)) {
      // Gradients land on text→video's inputs: the same tensors as video→text's, so autograd sees it all.
      const ScoreMatrix m = score_matrix(layout.text_to_video, tensors, scales, false, 0, true);
      const auto [rows, columns] = wanted_products(layout.text_to_video, false, needs);
      const ScorePasses passes = detail::run_score_passes(m, tile, coefficient, rows, columns);
      loss = (mean_cross_entropy(m, passes.row_lse) + mean_cross_entropy(m, passes.column_lse)) / 2;
      branch_gradients(layout.text_to_video, tensors, scales, false, passes, needs, grads);
    } else {
      loss = at::zeros({}, tensors[0].options());
      for (const bool per_row : {false, true}) {
        const std::vector<BranchSpec>& specs = per_row ? layout.video_to_text : layout.text_to_video;
        const ScoreMatrix m = score_matrix(specs, tensors, scales, per_row, positive_offset, false);
        const auto [rows, columns] = wanted_products(specs, per_row, needs);
        const ScorePasses passes = detail::run_score_passes(m, tile, coefficient, rows, columns);
        loss = loss + mean_cross_entropy(m, passes.row_lse) / 2;
        branch_gradients(specs, tensors, scales, per_row, passes, needs, grads);
      }
    }
    std::vector<int64_t> dtypes;
    for (size_t k = 0; k < inputs.size(); ++k) {
      dtypes.push_back(static_cast<int64_t>(inputs[k].scalar_type()));
      if (grads[k].defined()) grads[k] = grads[k].reshape(inputs[k].sizes());
    }
    ctx->save_for_backward(grads);
    ctx->saved_data["dtypes"] = dtypes;
    return loss.to(inputs[0].scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The gradients were computed in the forward: under create_graph they would carry no dependence on the
    // inputs, and every second-order term would silently be zero.
    if (at::GradMode::is_enabled()) {
      throw std::runtime_error(
          "fused contrastive loss: double backward (create_graph=true) is not supported; HINT: use the eager "
          "composition (kernels/contrastive_loss.h) where second derivatives are needed");
    }
    const variable_list grads = ctx->get_saved_variables();
    const std::vector<int64_t> dtypes = ctx->saved_data["dtypes"].toIntVector();
    variable_list out;
    for (size_t k = 0; k < grads.size(); ++k) {
      if (!grads[k].defined()) {
        out.emplace_back();
        continue;
      }
      const at::Tensor scale = grad_outputs[0].to(grads[k].scalar_type());  // dL_out, 0-dim
      out.push_back((grads[k] * scale).to(static_cast<at::ScalarType>(dtypes[k])));
    }
    out.resize(grads.size() + 4);  // gemini, positive_offset, tile, gradients_enabled
    return out;
  }
};

// Whether autograd will call backward at all: otherwise the forward skips the gradient pass.
bool gradients_enabled(at::TensorList inputs) {
  if (!c10::GradMode::is_enabled()) return false;
  return std::any_of(inputs.begin(), inputs.end(), [](const at::Tensor& t) { return t.requires_grad(); });
}

}  // namespace

at::Tensor fused_symmetric_infonce(const at::Tensor& text_local, const at::Tensor& text_all,
                                   const at::Tensor& video_local, const at::Tensor& video_all,
                                   const at::Tensor& scale, int64_t positive_offset, int64_t tile) {
  const std::vector<at::Tensor> inputs = {text_local, text_all, video_local, video_all, scale};
  check_inputs(kSingleLayout, inputs, positive_offset, tile);
  return FusedSymmetricInfoNCE::apply(at::TensorList(inputs), false, positive_offset, tile,
                                      gradients_enabled(inputs));
}

at::Tensor fused_gemini_infonce(const GeminiInfoNCEInputs& in, int64_t positive_offset, int64_t tile) {
  const std::vector<at::Tensor> inputs = {in.text_action_local,  in.text_action_all,    in.text_object_local,
                                          in.text_object_all,    in.video_action_local, in.video_action_all,
                                          in.video_object_local, in.video_object_all,   in.router_local,
                                          in.router_all,         in.action_scale,       in.object_scale};
  check_inputs(kGeminiLayout, inputs, positive_offset, tile);
  return FusedSymmetricInfoNCE::apply(at::TensorList(inputs), true, positive_offset, tile,
                                      gradients_enabled(inputs));
}

}  // namespace vimo::kernels
