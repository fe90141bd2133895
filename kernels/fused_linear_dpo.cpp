// Defines the engine of the fused LM-head losses (fused_linear_dpo.h): the two passes over the answer tokens
// that give the per-row log-probs and, when asked for, the gradients, on CPU and, in a build with
// VIMO_HAVE_CUDA, on CUDA tensors (detail::run_passes of fused_linear_dpo_internal.h). One engine serves the
// single-process losses and the vocabulary-parallel ones of vocab_parallel_dpo.h (Note [Vocabulary-parallel
// LM-head losses] there); the input checks, the losses and metrics from the log-probs, the autograd function
// and the eager compositions are in fused_linear_dpo_autograd.cpp.
//
// Note [One engine, two devices]
// The engine below is written once: the products are at::mm / addmm on the inputs' device (MKL or cuBLAS),
// the schedule, per-row log-probs and McDPO coefficients are host-side (one copy of [c] values per token
// chunk from a GPU), and only the per-tile passes differ by device: pass 1's tile_statistics runs ATen ops
// plus host loops on CPU and a kernel of kernels/cuda/fused_linear_dpo.cu on CUDA; pass 2 is
// cpu_chunk_gradient on CPU (the products take the per-token factors, Note [Row scales in the products]) and
// tile_gradient + the products on CUDA; both use the scalar math of dpo_math.h. A slice of the vocabulary
// (weight = rows [begin, begin + V) of the head) changes only the target columns and adds combine_over_group
// after pass 1.
//
// Note [Fused linear LM-head losses]
// All three losses are functions of the per-row answer log-probs
//   logπ(row) = Σ_{t ∈ answer} (z_t[y_t] − lse_t),   z_t = h_t·Wᵀ [V],  lse_t = log Σ_v exp(z_t[v])
// (McDPO: L = α/P·Σ_i ℓ(Δ_i) − γ/N_c·Σ_i logπ(y_w,i), see dpo_math.h; SFT: L = −Σ_rows logπ / N_answer;
// reference: the log-probs themselves). With c_row = dL/dlogπ(row), the gradient of one logit is
//   dL/dz_t[v] = w_t·(softmax(z_t)[v] − [v == y_t]),   w_t = −c_row(t)       (dpo_math::logit_gradient)
// so grad_hidden_t = Σ_v dL/dz_t[v]·W_v and grad_W = Σ_t (dL/dz_t)ᵀ·h_t: one matrix product each per chunk.
// Only answer tokens are visited (masked tokens contribute nothing), in chunks of at most `tokens` tokens
// and `vocabulary` columns, so no [R, T, V] tensor exists: a chunk's logits [tokens, vocabulary] are the
// largest temporary.
//   pass 1 (per tile): logits = X_chunk·W_chunkᵀ; the target logit, the block max and Σ exp(z − max) per
//          token, merged over vocabulary chunks into the running log-sum-exp (dpo_math::merge_block).
//   then:  per-row log-probs; c_row from them.
//   pass 2 (per tile, only when a gradient is needed): G = w·(softmax − onehot) in the accumulation dtype,
//          grad_hidden_chunk += G·W_chunk, grad_W_chunk += Gᵀ·X_chunk (on CPU the same products without
//          forming G, Note [Row scales in the products]).
// McDPO couples tokens: c_row depends on Δ of the row's pair, known only once every token of the pair has
// been through pass 1. So tokens are visited pair by pair (chosen row i, then rejected row B + i), whole
// pairs packed into groups of at most `tokens` answer tokens; after a group's pass 1 its pairs are complete
// and its pass 2 can run. When the group is a single tile (one token chunk, one vocabulary chunk) pass 2
// reuses pass 1's exp(z − max) and the logits are computed once: 3 LM-head products, the same as eager.
// Only a pair with more answer tokens than the chunk, or vocabulary chunking, recomputes its logits (4
// products). Without coupling (SFT; McDPO with α = 0) c_row is known up front and every token chunk is a
// group of one tile.
//
// Note [Threads in the fused LM-head kernel]
// The three products per tile are LibTorch matrix products (MKL, multi-threaded) and the element-wise work
// (max, exp, sums, scaling: ~10% of a tile's time) is ATen kernels, which parallelize internally; the
// per-token scalar loops (target logits, log-sum-exp merge) are O(tokens) and stay serial. We do not run
// token chunks in parallel with at::parallel_for: every chunk adds into all of grad_W [V, H], so that would
// need a private grad_W per thread (V·H floats each) or a lock, and on this project's 2-core machine the
// products already use both cores. bench/README.md has the 1- and 2-thread figures.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/dpo_math.h"
#include "kernels/fused_linear_dpo_internal.h"

