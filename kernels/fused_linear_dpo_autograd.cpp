// Defines the fused LM-head losses of fused_linear_dpo.h and the detail:: entry points of
// fused_linear_dpo_engine.h around the engine of fused_linear_dpo.cpp (Note [Fused linear LM-head losses]
// there): the input checks, the loss and the metrics from the per-row log-probs, the autograd function that
// hands the engine's gradients to backward, and the eager compositions the fused losses are tested against.
//
// Note [Gradients in the forward]
// Pass 2 runs inside the autograd function's forward, as in Liger-Kernel's fused linear cross-entropy: the
// reuse of pass 1's tile (Note [Fused linear LM-head losses] in fused_linear_dpo.cpp) is only possible while
// the tile exists, and keeping tiles until backward would be the [R, T, V] memory this kernel exists to
// avoid. The forward stores grad_hidden [R, T, H] and grad_W [V, H] (accumulation dtype), which backward
// scales by the incoming gradient of the scalar loss (exact: the loss is linear in its upstream scale). The
// cost: the forward holds the two gradients from forward to backward, and does the gradient work whenever
// hidden or weight requires grad, even if backward never runs. Where nothing requires grad (the reference
// model) only pass 1 runs.
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

#include "kernels/dpo_math.h"
#include "kernels/fused_linear_dpo.h"
#include "kernels/fused_linear_dpo_engine.h"
#include "kernels/fused_linear_dpo_internal.h"

namespace vimo::kernels {
namespace {

using detail::Objective;
using detail::Passes;
using detail::Task;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::string shape_of(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

std::string dtype_of(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

// Checks the four shared inputs; `pairs` adds that rows come as chosen/rejected halves.
void check_inputs(const std::string& where, const at::Tensor& hidden, const at::Tensor& weight,
                  const at::Tensor& targets, const at::Tensor& mask, const LmHeadChunking& chunking,
                  bool pairs, int64_t vocabulary = 0) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(where + ": " + what); };
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"hidden", hidden},
                                {"weight", weight},
                                {"targets", targets},
                                {"mask", mask}}) {
    if (!t.defined()) fail(std::string(name) + " is an undefined tensor");
    if (t.device() != hidden.device()) {
      fail(std::string(name) + " is on " + t.device().str() + " but hidden is on " + hidden.device().str() +
           "; HINT: pass all four on one device");
    }
#if defined(VIMO_HAVE_CUDA)
    const bool cuda_built = true;
#else
    const bool cuda_built = false;
#endif
    if (!t.device().is_cpu() && !(t.device().is_cuda() && cuda_built)) {
      fail(std::string(name) + " is on " + t.device().str() +
           "; HINT: the kernel runs on CPU, and on CUDA in a build with VIMO_HAVE_CUDA");
    }
  }
  const at::ScalarType type = hidden.scalar_type();
  if (type != at::kFloat && type != at::kDouble && type != at::kBFloat16) {
    fail("hidden must be float32, float64 or bfloat16, got " + dtype_of(hidden));
  }
  if (hidden.dim() != 3 || hidden.size(0) < 1 || hidden.size(1) < 1 || hidden.size(2) < 1) {
    fail("hidden must be [R, T, H] with R, T, H ≥ 1, got " + shape_of(hidden));
  }
  const int64_t R = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  if (pairs && R % 2 != 0) {
    fail("hidden must hold 2B rows (chosen rows, then rejected rows), got " + shape_of(hidden) +
         " with an odd number of rows");
  }
  if (weight.dim() != 2 || weight.size(0) < 1 || weight.size(1) != H) {
    fail("weight must be [V, " + std::to_string(H) + "] (H of hidden " + shape_of(hidden) + "), got " +
         shape_of(weight));
  }
  if (weight.scalar_type() != type) {
    fail("weight is " + dtype_of(weight) + " but hidden is " + dtype_of(hidden) +
         "; HINT: pass both in one dtype");
  }
  const std::string rows_by_positions = "[" + std::to_string(R) + ", " + std::to_string(T) + "]";
  if (targets.sizes() != at::IntArrayRef{R, T} || targets.scalar_type() != at::kLong) {
    fail("targets must be int64 " + rows_by_positions + " (R, T of hidden), got " + dtype_of(targets) + " " +
         shape_of(targets));
  }
  if (mask.sizes() != at::IntArrayRef{R, T} || mask.scalar_type() != at::kBool) {
    fail("mask must be bool " + rows_by_positions + " (R, T of hidden), got " + dtype_of(mask) + " " +
         shape_of(mask));
  }
  if (chunking.tokens < 1) fail("chunking.tokens must be ≥ 1, got " + std::to_string(chunking.tokens));
  if (chunking.vocabulary < 0) {
    fail("chunking.vocabulary must be ≥ 0 (0: whole vocabulary), got " + std::to_string(chunking.vocabulary));
  }
  const at::Tensor answer_targets = targets.masked_select(mask);
  if (answer_targets.numel() > 0) {
    const int64_t low = answer_targets.min().item<int64_t>(), high = answer_targets.max().item<int64_t>();
    const int64_t V = vocabulary > 0 ? vocabulary : weight.size(0);
    if (low < 0 || high >= V) {
      fail("targets at answer positions must lie in [0, " + std::to_string(V) + "), found " +
           std::to_string(low < 0 ? low : high));
    }
  }
}

