// Defines the vocabulary-parallel (Megatron-style) fused LM-head losses (DESIGN.md, "Parallelism"): McDPO,
// the SFT cross-entropy and the per-sequence log-probs when the LM head weight [V, H] is sharded by rows over
// the ranks of a tensor-parallel group. Each rank holds its shard and the full hidden states; the ranks
// combine per-token statistics (max, Σ exp, target logit) by all-reduce and never gather logits. See Note
// [Vocabulary-parallel LM-head losses] in vocab_parallel_dpo.cpp.
//
// kernels/ depends on nothing of ours (DESIGN.md, "Layout"), so the group is described by a callback, not by
// comm::Communicator: a caller adapts its communicator in one line, e.g.
//   VocabParallelGroup group{.rank = tp->rank(), .size = tp->size(),
//                            .allreduce = [tp](at::Tensor& t, TpReduceOp op) {
//                              tp->allreduce(t, op == TpReduceOp::kMax ? comm::ReduceOp::Max
//                                                                      : comm::ReduceOp::Sum);
//                            }};
//
// Shapes as in fused_linear_dpo.h, with V the whole vocabulary and V_t = the rows of this rank's shard:
//   hidden        [R, T, H]  identical on every rank of the group
//   weight_shard  [V_t, H]   rows [begin, end) of the LM head, (begin, end) = vocab_shard_range(V, rank,
//   size) targets, mask [R, T]     identical on every rank; targets are global ids in [0, V)
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

#include "kernels/fused_linear_dpo.h"

namespace vimo::kernels {

enum class TpReduceOp { kSum, kMax };

// In-place all-reduce of a contiguous tensor (the accumulation dtype of the kernel, on the device of hidden)
// over the tensor-parallel group; every rank ends with the reduction of all ranks' tensors.
using TpAllReduce = std::function<void(at::Tensor&, TpReduceOp)>;

// The tensor-parallel group the LM head is sharded over, as the kernel sees it.
struct VocabParallelGroup {
  int rank = 0;  // this rank's index in the group, 0 ≤ rank < size
  int size = 1;  // the group's size (TP)
  TpAllReduce allreduce;
  // grad_hidden of one rank is partial (its shard's Σ_v dL/dz·W_v): the full gradient is the sum over the
  // group (Megatron's "f" operator: identity forward, all-reduce backward). true: the kernel all-reduces it
  // itself (over the answer rows only), so hidden.grad is complete on every rank. false: hidden.grad stays
  // partial, for a caller that already passed hidden through an f operator (summing twice would be wrong).
  bool sum_grad_hidden = true;
};

// Rows [begin, end) of a vocabulary of V entries held by `rank` of `size`. The rule for any V ≥ size: the
// first V mod size ranks hold ⌈V/size⌉ rows, the others ⌊V/size⌋ (torch.tensor_split's rule), so shards
// differ by at most one row and none is empty. Throws std::invalid_argument when V < size or rank is out of
// range.
struct VocabShardRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};
VocabShardRange vocab_shard_range(int64_t vocabulary, int rank, int size);

// The vocabulary-parallel twins of fused_linear_mcdpo / _sequence_logps / _cross_entropy: the same loss,
// metrics and log-probs on every rank of the group (equal to the single-process results up to the rounding
// of the combination), gradients for hidden (see sum_grad_hidden) and for this rank's weight_shard. Every
// rank of the group must call with the same hidden, targets, mask, reference_logps, config and token
// chunking and the same requires_grad on hidden and weight_shard: the collectives (two per token chunk, one
// for grad_hidden) are issued in an order that depends on them. `vocabulary` is V of the whole LM head.
McDpoResult vocab_parallel_linear_mcdpo(const at::Tensor& hidden, const at::Tensor& weight_shard,
                                        const at::Tensor& targets, const at::Tensor& mask,
                                        const at::Tensor& reference_logps, int64_t vocabulary,
                                        const VocabParallelGroup& group, const McDpoConfig& config = {},
                                        const LmHeadChunking& chunking = {});

at::Tensor vocab_parallel_linear_sequence_logps(const at::Tensor& hidden, const at::Tensor& weight_shard,
                                                const at::Tensor& targets, const at::Tensor& mask,
                                                int64_t vocabulary, const VocabParallelGroup& group,
                                                const LmHeadChunking& chunking = {});

at::Tensor vocab_parallel_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight_shard,
                                               const at::Tensor& targets, const at::Tensor& mask,
                                               int64_t vocabulary, const VocabParallelGroup& group,
                                               const LmHeadChunking& chunking = {});

}  // namespace vimo::kernels