#if defined(VIMO_HAVE_CUDA)
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda/fused_linear_dpo.cuh"
#endif

namespace vimo::kernels::detail {
namespace {

#if defined(VIMO_HAVE_CUDA)
void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("fused LM-head loss: CUDA ") + what + " kernel failed: " +
                             cudaGetErrorString(status) + "; HINT: the device must be sm_80 or sm_90");
  }
}
#endif

// c_row = dL/dlogπ(row) [R] for McDPO pairs [begin, end) from the log-probs so far (see dpo_math.h).
void mcdpo_coefficients(const Task& task, const double* row_logps, int64_t begin, int64_t end, int64_t B,
                        double* coefficients) {
  const double* ref = task.reference_logps.data_ptr<double>();
  const double gamma_per_token =
      task.chosen_tokens > 0 ? task.dpo.gamma / static_cast<double>(task.chosen_tokens) : 0.0;
  for (int64_t i = begin; i < end; ++i) {
    const double delta = dpo_math::pair_delta(row_logps[i], ref[i], row_logps[B + i], ref[B + i]);
    const auto term = dpo_math::mcdpo_pair_term(delta, task.dpo.beta, task.dpo.epsilon);
    const auto c = dpo_math::mcdpo_row_coefficients(term.d_delta, task.dpo.alpha / static_cast<double>(B),
                                                    gamma_per_token);
    coefficients[i] = c.chosen;
    coefficients[B + i] = c.rejected;
  }
}

// The order in which answer tokens are visited and where groups end (Note [Fused linear LM-head losses]).
struct Schedule {
  std::vector<int64_t> tokens;      // flat positions r·T + t of the answer tokens, in visiting order
  std::vector<int64_t> group_ends;  // end of each group in `tokens`
  std::vector<int64_t> pair_ends;   // coupled only: pairs [previous end, end) complete after each group
};

Schedule make_schedule(const at::Tensor& mask, bool coupled, int64_t chunk) {
  const at::Tensor m = mask.contiguous();
  const bool* answer = m.data_ptr<bool>();
  const int64_t R = m.size(0), T = m.size(1);
  Schedule s;
  auto append_row = [&](int64_t r) {
    for (int64_t t = 0; t < T; ++t) {
      if (answer[r * T + t]) s.tokens.push_back(r * T + t);
    }
  };
  if (!coupled) {
    for (int64_t r = 0; r < R; ++r) append_row(r);
    const auto n = static_cast<int64_t>(s.tokens.size());
    for (int64_t end = std::min(chunk, n); end > 0; end = end == n ? 0 : std::min(end + chunk, n)) {
      s.group_ends.push_back(end);
    }
    return s;
  }
  const int64_t B = R / 2;
  int64_t group_begin = 0;
  for (int64_t i = 0; i < B; ++i) {
    const auto pair_begin = static_cast<int64_t>(s.tokens.size());
    append_row(i);
    append_row(B + i);
    const auto end = static_cast<int64_t>(s.tokens.size());
    // Close the open group before this pair when the pair would overflow it.
    if (end - group_begin > chunk && pair_begin > group_begin) {
      s.group_ends.push_back(pair_begin);
      s.pair_ends.push_back(i);
      group_begin = pair_begin;
    }
  }
  s.group_ends.push_back(static_cast<int64_t>(s.tokens.size()));
  s.pair_ends.push_back(B);
  return s;
}