void check_reference(const std::string& where, const at::Tensor& reference_logps, int64_t rows) {
  if (!reference_logps.defined() || !reference_logps.is_floating_point() || reference_logps.dim() != 1 ||
      reference_logps.size(0) != rows) {
    throw std::invalid_argument(where + ": reference_logps must be a floating tensor [" +
                                std::to_string(rows) + "] (one logπref per row of hidden), got " +
                                (reference_logps.defined()
                                     ? dtype_of(reference_logps) + " " + shape_of(reference_logps)
                                     : std::string("an undefined tensor")));
  }
}

// The loss and its terms from the per-row log-probs [R] (float64).
struct LossTerms {
  double loss = 0, dpo = 0, sft = 0;
};

LossTerms loss_terms(const Task& task, const at::Tensor& row_logps) {
  const double* lp = row_logps.data_ptr<double>();
  const int64_t R = row_logps.size(0);
  LossTerms out;
  if (task.objective == Objective::kCrossEntropy) {
    for (int64_t r = 0; r < R; ++r) out.sft -= lp[r];
    out.sft = task.answer_tokens > 0 ? out.sft / static_cast<double>(task.answer_tokens) : 0.0;
    out.loss = out.sft;
  } else if (task.objective == Objective::kMcDpo) {
    const int64_t B = R / 2;
    const double* ref = task.reference_logps.data_ptr<double>();
    for (int64_t i = 0; i < B; ++i) {
      const double delta = dpo_math::pair_delta(lp[i], ref[i], lp[B + i], ref[B + i]);
      out.dpo += dpo_math::mcdpo_pair_term(delta, task.dpo.beta, task.dpo.epsilon).loss;
      out.sft -= lp[i];
    }
    out.dpo /= static_cast<double>(B);
    out.sft = task.chosen_tokens > 0 ? out.sft / static_cast<double>(task.chosen_tokens) : 0.0;
    out.loss = task.dpo.alpha * out.dpo + task.dpo.gamma * out.sft;
  }
  return out;
}

// The loss of `task` with the gradients computed in the forward (Note [Gradients in the forward]).
// Outputs: the loss [] (dtype of hidden) and the per-row log-probs [R] float64 (not differentiable).
class FusedLinearLmHeadLoss : public torch::autograd::Function<FusedLinearLmHeadLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const at::Tensor& targets, const at::Tensor& mask, const Task& task,
                               bool need_hidden, bool need_weight) {
    Passes passes = detail::run_passes(hidden, weight, targets, mask, task, need_hidden, need_weight);
    ctx->saved_data["grad_hidden"] = passes.grad_hidden;
    ctx->saved_data["grad_weight"] = passes.grad_weight;
    ctx->saved_data["hidden_sizes"] = hidden.sizes().vec();
    ctx->saved_data["dtype"] = hidden.scalar_type();
    ctx->saved_data["consumed"] = false;
    const at::Tensor loss = at::scalar_tensor(loss_terms(task, passes.row_logps).loss, hidden.options());
    ctx->mark_non_differentiable({passes.row_logps});
    return {loss, passes.row_logps};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The gradients were computed in the forward: under create_graph they would carry no dependence on the
    // inputs, and every second-order term would silently be zero.
    if (at::GradMode::is_enabled()) {
      throw std::runtime_error(
          "fused LM-head loss: double backward (create_graph=true) is not supported; HINT: use the eager "
          "composition where second derivatives are needed");
    }
    if (ctx->saved_data["consumed"].toBool()) {
      throw std::runtime_error(
          "fused LM-head loss: backward ran twice through the same forward; HINT: the gradients are computed "
          "in the forward and handed over once (retain_graph is not supported), run the loss again instead");
    }
    ctx->saved_data["consumed"] = true;
    const double scale = grad_outputs[0].defined() ? grad_outputs[0].item<double>() : 0.0;
    const auto dtype = ctx->saved_data["dtype"].toScalarType();
    // Moved out of ctx so that the leaf's AccumulateGrad can adopt the tensor instead of copying [V, H].
    auto take = [&](const char* key) {
      c10::IValue saved = std::exchange(ctx->saved_data[key], c10::IValue());
      if (saved.isNone() || !saved.toTensor().defined()) return at::Tensor();
      at::Tensor g = std::move(saved).toTensor();
      return (scale == 1.0 ? std::move(g) : g.mul_(scale)).to(dtype);
    };
    at::Tensor grad_hidden = take("grad_hidden");
    if (grad_hidden.defined()) grad_hidden = grad_hidden.view(ctx->saved_data["hidden_sizes"].toIntVector());
    return {grad_hidden, take("grad_weight"), {}, {}, {}, {}, {}};
  }
};

