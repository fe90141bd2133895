// Vocabulary-parallel fused LM-head losses (see vocab_parallel_dpo.h): the shard rule, the checks that the
// group and the shard agree, and the calls into the chunked engine of fused_linear_dpo.cpp with this rank's
// slice of the vocabulary.
//
// Note [Vocabulary-parallel LM-head losses]
// Rank t of a TP group of size P holds the LM-head rows [b_t, e_t) (vocab_shard_range) and the full hidden
// states. The engine (Note [Fused linear LM-head losses] in fused_linear_dpo.cpp) runs unchanged on the
// shard, with one addition after pass 1 of every token chunk: for each token, rank t has its slice's max m_t,
// s_t = Σ_{v ∈ slice} exp(z_v − m_t), and the target logit z_y if y ∈ [b_t, e_t) (else 0). Then
//   M   = max_t m_t                          all-reduce (max)          [c]
//   S   = Σ_t s_t·exp(m_t − M)               all-reduce (sum) of the rescaled sums
//   z_y = Σ_t (z_y on its owner, 0 elsewhere) in the same all-reduce ([2, c] in one message)
//   lse = M + log S
// which is exactly the online log-sum-exp merge of the P blocks, so lse and z_y, hence the per-row log-probs,
// the McDPO coefficients, the loss and the metrics, are the same on every rank; logits never leave a rank
// (2 all-reduces of O(tokens) per chunk instead of a gather of [tokens, V]). The max goes first so that every
// exp has a non-positive argument: no overflow for logits of ±1e4. Pass 2 is local: with the global lse,
// dL/dz_v = w·(exp(z_v − lse) − [v = y]) for v in the slice (the reused tile exp(z − m_t) is scaled by
// exp(m_t − M)/S), giving this rank's grad_weight shard exactly and a partial grad_hidden = Σ_{v ∈ slice}
// dL/dz_v·W_v, which the group sums (VocabParallelGroup::sum_grad_hidden: by default the kernel itself,
// after the last chunk, over the N answer rows only, [N, H] instead of [R·T, H]).
// Every rank visits the same token chunks in the same order (the schedule depends on mask, chunking.tokens
// and whether a gradient is needed, all equal across the group), so the collectives match; the vocabulary
// chunking may differ per rank. Why a callback and not comm::Communicator: kernels/ depends on nothing of
// ours (DESIGN.md), and a std::function is the narrowest seam: the test adapts an MPI communicator, the
// models layer will adapt its TP communicator (NCCL for CUDA tensors) the same way.
#include "kernels/vocab_parallel_dpo.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels/fused_linear_dpo_engine.h"

namespace vimo::kernels {
namespace {

// Checks the group and that `weight_shard` holds this rank's rows; returns the slice for the engine.
detail::VocabSlice slice_of(const std::string& where, const at::Tensor& weight_shard, int64_t vocabulary,
                            const VocabParallelGroup& group) {
  auto fail = [&](const std::string& what) { throw std::invalid_argument(where + ": " + what); };
  if (group.size < 1 || group.rank < 0 || group.rank >= group.size) {
    fail("the group must have size ≥ 1 and 0 ≤ rank < size, got rank " + std::to_string(group.rank) + " of " +
         std::to_string(group.size));
  }
  if (!group.allreduce)
    fail("group.allreduce is empty; HINT: adapt the TP communicator (vocab_parallel_dpo.h)");
  const VocabShardRange range = vocab_shard_range(vocabulary, group.rank, group.size);
  if (!weight_shard.defined() || weight_shard.dim() != 2 || weight_shard.size(0) != range.size()) {
    fail("rank " + std::to_string(group.rank) + " of " + std::to_string(group.size) + " must hold rows [" +
         std::to_string(range.begin) + ", " + std::to_string(range.end) + ") of the [" +
         std::to_string(vocabulary) + ", H] LM head, i.e. a weight shard of " + std::to_string(range.size()) +
         " rows, got " +
         (weight_shard.defined() ? std::to_string(weight_shard.dim()) + "-d tensor with " +
                                       std::to_string(weight_shard.size(0)) + " rows"
                                 : std::string("an undefined tensor")) +
         "; HINT: slice the weight with vocab_shard_range");
  }
  return {.begin = range.begin, .vocabulary = vocabulary, .group = &group};
}

}  // namespace

VocabShardRange vocab_shard_range(int64_t vocabulary, int rank, int size) {
  if (size < 1 || rank < 0 || rank >= size) {
    throw std::invalid_argument("vocab_shard_range: need 0 ≤ rank < size, got rank " + std::to_string(rank) +
                                " of " + std::to_string(size));
  }
  if (vocabulary < size) {
    throw std::invalid_argument("vocab_shard_range: a vocabulary of " + std::to_string(vocabulary) +
                                " entries cannot be split over " + std::to_string(size) +
                                " ranks without an empty shard; HINT: use a smaller TP size");
  }
  const int64_t base = vocabulary / size, extra = vocabulary % size;
  const int64_t begin = rank * base + std::min<int64_t>(rank, extra);
  return {.begin = begin, .end = begin + base + (rank < extra ? 1 : 0)};
}

McDpoResult vocab_parallel_linear_mcdpo(const at::Tensor& hidden, const at::Tensor& weight_shard,
                                        const at::Tensor& targets, const at::Tensor& mask,
                                        const at::Tensor& reference_logps, int64_t vocabulary,
                                        const VocabParallelGroup& group, const McDpoConfig& config,
                                        const LmHeadChunking& chunking) {
  const std::string where = "vocab_parallel_linear_mcdpo";
  return detail::linear_mcdpo(where, hidden, weight_shard, targets, mask, reference_logps, config, chunking,
                              slice_of(where, weight_shard, vocabulary, group));
}

at::Tensor vocab_parallel_linear_sequence_logps(const at::Tensor& hidden, const at::Tensor& weight_shard,
                                                const at::Tensor& targets, const at::Tensor& mask,
                                                int64_t vocabulary, const VocabParallelGroup& group,
                                                const LmHeadChunking& chunking) {
  const std::string where = "vocab_parallel_linear_sequence_logps";
  return detail::linear_sequence_logps(where, hidden, weight_shard, targets, mask, chunking,
                                       slice_of(where, weight_shard, vocabulary, group));
}

at::Tensor vocab_parallel_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight_shard,
                                               const at::Tensor& targets, const at::Tensor& mask,
                                               int64_t vocabulary, const VocabParallelGroup& group,
                                               const LmHeadChunking& chunking) {
  const std::string where = "vocab_parallel_linear_cross_entropy";
  return detail::linear_cross_entropy(where, hidden, weight_shard, targets, mask, chunking,
                                      slice_of(where, weight_shard, vocabulary, group));
}

}  // namespace vimo::kernels
