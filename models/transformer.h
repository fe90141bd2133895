// Defines the pre-LN transformer block and stack shared by every Gemini-MVR encoder.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

namespace vimo::models {

// x + Attention(LN(x)), then x + MLP(LN(x)); MLP is Linear(W, 4W) → GELU → Linear(4W, W).
class TransformerBlockImpl : public torch::nn::Module {
 public:
  TransformerBlockImpl(int64_t width, int64_t heads);
  // x [B, T, W]; key_mask [B, T] bool (true = may be attended) or undefined; causal: token t sees <= t.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& key_mask, bool causal);

 private:
  int64_t heads_;
  torch::nn::LayerNorm norm_attention_{nullptr}, norm_mlp_{nullptr};
  torch::nn::Linear qkv_{nullptr}, attention_out_{nullptr}, mlp_in_{nullptr}, mlp_out_{nullptr};
};
TORCH_MODULE(TransformerBlock);

// `layers` blocks then a final LayerNorm.
class TransformerImpl : public torch::nn::Module {
 public:
  TransformerImpl(int64_t width, int64_t heads, int64_t layers);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& key_mask, bool causal);  // [B, T, W] → [B, T, W]

 private:
  torch::nn::ModuleList blocks_;
  torch::nn::LayerNorm final_norm_{nullptr};
};
TORCH_MODULE(Transformer);

// Mean of x [B, T, W] over the positions where mask [B, T] is true → [B, W].
at::Tensor masked_mean(const at::Tensor& x, const at::Tensor& mask);

}  // namespace vimo::models