bool wants_grad(const at::Tensor& t) { return at::GradMode::is_enabled() && t.requires_grad(); }

// The detached metrics of DESIGN.md from the per-row log-probs, formed in float64 on the host and returned
// in `options` (the accumulation dtype, on hidden's device)
// (so the float32 metrics carry one rounding, not the cancellation of logπθ − logπref in float32).
void fill_metrics(McDpoResult& result, const at::Tensor& policy_logps, const at::Tensor& reference_logps,
                  double beta, const at::TensorOptions& options) {
  const at::Tensor policy = policy_logps.detach().to(at::kCPU, at::kDouble);        // [2B]
  const at::Tensor reference = reference_logps.detach().to(at::kCPU, at::kDouble);  // [2B]
  const int64_t B = policy.size(0) / 2;
  const at::Tensor chosen = beta * (policy.narrow(0, 0, B) - reference.narrow(0, 0, B));    // [B]
  const at::Tensor rejected = beta * (policy.narrow(0, B, B) - reference.narrow(0, B, B));  // [B]
  result.logps_chosen = policy.narrow(0, 0, B).to(options);
  result.logps_rejected = policy.narrow(0, B, B).to(options);
  result.rewards_chosen = chosen.to(options);
  result.rewards_rejected = rejected.to(options);
  result.accuracy = (chosen > rejected).to(at::kDouble).mean().to(options);
  result.margin = (chosen - rejected).mean().to(options);
}

at::ScalarType accumulation_type(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

namespace detail {

McDpoResult linear_mcdpo(const std::string& where, const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& targets, const at::Tensor& mask, const at::Tensor& reference_logps,
                         const McDpoConfig& config, const LmHeadChunking& chunking, const VocabSlice& slice) {
  check_inputs(where, hidden, weight, targets, mask, chunking, /*pairs=*/true, slice.vocabulary);
  check_reference(where, reference_logps, hidden.size(0));
  const int64_t B = hidden.size(0) / 2;
  Task task;
  task.objective = Objective::kMcDpo;
  task.dpo = config;
  task.reference_logps = reference_logps.detach().to(at::kCPU, at::kDouble).contiguous();  // read on the host
  task.chunking = chunking;
  task.answer_tokens = mask.sum().item<int64_t>();
  task.chosen_tokens = mask.narrow(0, 0, B).sum().item<int64_t>();
  task.slice = slice;
  const variable_list outputs = FusedLinearLmHeadLoss::apply(hidden, weight, targets, mask, task,
                                                             wants_grad(hidden), wants_grad(weight));
  McDpoResult result;
  result.loss = outputs[0];
  const LossTerms terms = loss_terms(task, outputs[1]);
  const at::TensorOptions options =
      at::TensorOptions().dtype(accumulation_type(hidden)).device(hidden.device());
  result.dpo_loss = at::scalar_tensor(terms.dpo, options);
  result.sft_loss = at::scalar_tensor(terms.sft, options);
  fill_metrics(result, outputs[1], task.reference_logps, config.beta, options);
  return result;
}

at::Tensor linear_sequence_logps(const std::string& where, const at::Tensor& hidden, const at::Tensor& weight,
                                 const at::Tensor& targets, const at::Tensor& mask,
                                 const LmHeadChunking& chunking, const VocabSlice& slice) {
  check_inputs(where, hidden, weight, targets, mask, chunking, /*pairs=*/false, slice.vocabulary);
  Task task;
  task.chunking = chunking;
  task.slice = slice;
  return run_passes(hidden, weight, targets, mask, task, false, false)
      .row_logps.to(hidden.device(), accumulation_type(hidden));
}

at::Tensor linear_cross_entropy(const std::string& where, const at::Tensor& hidden, const at::Tensor& weight,
                                const at::Tensor& targets, const at::Tensor& mask,
                                const LmHeadChunking& chunking, const VocabSlice& slice) {
  check_inputs(where, hidden, weight, targets, mask, chunking, /*pairs=*/false, slice.vocabulary);
  Task task;
  task.objective = Objective::kCrossEntropy;
  task.chunking = chunking;
  task.answer_tokens = mask.sum().item<int64_t>();
  task.slice = slice;
  return FusedLinearLmHeadLoss::apply(hidden, weight, targets, mask, task, wants_grad(hidden),
                                      wants_grad(weight))[0];
}

}  // namespace detail

McDpoResult fused_linear_mcdpo(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                               const at::Tensor& mask, const at::Tensor& reference_logps,
                               const McDpoConfig& config, const LmHeadChunking& chunking) {
  return detail::linear_mcdpo("fused_linear_mcdpo", hidden, weight, targets, mask, reference_logps, config,
                              chunking, {});
}

at::Tensor fused_linear_sequence_logps(const at::Tensor& hidden, const at::Tensor& weight,
                                       const at::Tensor& targets, const at::Tensor& mask,
                                       const LmHeadChunking& chunking) {
  return detail::linear_sequence_logps("fused_linear_sequence_logps", hidden, weight, targets, mask, chunking,
                                       {});
}

at::Tensor fused_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                      const at::Tensor& targets, const at::Tensor& mask,
                                      const LmHeadChunking& chunking) {
  return detail::linear_cross_entropy("fused_linear_cross_entropy", hidden, weight, targets, mask, chunking,
                                      {});
}

