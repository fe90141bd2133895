// Defines the two passes of the fused symmetric InfoNCE (fused_contrastive.h) over one score matrix, on CPU
// and CUDA: detail::run_score_passes of fused_contrastive_internal.h. The input layouts, the branch operands
// R̃ and C̃, the chain rule back to the inputs and the autograd function are in fused_contrastive_autograd.cpp.
//
// Note [Two-pass symmetric InfoNCE]
// Every form of the loss is a row-wise cross-entropy over scores S [n, N] that are ONE matrix product of
// branch-concatenated, pre-scaled operands:
//   S = Σ_b s_b · (ρ_b ⊙ R_b) · (γ_b ⊙ C_b)ᵀ = R̃ · C̃ᵀ,   R̃ = [s_b ρ_b R_b]_b [n, K],  C̃ = [γ_b C_b]_b [N, K]
// with R_b [n, D_b] the rows, C_b [N, D_b] the columns, s_b the branch scale, ρ_b a weight per row and γ_b a
// weight per column (router softmax of the video, DESIGN.md "The two losses"; 1 where absent) and K = Σ D_b.
// Single branch: K = D. Gemini router stage: action and object side by side, K = D_act + D_obj.
//
// One process (local and gathered inputs are the same tensors, n = N, offset 0): the video→text scores are
// the transpose of the text→video scores, so ONE matrix serves both directions: its row softmax is text→video
// and its column softmax video→text. In data parallelism they differ (local × all in both directions) and
// each direction is its own matrix with a row softmax only. Per matrix, in strips of `tile` rows spanning all
// N columns (a strip holds whole rows, so each row's log-sum-exp is finished inside its strip):
//   pass 1: S_strip = R̃_strip · C̃ᵀ (GEMM); row lse = max + log Σ exp(S − max); with the column softmax each
//           column's Σ exp over the strip is folded into running sums (online softmax, Milakov & Gimelshein).
//   pass 2: recompute S_strip (GEMM); G = dL/dS = c·(exp(S − lse_row) [+ exp(S − lse_col)]) − c·onehot, c =
//           1/(2n) (contrastive_math.h); dL/dR̃_strip = G · C̃ (GEMM, rows owned by the strip) and
//           dL/dC̃ += Gᵀ · R̃_strip (GEMM, per-thread accumulator, summed at the end).
// Without the column softmax a strip's rows are finished inside it, so its pass 2 follows its pass 1 at once,
// without recomputing S. On CPU each visit takes one exponential per score (Note [Shared exponentials]).
// GEMMs of n·N·K each: 4 in one process (eager autograd makes 3 with S once and Sᵀ for video→text, Note [The
// eager baseline computes S once] in contrastive_loss.cpp; 6 with the two directions as products of their
// own), 6 in data parallelism (eager 6); in one process one fewer for the strips kept in the score cache
// (Note [Score cache]): 3 when N ≤ 4K. Fewer is impossible: dL/dR̃ and dL/dC̃ are each a product with G, and G
// needs S. The chain rule back through R̃ and C̃ is O((n + N)·K):
//   dL/dR_b = s_b ρ_b ⊙ X_b   dL/dC_b = γ_b ⊙ Y_b   dL/ds_b = Σ_i ρ_b,i ⟨R_b,i, X_b,i⟩
//   dL/dρ_b,i = s_b ⟨R_b,i, X_b,i⟩   dL/dγ_b,j = ⟨C_b,j, Y_b,j⟩       (X = dL/dR̃, Y = dL/dC̃, columns of b)
// so no per-branch dot products are ever formed. The gradients are computed in the forward pass (Liger's
// fused-linear-cross-entropy design): backward only multiplies the stored gradients by dL_out. Only the
// products whose results are needed run: the router stage, which trains only the router weights γ, skips
// dL/dR̃. Memory beyond inputs and gradients: R̃, C̃, dL/dR̃, dL/dC̃, the score cache (≤ 2(n + N)·K values), two
// [tile, N] strips (and, with threads, one dL/dC̃ [N, K]) per thread, O(n + N) vectors; never [n, N] (unless
// it fits the cache). Strips go to threads in a fixed partition and the per-thread accumulators are summed in
// thread order, so results are deterministic for a given thread count. Accumulation is float32 for
// float32/bfloat16 inputs and float64 for float64 inputs. On CUDA the two passes (two visits per strip also
// without the column softmax, no score cache) run with cuBLAS products (at::mm) and the element kernels of
// cuda/fused_contrastive.cu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/contrastive_math.h"
#include "kernels/fused_contrastive_internal.h"