// One token chunk's operands and per-token statistics, all in the accumulation dtype, on the device of
// hidden.
struct TokenChunk {
  at::Tensor index;                  // [c] flat positions (int64)
  at::Tensor x;                      // [c, H]
  std::vector<int64_t> target, row;  // target: column in this slice's weight, or −1 when outside the slice
  at::Tensor target_column;          // [c] int64 `target` on the device (CUDA only)
  at::Tensor target_logit;           // [c] over the whole vocabulary
  at::Tensor lse;                    // [c] over the whole vocabulary
  at::Tensor local_scale;            // [c] exp(local max − max): 1 without a group
  at::Tensor sum;                    // [c] Σ exp(z − max) over the whole vocabulary
};

// Combines one token chunk's per-slice statistics over the group, in place: `max`, `sum` [c] hold this
// slice's (max, Σ exp(z − max)) and leave holding the whole vocabulary's; `target_logit` [c] holds the
// target's logit where this slice has the target and 0 elsewhere, and leaves holding it everywhere. Two
// all-reduces (max, then sum of the rescaled sums and target logits); see Note [Vocabulary-parallel LM-head
// losses] in vocab_parallel_dpo.cpp.
void combine_over_group(const VocabParallelGroup& group, at::Tensor& max, at::Tensor& sum,
                        at::Tensor& target_logit) {
  at::Tensor global_max = max.clone();  // [c]
  group.allreduce(global_max, TpReduceOp::kMax);
  at::Tensor sums = at::stack({sum * (max - global_max).exp(), target_logit});  // [2, c]
  group.allreduce(sums, TpReduceOp::kSum);
  max.copy_(global_max);
  sum.copy_(sums[0]);
  target_logit.copy_(sums[1]);
}

// Values of a tile that one thread's element passes visit at a time: 512 KiB of float32, within a core's L2.
constexpr int64_t kCacheBlockValues = 128 * 1024;

// Pass 1 over one logits tile [c, vc] (vocabulary columns [v0, v0 + vc) of the slice): folds each token's
// (max, Σ exp) into running_max / running_sum [c] and picks the target logits. With keep_exp the tile is left
// holding exp(z − tile max) for pass 2.
template <typename scalar_t>
void tile_statistics(at::Tensor& logits, int64_t v0, const TokenChunk& chunk, at::Tensor& running_max,
                     at::Tensor& running_sum, bool keep_exp) {
  const int64_t c = logits.size(0), vc = logits.size(1);
#if defined(VIMO_HAVE_CUDA)
  if (logits.is_cuda()) {
    check_cuda(cuda::launch_token_statistics<scalar_t>(
                   logits.data_ptr<scalar_t>(), c, vc, v0, chunk.target_column.data_ptr<int64_t>(),
                   running_max.data_ptr<scalar_t>(), running_sum.data_ptr<scalar_t>(),
                   chunk.target_logit.data_ptr<scalar_t>(), keep_exp, c10::cuda::getCurrentCUDAStream()),
               "token statistics");
    return;
  }
#endif
  const scalar_t* z = logits.data_ptr<scalar_t>();
  scalar_t* target_logit = chunk.target_logit.data_ptr<scalar_t>();
  for (int64_t k = 0; k < c; ++k) {
    const int64_t y = chunk.target[k];
    if (y >= v0 && y < v0 + vc) target_logit[k] = z[k * vc + (y - v0)];
  }
  // Max, exp and sum of a block of rows while the block is in cache (the tile is tens of MiB), blocks spread
  // over the threads.
  const at::Tensor block_max = at::empty({c}, logits.options()), block_sum = at::empty({c}, logits.options());
  const int64_t rows_per_block = std::max<int64_t>(1, kCacheBlockValues / vc);
  at::parallel_for(0, c, rows_per_block, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += rows_per_block) {
      const int64_t count = std::min(rows_per_block, end - first);
      at::Tensor block = logits.narrow(0, first, count);  // [count, vc]
      at::Tensor max = block_max.narrow(0, first, count), sum = block_sum.narrow(0, first, count);
      at::amax_out(max, block, {1});
      block.sub_(max.unsqueeze(1)).exp_();
      at::sum_out(sum, block, {1});
    }
  });
  const scalar_t* bm = block_max.data_ptr<scalar_t>();
  const scalar_t* bs = block_sum.data_ptr<scalar_t>();
  scalar_t* m = running_max.data_ptr<scalar_t>();
  scalar_t* s = running_sum.data_ptr<scalar_t>();
  for (int64_t k = 0; k < c; ++k) {
    dpo_math::RunningLogSumExp<scalar_t> running{m[k], s[k]};
    dpo_math::merge_block(running, bm[k], bs[k]);
    m[k] = running.max;
    s[k] = running.sum;
  }
}