// ----- eager compositions -----

namespace {

// log softmax(h·Wᵀ)[target] on answer tokens, 0 elsewhere [R, T], in the inputs' dtype.
at::Tensor eager_token_logps(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                             const at::Tensor& mask) {
  const at::Tensor logits = at::matmul(hidden, weight.t());                                // [R, T, V]
  const at::Tensor log_probs = at::log_softmax(logits, -1);                                // [R, T, V]
  const at::Tensor safe_targets = at::where(mask, targets, at::zeros_like(targets));       // [R, T]
  const at::Tensor picked = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1);  // [R, T]
  return picked * mask.to(picked.scalar_type());
}

}  // namespace

at::Tensor eager_sequence_logps(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                const at::Tensor& mask) {
  check_inputs("eager_sequence_logps", hidden, weight, targets, mask, {}, false);
  return eager_token_logps(hidden, weight, targets, mask).sum(1);
}

at::Tensor eager_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                               const at::Tensor& mask) {
  check_inputs("eager_cross_entropy", hidden, weight, targets, mask, {}, false);
  const double count = static_cast<double>(std::max<int64_t>(mask.sum().item<int64_t>(), 1));
  return -eager_token_logps(hidden, weight, targets, mask).sum() / count;
}

McDpoResult eager_mcdpo(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                        const at::Tensor& mask, const at::Tensor& reference_logps,
                        const McDpoConfig& config) {
  check_inputs("eager_mcdpo", hidden, weight, targets, mask, {}, true);
  check_reference("eager_mcdpo", reference_logps, hidden.size(0));
  const int64_t B = hidden.size(0) / 2;
  const at::Tensor policy = eager_token_logps(hidden, weight, targets, mask).sum(1);       // [2B]
  const at::Tensor reference = reference_logps.to(policy.device(), policy.scalar_type());  // [2B]
  const at::Tensor chosen = policy.narrow(0, 0, B) - reference.narrow(0, 0, B);            // [B]
  const at::Tensor rejected = policy.narrow(0, B, B) - reference.narrow(0, B, B);          // [B]
  const at::Tensor z = config.beta * (chosen - rejected);                                  // [B]
  McDpoResult result;
  const at::Tensor dpo =
      (-(1 - config.epsilon) * at::log_sigmoid(z) - config.epsilon * at::log_sigmoid(-z)).mean();
  const double chosen_tokens =
      static_cast<double>(std::max<int64_t>(mask.narrow(0, 0, B).sum().item<int64_t>(), 1));
  const at::Tensor sft = -policy.narrow(0, 0, B).sum() / chosen_tokens;
  result.loss = config.alpha * dpo + config.gamma * sft;
  result.dpo_loss = dpo.detach();
  result.sft_loss = sft.detach();
  fill_metrics(result, policy, reference_logps, config.beta,
               at::TensorOptions().dtype(accumulation_type(hidden)).device(hidden.device()));
  return result;
}

}  // namespace vimo::kernels
