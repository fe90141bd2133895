// AdamW, schedule and clipping (see optimizer.h).
#include "trainer/optimizer.h"

#include <cmath>
#include <stdexcept>

namespace vimo::trainer {

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> parameters, AdamWOptions options, bool decay_all)
    : options_(options) {
  for (auto& [name, param] : parameters) {
    slots_.push_back(
        {name, param, at::zeros_like(param), at::zeros_like(param), decay_all || param.dim() >= 2});
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++step_;
  const double correction1 = 1.0 - std::pow(options_.beta1, static_cast<double>(step_));
  const double correction2 = 1.0 - std::pow(options_.beta2, static_cast<double>(step_));
  for (Slot& slot : slots_) {
    const at::Tensor& grad = slot.param.grad();
    if (!grad.defined()) continue;
    if (slot.decay && options_.weight_decay != 0) slot.param.mul_(1.0 - lr * options_.weight_decay);
    slot.exp_avg.mul_(options_.beta1).add_(grad, 1.0 - options_.beta1);
    slot.exp_avg_sq.mul_(options_.beta2).addcmul_(grad, grad, 1.0 - options_.beta2);
    at::Tensor denominator = (slot.exp_avg_sq / correction2).sqrt_().add_(options_.eps);
    slot.param.addcdiv_(slot.exp_avg, denominator, -lr / correction1);
  }
}

void AdamW::zero_grad() {
  for (Slot& slot : slots_) {
    if (slot.param.grad().defined()) slot.param.mutable_grad() = at::Tensor();
  }
}

std::map<std::string, at::Tensor> AdamW::state_tensors() const {
  std::map<std::string, at::Tensor> out;
  for (const Slot& slot : slots_) {
    out["optim." + slot.name + ".exp_avg"] = slot.exp_avg;
    out["optim." + slot.name + ".exp_avg_sq"] = slot.exp_avg_sq;
  }
  return out;
}

void AdamW::load_state_tensors(const std::map<std::string, at::Tensor>& tensors, int64_t steps_taken) {
  at::NoGradGuard no_grad;
  for (Slot& slot : slots_) {
    for (auto [suffix, target] :
         {std::pair{".exp_avg", &slot.exp_avg}, std::pair{".exp_avg_sq", &slot.exp_avg_sq}}) {
      const std::string key = "optim." + slot.name + suffix;
      auto it = tensors.find(key);
      if (it == tensors.end())
        throw std::runtime_error("optimizer state '" + key + "' is missing from the checkpoint");
      if (!it->second.sizes().equals(target->sizes())) {
        throw std::runtime_error("optimizer state '" + key + "' has shape " + c10::str(it->second.sizes()) +
                                 ", the parameter has " + c10::str(target->sizes()));
      }
      target->copy_(it->second);
    }
  }
  step_ = steps_taken;
}

double warmup_cosine_lr(int64_t step, int64_t total, int64_t warmup, double lr, double min_ratio) {
  if (warmup > 0 && step <= warmup) return lr * static_cast<double>(step) / static_cast<double>(warmup);
  if (total <= warmup) return lr;
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(total - warmup));
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return lr * (min_ratio + (1.0 - min_ratio) * cosine);
}

double clip_gradients(const std::vector<at::Tensor>& parameters, double max_norm) {
  at::NoGradGuard no_grad;
  double sum_of_squares = 0;
  for (const at::Tensor& p : parameters) {
    if (p.grad().defined()) sum_of_squares += p.grad().to(at::kDouble).pow(2).sum().item<double>();
  }
  const double norm = std::sqrt(sum_of_squares);
  if (max_norm > 0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (const at::Tensor& p : parameters) {
      if (p.grad().defined()) p.grad().mul_(scale);
    }
  }
  return norm;
}

}  // namespace vimo::trainer