#if defined(VIMO_HAVE_CUDA)
// Pass 2 over one CUDA tile, in place: grad_logits = w·(softmax − onehot) [c, vc]. The tile holds the logits,
// or with `kept` pass 1's exp(z − tile max) (single tile). The CPU's pass 2 is cpu_chunk_gradient.
template <typename scalar_t>
void tile_gradient(at::Tensor& tile, int64_t v0, const TokenChunk& chunk, const at::Tensor& token_weight,
                   bool kept) {
  const int64_t c = tile.size(0), vc = tile.size(1);
  const at::Tensor exp_scale = kept ? token_weight * chunk.local_scale / chunk.sum : at::Tensor();  // [c]
  check_cuda(cuda::launch_gradient_tile<scalar_t>(
                 tile.data_ptr<scalar_t>(), c, vc, v0, chunk.target_column.data_ptr<int64_t>(),
                 chunk.lse.data_ptr<scalar_t>(), chunk.target_logit.data_ptr<scalar_t>(),
                 token_weight.data_ptr<scalar_t>(), kept ? exp_scale.data_ptr<scalar_t>() : nullptr,
                 c10::cuda::getCurrentCUDAStream()),
             "gradient tile");
}
#endif

// Note [Row scales in the products]
// On CPU pass 2 never forms G = w·(softmax − onehot) [c, vc]: every row of G is the tile's exponentials E
// times one factor per token, r_k = w_k·exp(local max − max)/Σ (pass 1's kept tile) or w_k (a recomputed tile
// E = exp(z − lse)), except at the target, whose w·(p − 1) must be formed as w·expm1(z_y − lse) (dpo_math.h).
// So the target entry of E is set to 0 and its term t_k = w_k·expm1(z_y − lse_k) handled on its own, and the
// factors move into the products' operands, where they cost O(c·H) instead of a pass over [c, vc]:
//   grad_x = diag(r)·(E·W) + t ⊙ W[y]         grad_W += Eᵀ·(diag(r)·X),  grad_W[y] += t ⊙ X
// The same sums as G·W and Gᵀ·X, rounded in another order; no cancellation is introduced (E ≥ 0 holds only
// the non-target probabilities, as G's non-target entries did). CUDA keeps its gradient-tile kernel.
template <typename scalar_t>
void cpu_chunk_gradient(const TokenChunk& chunk, const at::Tensor& w, const at::Tensor& token_weight,
                        int64_t vocab_chunk, at::Tensor kept, Passes& out) {
  const auto c = static_cast<int64_t>(chunk.row.size());
  const int64_t V = w.size(0);
  const scalar_t* wt = token_weight.data_ptr<scalar_t>();
  const scalar_t* lse = chunk.lse.data_ptr<scalar_t>();
  const scalar_t* target_logit = chunk.target_logit.data_ptr<scalar_t>();
  // r [c]: turns a row of E into w·softmax (Note [Row scales in the products]).
  const at::Tensor row_scale = kept.defined() ? token_weight * chunk.local_scale / chunk.sum : token_weight;
  std::vector<int64_t> target_tokens, target_columns;  // tokens whose target lies in this slice, its column
  std::vector<scalar_t> target_terms;                  // t_k = w_k·expm1(z_y − lse_k)
  for (int64_t k = 0; k < c; ++k) {
    if (chunk.target[k] < 0) continue;
    target_tokens.push_back(k);
    target_columns.push_back(chunk.target[k]);
    target_terms.push_back(dpo_math::logit_gradient(target_logit[k], lse[k], true, wt[k]));
  }
  const at::Tensor scaled_x = out.grad_weight.defined() ? chunk.x * row_scale.unsqueeze(1) : at::Tensor();
  at::Tensor grad_x;  // E·W summed over the vocabulary chunks [c, H]
  for (int64_t v0 = 0; v0 < V; v0 += vocab_chunk) {
    const int64_t vc = std::min(vocab_chunk, V - v0);
    const at::Tensor w_chunk = w.narrow(0, v0, vc);  // [vc, H]
    const at::Tensor exps =
        kept.defined() ? kept
                       : at::mm(chunk.x, w_chunk.t()).sub_(chunk.lse.unsqueeze(1)).exp_();  // E [c, vc]
    scalar_t* e = exps.data_ptr<scalar_t>();
    for (size_t k = 0; k < target_tokens.size(); ++k) {
      const int64_t y = target_columns[k];
      if (y >= v0 && y < v0 + vc) e[target_tokens[k] * vc + (y - v0)] = 0;
    }
    if (out.grad_hidden.defined())
      grad_x = grad_x.defined() ? grad_x.addmm_(exps, w_chunk) : at::mm(exps, w_chunk);
    if (out.grad_weight.defined()) out.grad_weight.narrow(0, v0, vc).addmm_(exps.t(), scaled_x);
  }
  const at::Tensor tokens = at::tensor(target_tokens, at::kLong),
                   columns = at::tensor(target_columns, at::kLong);
  const at::Tensor terms =
      at::tensor(at::ArrayRef<scalar_t>(target_terms), w.options()).unsqueeze(1);  // [targets, 1]
  if (out.grad_hidden.defined()) {
    grad_x.mul_(row_scale.unsqueeze(1)).index_add_(0, tokens, w.index_select(0, columns) * terms);
    // Answer positions are distinct, so a copy (not an add) places the rows.
    out.grad_hidden.index_copy_(0, chunk.index, grad_x);
  }
  if (out.grad_weight.defined())
    out.grad_weight.index_add_(0, columns, chunk.x.index_select(0, tokens) * terms);
}

