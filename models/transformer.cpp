// Pre-LN transformer block and stack (see transformer.h).
#include "models/transformer.h"

#include <ATen/ATen.h>

namespace vimo::models {

TransformerBlockImpl::TransformerBlockImpl(int64_t width, int64_t heads) : heads_(heads) {
  TORCH_CHECK(width % heads == 0, "transformer width ", width, " is not divisible by heads ", heads);
  norm_attention_ =
      register_module("norm_attention", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
  qkv_ = register_module("qkv", torch::nn::Linear(width, 3 * width));
  attention_out_ = register_module("attention_out", torch::nn::Linear(width, width));
  norm_mlp_ = register_module("norm_mlp", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
  mlp_in_ = register_module("mlp_in", torch::nn::Linear(width, 4 * width));
  mlp_out_ = register_module("mlp_out", torch::nn::Linear(4 * width, width));
}

at::Tensor TransformerBlockImpl::forward(const at::Tensor& x, const at::Tensor& key_mask, bool causal) {
  const int64_t batch = x.size(0), tokens = x.size(1), width = x.size(2), head_dim = width / heads_;
  // qkv [B, T, 3W] → q, k, v [B, heads, T, head_dim]
  at::Tensor qkv = qkv_->forward(norm_attention_->forward(x)).view({batch, tokens, 3, heads_, head_dim});
  qkv = qkv.permute({2, 0, 3, 1, 4});
  at::Tensor attention_mask;  // [B, 1, 1, T] bool: which keys each query may see
  if (key_mask.defined()) attention_mask = key_mask.view({batch, 1, 1, tokens});
  if (causal) {
    at::Tensor lower = at::ones({tokens, tokens}, x.options().dtype(at::kBool)).tril();  // [T, T]
    attention_mask = attention_mask.defined() ? attention_mask.logical_and(lower) : lower;
  }
  std::optional<at::Tensor> mask;
  if (attention_mask.defined()) mask = attention_mask;
  at::Tensor attended = at::scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], mask);
  attended = attended.transpose(1, 2).reshape({batch, tokens, width});  // [B, T, W]
  at::Tensor h = x + attention_out_->forward(attended);
  return h + mlp_out_->forward(at::gelu(mlp_in_->forward(norm_mlp_->forward(h))));
}

TransformerImpl::TransformerImpl(int64_t width, int64_t heads, int64_t layers) {
  blocks_ = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < layers; ++i) blocks_->push_back(TransformerBlock(width, heads));
  final_norm_ = register_module("final_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})));
}

at::Tensor TransformerImpl::forward(const at::Tensor& x, const at::Tensor& key_mask, bool causal) {
  at::Tensor h = x;
  for (const auto& block : *blocks_) h = block->as<TransformerBlock>()->forward(h, key_mask, causal);
  return final_norm_->forward(h);
}

at::Tensor masked_mean(const at::Tensor& x, const at::Tensor& mask) {
  at::Tensor weights = mask.to(x.scalar_type()).unsqueeze(-1);  // [B, T, 1]
  return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0);  // [B, W]
}

}  // namespace vimo::models