#if defined(VIMO_HAVE_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/cuda/fused_contrastive.cuh"
#endif

namespace vimo::kernels::detail {
namespace {

// Note [Shared exponentials]
// The CPU passes take ONE exponential per score per visit, E = exp(S − m_i) with m_i the row's max, and form
// both softmaxes from it instead of exp(S − lse_row) and exp(S − lse_col) (contrastive_math::score_gradient):
//   row:    exp(S_ij − lse_i) = E_ij / Σ_j E_ij                          (lse_i = m_i + log Σ_j E_ij)
//   column: exp(S_ij − lse_j) = E_ij · u_i / σ_j,  u_i = exp(m_i − M),   σ_j = Σ_i E_ij · u_i
// with M the largest score of the matrix, so lse_j = M + log σ_j and σ = Eᵀ·u is a matrix-vector product per
// strip (folded across strips and threads with a running M, like the online softmax). Then
//   G = dL/dS = E ⊙ (a·1ᵀ + u·bᵀ) − c·onehot,   a_i = c / Σ_j E_ij,   b_j = c / σ_j
// one element pass, no exponential beyond E. Exact in the floating-point sense, not an approximation: every
// factor is a correctly computed exp or sum, and no cancellation occurs (all terms are positive). It breaks
// down only where a term that matters underflows: for column j the terms that matter are within ~40 of the
// column's max μ_j, so if M − μ_j ≤ kFarColumnGap (40) every such term has E_ij, u_i ≥ e^-80 (normal in
// float32 and float64) and what underflows weighs < N·e^-80 against σ_j ≥ e^-40. Columns farther below M (a
// scale of 100 or more with a video no caption matches) are "far": their σ_j and gradient column are computed
// from their scores directly, S[:, far] = R̃·C̃_farᵀ (a product of |far| columns only, none in the usual case),
// as exp(S − lse_j) per score. Without the column softmax (data parallelism) each strip's rows are finished
// inside the strip, so the gradient follows pass 1 at once: one visit per strip, no recomputation.
constexpr double kFarColumnGap = 40;
constexpr int64_t kScoreCacheFactor = 2;  // Note [Score cache]

// The CPU passes over strips of `strip_rows` rows. The element work runs as whole-strip ATen operations into
// per-thread buffers (vectorized by ATen's CPU kernels: this file is not compiled per CPU capability); the
// one-hot part uses contrastive_math.h like the CUDA kernels. See Note [Shared exponentials].
template <typename scalar_t>
void cpu_passes(const ScoreMatrix& m, int64_t strip_rows, scalar_t coefficient, bool want_rows,
                bool want_columns, ScorePasses& out) {
  namespace math = contrastive_math;
  const int64_t n = m.rows.size(0), N = m.columns.size(0), K = m.rows.size(1);
  strip_rows = std::min(strip_rows, n);
  const int64_t strips = (n + strip_rows - 1) / strip_rows;
  const int threads = at::get_num_threads();
  const at::TensorOptions options = m.rows.options();
  const at::Tensor columns_t = m.columns.t();  // [K, N]
  const bool by_column = m.column_softmax;
  const bool gradients = want_rows || want_columns;

  // Per-thread state, allocated by its thread on first use (at most one set per thread and call).
  struct ThreadState {
    at::Tensor scores;   // [strip_rows, N] strips outside the score cache
    at::Tensor factors;  // [strip_rows, N] a·1ᵀ + u·bᵀ of Note [Shared exponentials]
    scalar_t reference = -std::numeric_limits<scalar_t>::infinity();  // largest score seen (this thread's M)
    at::Tensor column_sum, column_max;  // [N] Σ_i E_ij·exp(m_i − reference), max_i S_ij
    at::Tensor grad_columns;            // [N, K] dL/dC̃ of this thread's strips (threads other than 0)
  };
  std::vector<ThreadState> state(threads);
  auto thread_state = [&]() -> ThreadState& { return state[at::get_thread_num()]; };
  // Note [Score cache]: the first strips, as many as fit in kScoreCacheFactor·(n + N)·K values (twice the
  // size of R̃ and C̃, so memory stays O((n + N)·K)), keep their exponentials E from pass 1 to pass 2 instead
  // of recomputing them. When n·N ≤ 2(n + N)·K (N ≤ 4K in one process) every strip is kept and the loss costs
  // 3 products instead of 4; at N = 4096, K = 768 three quarters are (3.25 products). Once the size of the
  // inputs, the cache held 37.5 % there (3.6 products); twice costs 24 MiB more at that size and took
  // 15-25 % less time there (bench/README.md). Only the two-pass case (the column softmax) has a pass 2.
  const int64_t cached_strips =
      gradients && by_column ? std::min(strips, kScoreCacheFactor * (n + N) * K / (strip_rows * N)) : 0;
  // The cached strips' products run as one product each over all cached rows (a larger GEMM, threaded by
  // the BLAS): their scores before pass 1, their gradient products after pass 2's element work.
  at::Tensor cache;  // [cached rows, N]
  const int64_t cached_rows = std::min(n, cached_strips * strip_rows);
  if (cached_strips > 0) {
    cache = at::empty({cached_rows, N}, options);
    at::mm_out(cache, m.rows.narrow(0, 0, cached_rows), columns_t);
  }

  at::Tensor row_max = at::empty({n}, options), row_sum = at::empty({n}, options);  // m_i, Σ_j E_ij
  // E of a strip [count, N]: S = R̃[first, first + count) · C̃ᵀ overwritten by exp(S − m). The first visit
  // also finds m, Σ_j E_ij and, with the column softmax, each column's max; a later visit of a cached strip
  // finds E in the cache, of another strip recomputes it. Cached strips' scores are in the cache already.
  auto strip_exponentials = [&](ThreadState& s, int64_t strip, bool first_visit) {
    const int64_t first = strip * strip_rows, count = std::min(strip_rows, n - first);
    at::Tensor scores;
    if (strip < cached_strips) {
      scores = cache.narrow(0, first, count);
      if (!first_visit) return scores;
    } else {
      if (!s.scores.defined()) s.scores = at::empty({strip_rows, N}, options);
      scores = s.scores.narrow(0, 0, count);
      at::mm_out(scores, m.rows.narrow(0, first, count), columns_t);
    }
    at::Tensor max = row_max.narrow(0, first, count);  // [count]
    if (first_visit) {
      at::amax_out(max, scores, {1});
      if (by_column) {
        const at::Tensor strip_max = scores.amax(0);  // [N]
        s.column_max = s.column_max.defined() ? at::maximum(s.column_max, strip_max) : strip_max;
      }
    }
    scores.sub_(max.unsqueeze(1)).exp_();
    if (first_visit) {
      at::Tensor sum = row_sum.narrow(0, first, count);
      at::sum_out(sum, scores, {1});
    }
    return scores;
  };
  // Folds a strip's E into the thread's column sums: σ += Eᵀ·exp(m − reference), with the reference raised
  // to the strip's largest max when that is larger (the sums so far rescaled).
  auto fold_columns = [&](ThreadState& s, int64_t strip, const at::Tensor& exponentials) {
    const int64_t first = strip * strip_rows, count = exponentials.size(0);
    const at::Tensor max = row_max.narrow(0, first, count);
    const scalar_t strip_reference = max.max().template item<scalar_t>();
    const at::Tensor part = at::mv(exponentials.t(), (max - strip_reference).exp_());  // [N]
    if (!s.column_sum.defined()) {
      s.column_sum = part;
      s.reference = strip_reference;
    } else if (strip_reference <= s.reference) {
      s.column_sum.add_(part, std::exp(strip_reference - s.reference));
    } else {
      s.column_sum.mul_(std::exp(s.reference - strip_reference)).add_(part);
      s.reference = strip_reference;
    }
  };

  // Filled after pass 1 with the column softmax: a, u, b of Note [Shared exponentials] and the far columns.
  at::Tensor row_factor, column_factor, row_weight;  // a [n], b [N], u [n]
  at::Tensor far, far_columns_t;                     // far columns' indices [F] and C̃_farᵀ [K, F]
  // G = dL/dS of a strip from its E (in place), then the two gradient products (cached strips: all at once
  // after pass 2).
  const scalar_t correction = math::positive_correction(by_column, coefficient);
  auto strip_gradient = [&](ThreadState& s, int64_t strip, at::Tensor grad) {
    const int64_t first = strip * strip_rows, count = grad.size(0);
    const at::Tensor rows = m.rows.narrow(0, first, count);  // R̃ strip [count, K]
    if (by_column) {
      if (!s.factors.defined()) s.factors = at::empty({strip_rows, N}, options);
      at::Tensor factors = s.factors.narrow(0, 0, count);  // a·1ᵀ + u·bᵀ [count, N]
      at::addr_out(factors, row_factor.narrow(0, first, count).unsqueeze(1),
                   row_weight.narrow(0, first, count), column_factor);
      grad.mul_(factors);
      if (far.numel() > 0) {  // c·exp(S − lse_j) on the far columns, from their scores
        const at::Tensor far_scores = at::mm(rows, far_columns_t);  // [count, F]
        grad.index_add_(
            1, far,
            far_scores.sub_(out.column_lse.index_select(0, far).unsqueeze(0)).exp_().mul_(coefficient));
      }
    } else {
      grad.mul_(row_factor.narrow(0, first, count).unsqueeze(1));
    }
    scalar_t* g = grad.template data_ptr<scalar_t>();
    for (int64_t i = 0; i < count; ++i) g[i * N + m.positive_offset + first + i] -= correction;
    if (strip < cached_strips) return;
    if (want_rows) {
      at::Tensor grad_rows = out.grad_rows.narrow(0, first, count);  // [count, K]
      at::mm_out(grad_rows, grad, m.columns);
    }
    if (want_columns) {
      at::Tensor grad_columns = out.grad_columns;
      if (at::get_thread_num() != 0) {
        if (!s.grad_columns.defined()) s.grad_columns = at::zeros({N, K}, options);
        grad_columns = s.grad_columns;
      }
      grad_columns.addmm_(grad.t(), rows);
    }
  };
  if (want_rows) out.grad_rows = at::empty({n, K}, options);
  if (want_columns) out.grad_columns = at::zeros({N, K}, options);
  // Without the column softmax a strip's gradient needs only its own rows' sums: a = c / Σ_j E_ij, set per
  // strip inside pass 1.
  const bool one_visit = gradients && !by_column;
  if (one_visit) row_factor = at::empty({n}, options);

  // Pass 1: the row statistics, the column statistics with the column softmax, and without it the gradients.
  at::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
    ThreadState& s = thread_state();
    for (int64_t strip = begin; strip < end; ++strip) {
      at::Tensor exponentials = strip_exponentials(s, strip, true);  // [count, N]
      if (by_column) fold_columns(s, strip, exponentials);
      if (one_visit) {
        const int64_t first = strip * strip_rows, count = exponentials.size(0);
        at::Tensor a = row_factor.narrow(0, first, count);  // c / Σ_j E_ij
        at::reciprocal_out(a, row_sum.narrow(0, first, count)).mul_(coefficient);
        strip_gradient(s, strip, exponentials);
      }
    }
  });
  out.row_lse = row_max + row_sum.log();
  if (by_column) {
    // Combine the threads' column statistics into M, σ and μ, then lse_j = M + log σ_j except on far columns.
    scalar_t reference = -std::numeric_limits<scalar_t>::infinity();
    for (const ThreadState& s : state) {
      if (s.column_sum.defined()) reference = std::max(reference, s.reference);
    }
    at::Tensor column_sum = at::zeros({N}, options), column_max;  // σ, μ [N]
    for (const ThreadState& s : state) {
      if (!s.column_sum.defined()) continue;
      column_sum.add_(s.column_sum, std::exp(s.reference - reference));
      column_max = column_max.defined() ? at::maximum(column_max, s.column_max) : s.column_max;
    }
    out.column_lse = column_sum.log().add_(reference);
    far = (column_max < reference - kFarColumnGap).nonzero().squeeze(1);  // [F]
    if (far.numel() > 0) {
      far_columns_t = m.columns.index_select(0, far).t();  // [K, F]
      // Their log-sum-exp from their own scores, a strip of rows at a time with a running max and sum per
      // column: never the [n, F] block, which is the whole matrix when most columns are far.
      const int64_t far_count = far.numel();
      at::Tensor far_max = at::full({far_count}, -std::numeric_limits<scalar_t>::infinity(), options);
      at::Tensor far_sum = at::zeros({far_count}, options);
      for (int64_t first = 0; first < n; first += strip_rows) {
        const int64_t count = std::min(strip_rows, n - first);
        at::Tensor scores = at::mm(m.rows.narrow(0, first, count), far_columns_t);  // [count, F]
        const at::Tensor new_max = at::maximum(far_max, std::get<0>(scores.max(0)));
        far_sum.mul_((far_max - new_max).exp_()).add_(scores.sub_(new_max).exp_().sum(0));
        far_max = new_max;
      }
      out.column_lse.index_put_({far}, far_max.add_(far_sum.log_()));
    }
    if (gradients) {
      row_factor = row_sum.reciprocal().mul_(coefficient);        // a [n]
      row_weight = (row_max - reference).exp_();                  // u [n]
      column_factor = column_sum.reciprocal().mul_(coefficient);  // b [N]
      if (far.numel() > 0) column_factor.index_fill_(0, far, 0);
    }
  }