// The engine of Note [Fused linear LM-head losses] on the device of hidden: the products are at::mm / addmm
// (MKL on CPU, cuBLAS on CUDA), the tile passes tile_statistics / tile_gradient; the schedule, the per-row
// log-probs and the coefficients live on the host (one copy of [c] values per token chunk on CUDA).
template <typename scalar_t>
Passes run_passes_typed(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                        const at::Tensor& mask, const Task& task, bool need_hidden, bool need_weight) {
  const at::ScalarType acc = c10::CppTypeToScalarType<scalar_t>::value;
  // V: the rows of this slice; global target ids map to columns y − slice.begin.
  const int64_t R = hidden.size(0), T = hidden.size(1), H = hidden.size(2), V = weight.size(0);
  const VocabParallelGroup* group = task.slice.group;
  const bool on_cuda = hidden.is_cuda();
  const at::Tensor x_all = hidden.reshape({R * T, H});  // [R·T, H] input dtype
  const at::Tensor w = weight.to(acc).contiguous();     // [V, H]; a copy only for bfloat16
  const at::Tensor target_ids = targets.reshape({R * T}).cpu().contiguous();  // [R·T] int64, host
  const int64_t* target_of = target_ids.data_ptr<int64_t>();
  const bool gradient = task.objective != Objective::kLogProbs && (need_hidden || need_weight);
  const bool coupled = gradient && task.objective == Objective::kMcDpo && task.dpo.alpha != 0;
  const int64_t token_chunk = task.chunking.tokens;
  const int64_t vocab_chunk = task.chunking.vocabulary == 0 ? V : std::min(task.chunking.vocabulary, V);
  const Schedule schedule = make_schedule(mask.cpu(), coupled, token_chunk);
  const at::Tensor visit = at::tensor(schedule.tokens, at::kLong).to(hidden.device());  // [N]

  Passes out;
  out.row_logps = at::zeros({R}, at::kDouble);
  double* row_logps = out.row_logps.data_ptr<double>();
  std::vector<double> coefficients(R, 0.0);  // dL/dlogπ(row)
  if (gradient && task.objective == Objective::kCrossEntropy) {
    coefficients.assign(R, -1.0 / static_cast<double>(std::max<int64_t>(task.answer_tokens, 1)));
  } else if (gradient && !coupled) {  // McDPO with α = 0: c_row does not depend on the log-probs
    mcdpo_coefficients(task, row_logps, 0, R / 2, R / 2, coefficients.data());
  }
  if (need_hidden && gradient) out.grad_hidden = at::zeros({R * T, H}, w.options());
  if (need_weight && gradient) out.grad_weight = at::zeros({V, H}, w.options());

  int64_t group_begin = 0, pair_begin = 0;
  for (size_t g = 0; g < schedule.group_ends.size(); ++g) {
    const int64_t group_end = schedule.group_ends[g];
    const bool single_tile = group_end - group_begin <= token_chunk && vocab_chunk == V;
    std::vector<TokenChunk> chunks;
    at::Tensor kept_exp;  // single tile: exp(z − local max) [c, V]
    // Pass 1.
    for (int64_t begin = group_begin; begin < group_end; begin += token_chunk) {
      const int64_t c = std::min(token_chunk, group_end - begin);
      TokenChunk chunk;
      chunk.index = visit.narrow(0, begin, c);
      chunk.x = x_all.index_select(0, chunk.index).to(acc);  // [c, H]
      for (int64_t k = 0; k < c; ++k) {
        const int64_t flat = schedule.tokens[begin + k];
        const int64_t column = target_of[flat] - task.slice.begin;
        chunk.target.push_back(column >= 0 && column < V ? column : -1);
        chunk.row.push_back(flat / T);
      }
      if (on_cuda) chunk.target_column = at::tensor(chunk.target, at::kLong).to(hidden.device());
      chunk.target_logit = at::zeros({c}, w.options());
      at::Tensor max = at::full({c}, -std::numeric_limits<scalar_t>::infinity(), w.options());  // [c]
      at::Tensor sum = at::zeros({c}, w.options());                                             // [c]
      for (int64_t v0 = 0; v0 < V; v0 += vocab_chunk) {
        const int64_t vc = std::min(vocab_chunk, V - v0);
        at::Tensor logits = at::mm(chunk.x, w.narrow(0, v0, vc).t());  // [c, vc]
        tile_statistics<scalar_t>(logits, v0, chunk, max, sum, single_tile && gradient);
        if (single_tile && gradient) kept_exp = logits;
      }
      const at::Tensor local_max = max.clone();  // [c]
      if (group != nullptr) combine_over_group(*group, max, sum, chunk.target_logit);
      chunk.sum = sum;
      if (on_cuda) {
        chunk.local_scale = (local_max - max).exp();
        chunk.lse = max + sum.log();
      } else {
        chunk.local_scale = at::empty({c}, w.options());
        chunk.lse = at::empty({c}, w.options());
        const scalar_t *m = max.data_ptr<scalar_t>(), *lm = local_max.data_ptr<scalar_t>(),
                       *s = sum.data_ptr<scalar_t>();
        scalar_t* local_scale = chunk.local_scale.data_ptr<scalar_t>();
        scalar_t* lse = chunk.lse.data_ptr<scalar_t>();
        for (int64_t k = 0; k < c; ++k) {
          local_scale[k] = std::exp(lm[k] - m[k]);
          lse[k] = dpo_math::log_sum_exp(dpo_math::RunningLogSumExp<scalar_t>{m[k], s[k]});
        }
      }
      const at::Tensor token_logps = (chunk.target_logit - chunk.lse).cpu();  // [c] host
      const scalar_t* lp = token_logps.data_ptr<scalar_t>();
      for (int64_t k = 0; k < c; ++k) row_logps[chunk.row[k]] += static_cast<double>(lp[k]);
      chunks.push_back(std::move(chunk));
    }
    group_begin = group_end;
    if (!gradient) continue;
    if (coupled) {
      const int64_t pair_end = schedule.pair_ends[g];
      mcdpo_coefficients(task, row_logps, pair_begin, pair_end, R / 2, coefficients.data());
      pair_begin = pair_end;
    }
    // Pass 2.
    for (TokenChunk& chunk : chunks) {
      const auto c = static_cast<int64_t>(chunk.row.size());
      at::Tensor token_weight = at::empty({c}, w.options().device(at::kCPU));  // w_t = −c_row [c]
      scalar_t* wt = token_weight.data_ptr<scalar_t>();
      bool any = false;
      for (int64_t k = 0; k < c; ++k) {
        wt[k] = static_cast<scalar_t>(-coefficients[chunk.row[k]]);
        any = any || wt[k] != 0;
      }
      if (!any) continue;  // e.g. the rejected rows when α = 0
      const at::Tensor kept = single_tile ? std::exchange(kept_exp, at::Tensor()) : at::Tensor();  // [c, V]
      if (!on_cuda) {
        cpu_chunk_gradient<scalar_t>(chunk, w, token_weight, vocab_chunk, kept, out);
        continue;
      }
#if defined(VIMO_HAVE_CUDA)
      token_weight = token_weight.to(hidden.device());
      at::Tensor grad_x;  // [c, H]
      for (int64_t v0 = 0; v0 < V; v0 += vocab_chunk) {
        const int64_t vc = std::min(vocab_chunk, V - v0);
        const at::Tensor w_chunk = w.narrow(0, v0, vc);                              // [vc, H]
        at::Tensor grad_logits = single_tile ? kept : at::mm(chunk.x, w_chunk.t());  // [c, vc]
        tile_gradient<scalar_t>(grad_logits, v0, chunk, token_weight, single_tile);
        if (out.grad_hidden.defined()) {
          grad_x = grad_x.defined() ? grad_x.addmm_(grad_logits, w_chunk) : at::mm(grad_logits, w_chunk);
        }
        if (out.grad_weight.defined()) out.grad_weight.narrow(0, v0, vc).addmm_(grad_logits.t(), chunk.x);
      }
      // Answer positions are distinct, so a copy (not an add) places the rows.
      if (out.grad_hidden.defined()) out.grad_hidden.index_copy_(0, chunk.index, grad_x);
#endif
    }
  }
  // The Megatron "f" backward: Σ over the group of each slice's partial grad_hidden, answer rows only (the
  // others are 0 on every rank). Every rank has the same schedule, so the same N.
  if (group != nullptr && group->sum_grad_hidden && out.grad_hidden.defined() && visit.numel() > 0) {
    at::Tensor rows = out.grad_hidden.index_select(0, visit);  // [N, H]
    group->allreduce(rows, TpReduceOp::kSum);
    out.grad_hidden.index_copy_(0, visit, rows);
  }
  return out;
}

}  // namespace

Passes run_passes(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                  const at::Tensor& mask, const Task& task, bool need_hidden, bool need_weight) {
  at::NoGradGuard no_grad;
  c10::OptionalDeviceGuard device_guard;  // the CUDA kernels launch on hidden's device's current stream
  if (hidden.is_cuda()) device_guard.reset_device(hidden.device());
  if (hidden.scalar_type() == at::kDouble) {
    return run_passes_typed<double>(hidden, weight, targets, mask, task, need_hidden, need_weight);
  }
  return run_passes_typed<float>(hidden, weight, targets, mask, task, need_hidden, need_weight);
}

}  // namespace vimo::kernels::detail
