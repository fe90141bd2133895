// Defines the entry points of the chunked two-pass LM-head engine (the engine in fused_linear_dpo.cpp, these
// entry points in fused_linear_dpo_autograd.cpp), shared by the single-process losses (fused_linear_dpo.h:
// the whole vocabulary is one slice) and the vocabulary-parallel ones (vocab_parallel_dpo.h: this rank's
// slice, statistics combined over the group). Internal to kernels/.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "kernels/fused_linear_dpo.h"
#include "kernels/vocab_parallel_dpo.h"

namespace vimo::kernels::detail {

// The part of the vocabulary whose LM-head rows `weight` holds.
struct VocabSlice {
  int64_t begin = 0;       // global id of weight row 0
  int64_t vocabulary = 0;  // V of the whole vocabulary (the range of targets); 0 = weight.size(0)
  // The group to combine per-token statistics over; null when the slice is the whole vocabulary. Must
  // outlive the call.
  const VocabParallelGroup* group = nullptr;
};

// `where` names the public function in errors.
McDpoResult linear_mcdpo(const std::string& where, const at::Tensor& hidden, const at::Tensor& weight,
                         const at::Tensor& targets, const at::Tensor& mask, const at::Tensor& reference_logps,
                         const McDpoConfig& config, const LmHeadChunking& chunking, const VocabSlice& slice);
at::Tensor linear_sequence_logps(const std::string& where, const at::Tensor& hidden, const at::Tensor& weight,
                                 const at::Tensor& targets, const at::Tensor& mask,
                                 const LmHeadChunking& chunking, const VocabSlice& slice);
at::Tensor linear_cross_entropy(const std::string& where, const at::Tensor& hidden, const at::Tensor& weight,
                                const at::Tensor& targets, const at::Tensor& mask,
                                const LmHeadChunking& chunking, const VocabSlice& slice);

}  // namespace vimo::kernels::detail