  // Pass 2 (the column softmax only): G = dL/dS per strip, then the two gradient products.
  if (gradients && by_column) {
    at::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
      ThreadState& s = thread_state();
      for (int64_t strip = begin; strip < end; ++strip) {
        strip_gradient(s, strip, strip_exponentials(s, strip, false));
      }
    });
    if (cached_rows > 0 && want_rows) {
      at::Tensor grad_rows = out.grad_rows.narrow(0, 0, cached_rows);  // [cached rows, K]
      at::mm_out(grad_rows, cache, m.columns);
    }
    if (cached_rows > 0 && want_columns) out.grad_columns.addmm_(cache.t(), m.rows.narrow(0, 0, cached_rows));
  }
  for (int t = 1; t < threads; ++t) {
    if (state[t].grad_columns.defined()) out.grad_columns.add_(state[t].grad_columns);
  }
}

#if defined(VIMO_HAVE_CUDA)
// The same passes on CUDA: cuBLAS products through at::mm on the current stream, element kernels from
// cuda/fused_contrastive.cu. Strips run in order on one stream, so one strip buffer serves them all.
template <typename scalar_t>
void cuda_passes(const ScoreMatrix& m, int64_t strip_rows, scalar_t coefficient, bool want_rows,
                 bool want_columns, ScorePasses& out) {
  const int64_t n = m.rows.size(0), N = m.columns.size(0), K = m.rows.size(1);
  strip_rows = std::min(strip_rows, n);
  const at::TensorOptions options = m.rows.options();
  // The element kernels launch on the current device: make it the inputs' (at::mm guards itself, they do
  // not).
  const c10::cuda::CUDAGuard device_guard(m.rows.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(m.rows.device().index()).stream();
  const at::Tensor columns_t = m.columns.t();               // [K, N]
  at::Tensor buffer = at::empty({strip_rows, N}, options);  // [tile, N]
  auto strip_scores = [&](int64_t first, int64_t count) {
    at::Tensor scores = buffer.narrow(0, 0, count);
    at::mm_out(scores, m.rows.narrow(0, first, count), columns_t);
    return scores;
  };
  out.row_lse = at::empty({n}, options);
  at::Tensor running_max, running_sum;  // [N]
  if (m.column_softmax) {
    running_max = at::full({N}, -std::numeric_limits<double>::infinity(), options);
    running_sum = at::zeros({N}, options);
  }
  for (int64_t first = 0; first < n; first += strip_rows) {
    const int64_t count = std::min(strip_rows, n - first);
    const at::Tensor scores = strip_scores(first, count);
    cuda::row_log_sum_exp(scores.template data_ptr<scalar_t>(), count, N,
                          out.row_lse.template data_ptr<scalar_t>() + first, stream);
    if (m.column_softmax) {
      cuda::fold_column_statistics(scores.template data_ptr<scalar_t>(), count, N,
                                   running_max.template data_ptr<scalar_t>(),
                                   running_sum.template data_ptr<scalar_t>(), stream);
    }
  }
  if (m.column_softmax) {
    out.column_lse = at::empty({N}, options);
    cuda::finish_column_log_sum_exp(running_max.template data_ptr<scalar_t>(),
                                    running_sum.template data_ptr<scalar_t>(), N,
                                    out.column_lse.template data_ptr<scalar_t>(), stream);
  }
  if (!want_rows && !want_columns) return;
  if (want_rows) out.grad_rows = at::empty({n, K}, options);
  if (want_columns) out.grad_columns = at::zeros({N, K}, options);
  for (int64_t first = 0; first < n; first += strip_rows) {
    const int64_t count = std::min(strip_rows, n - first);
    at::Tensor grad = strip_scores(first, count);  // S, overwritten by G [count, N]
    cuda::scores_to_gradient(grad.template data_ptr<scalar_t>(), count, N,
                             out.row_lse.template data_ptr<scalar_t>() + first,
                             m.column_softmax ? out.column_lse.template data_ptr<scalar_t>() : nullptr,
                             coefficient, first, m.positive_offset, stream);
    if (want_rows) {
      at::Tensor grad_rows = out.grad_rows.narrow(0, first, count);  // [count, K]
      at::mm_out(grad_rows, grad, m.columns);
    }
    if (want_columns) out.grad_columns.addmm_(grad.t(), m.rows.narrow(0, first, count));
  }
}
#endif

// Note [Strips on CUDA]
// On the CPU a strip of 256 rows keeps its scores in cache while the element passes run. On a GPU the same
// strip makes cuBLAS products too small to fill the device, and each strip costs its launches: on an H100, N
// = 4096, D = 768, float32, the fused loss was 1.06x faster than eager with 256-row strips, 1.36x with 1024
// and 1.48x with 4096; at N = 1024 (4 products against eager's 6 either way: that eager computed S twice)
// 0.72x, 1.41x and 1.41x (bench/README.md, "On a GPU machine"). So tile 0 picks, on CUDA, enough rows for
// kCudaStripScores scores (16 MiB in float32) and at least kCpuTile: memory stays one strip of bounded size
// beyond the inputs.
constexpr int64_t kCpuTile = 256;
constexpr int64_t kCudaStripScores = int64_t{4} << 20;

int64_t strip_rows_for(const ScoreMatrix& m, int64_t tile) {
  if (tile > 0) return tile;
  if (!m.rows.is_cuda()) return kCpuTile;
  const int64_t N = std::max<int64_t>(m.columns.size(0), 1);
  return std::max(kCpuTile, kCudaStripScores / N);
}

}  // namespace

ScorePasses run_score_passes(const ScoreMatrix& m, int64_t tile, double coefficient, bool want_rows,
                             bool want_columns) {
  const int64_t strip_rows = strip_rows_for(m, tile);
  ScorePasses out;
  AT_DISPATCH_FLOATING_TYPES(m.rows.scalar_type(), "fused_symmetric_infonce", [&] {
    if (m.rows.is_cuda()) {
#if defined(VIMO_HAVE_CUDA)
      cuda_passes<scalar_t>(m, strip_rows, static_cast<scalar_t>(coefficient), want_rows, want_columns, out);
#else
      throw std::invalid_argument(
          "fused symmetric InfoNCE: inputs are on " + m.rows.device().str() +
          " but vimo was built without CUDA; HINT: configure with -DVIMO_CUDA=ON on a machine with nvcc");
#endif
    } else {
      cpu_passes<scalar_t>(m, strip_rows, static_cast<scalar_t>(coefficient), want_rows, want_columns, out);
    }
  });
  return out;
}

}  // namespace vimo::kernels::detail
