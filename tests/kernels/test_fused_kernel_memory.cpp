// The memory bounds the fused kernels promise, measured: McDPO's "extra memory bounded by the chunk size"
// (kernels/fused_linear_dpo.h, LmHeadChunking) and the contrastive loss's "O((n + N)·D) plus one strip"
// (kernels/fused_contrastive.h). bench/counting_allocator.h, installed as LibTorch's CPU allocator, counts
// the live tensor bytes and their high-water mark; each test takes the peak during one forward + backward
// above what was live before it (the inputs), derives a bound from the chunk or strip size, and expects the
// peak within it, far below the eager composition's [2B, T, V] or [n, N] footprint (which the same allocator
// sees in the eager run: the counting is live), and lower for half the chunk (so a kernel that stopped
// chunking fails here). One LibTorch thread (tests/serial_main.cpp): per-thread buffers are counted once.
// Allocations that bypass c10's allocator (BLAS workspaces, std::vector) are not seen, as in the benchmarks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>

#include "bench/counting_allocator.h"
#include "kernels/contrastive_loss.h"
#include "kernels/fused_contrastive.h"
#include "kernels/fused_linear_dpo.h"
#include "tests/random_seed.h"

namespace {

using vimo::bench::counting_allocator;
using vimo::kernels::LmHeadChunking;

constexpr int64_t kFloat = 4;              // bytes of a float32
constexpr int64_t kSmallStuff = 64 << 10;  // bytes: scalars, [c], [R], [n + N] vectors, index tensors

// The high-water mark of live CPU tensor bytes while `step` runs, above those live before it.
int64_t peak_extra_bytes(const std::function<void()>& step) {
  vimo::bench::CountingAllocator& allocator = counting_allocator();
  const int64_t before = allocator.live();
  allocator.reset_peak();
  step();
  return allocator.peak() - before;
}

std::string mib(int64_t bytes) { return std::to_string(static_cast<double>(bytes) / (1 << 20)) + " MiB"; }

// ----- McDPO -----

// B pairs of T positions (a prompt of P, then the answer to the end), hidden H, vocabulary V; float32.
constexpr int64_t kPairs = 2, kPositions = 128, kPrompt = 16, kHidden = 32, kVocabulary = 4096;

struct DpoInputs {
  at::Tensor hidden, weight, targets, mask, reference;  // [2B, T, H], [V, H], [2B, T], [2B, T], [2B]
};

DpoInputs dpo_inputs() {
  DpoInputs x;
  const int64_t R = 2 * kPairs;
  x.hidden = at::randn({R, kPositions, kHidden});
  x.weight = at::randn({kVocabulary, kHidden}) * (3 / std::sqrt(static_cast<double>(kHidden)));
  x.targets = at::randint(0, kVocabulary, {R, kPositions}, at::kLong);
  x.mask = (at::arange(kPositions) >= kPrompt).unsqueeze(0).expand({R, kPositions}).contiguous();
  x.reference = -8.0 * (kPositions - kPrompt) + at::randn({R});
  return x;
}

// Peak extra bytes of one forward + backward of the fused (or eager) McDPO on fresh leaves; `loss` receives
// the loss value.
int64_t dpo_peak(const DpoInputs& x, bool fused, const LmHeadChunking& chunking, double* loss = nullptr) {
  const at::Tensor hidden = x.hidden.clone().requires_grad_(), weight = x.weight.clone().requires_grad_();
  return peak_extra_bytes([&] {
    const vimo::kernels::McDpoResult result =
        fused
            ? vimo::kernels::fused_linear_mcdpo(hidden, weight, x.targets, x.mask, x.reference, {}, chunking)
            : vimo::kernels::eager_mcdpo(hidden, weight, x.targets, x.mask, x.reference);
    result.loss.backward();
    if (loss != nullptr) *loss = result.loss.item<double>();
  });
}

// The bound, in bytes, for `chunking` (Note [Fused linear LM-head losses] in kernels/fused_linear_dpo.cpp):
//   gradients  (2B·T·H + V·H)·4   grad_hidden and grad_W, formed in float32 in the forward and handed to
//                                 .grad by backward (Note [Gradients in the forward]): these are outputs
//   tile       c·v·4              one logits tile [c tokens, v = min(vocabulary chunk, V) columns]: pass 1's
//                                 tile is dropped before pass 2 forms its own (or is reused by it, one tile)
//   operands   (2T + 4c)·H·4      a group keeps each chunk's rows x [c, H] until its pass 2; a group is one
//                                 pair split into chunks (≤ 2T tokens) or whole pairs packed into ≤ c tokens;
//                                 pass 2 adds scaled x, E·W and the target rows' products, [≤ c, H] each
//   small      64 KiB             per-token vectors [c], per-row [2B], the schedule's index tensor
// The tile is the term that grows with the chunk; everything else is the inputs' size or O(c·H).
int64_t dpo_bound(const LmHeadChunking& chunking) {
  const int64_t R = 2 * kPairs, c = chunking.tokens;
  const int64_t v = chunking.vocabulary == 0 ? kVocabulary : std::min(chunking.vocabulary, kVocabulary);
  const int64_t gradients = (R * kPositions * kHidden + kVocabulary * kHidden) * kFloat;
  const int64_t tile = c * v * kFloat;
  const int64_t operands = (2 * kPositions + 4 * c) * kHidden * kFloat;
  return gradients + tile + operands + kSmallStuff;
}

TEST(FusedKernelMemory, McDpoExtraMemoryIsBoundedByTheChunk) {
  vimo::testing::seed_torch();
  counting_allocator();
  const DpoInputs x = dpo_inputs();
  const int64_t eager_footprint = 2 * kPairs * kPositions * kVocabulary * kFloat;  // [2B, T, V] float32
  double eager_loss = 0;
  const int64_t eager = dpo_peak(x, false, {}, &eager_loss);
  // The allocator sees the eager logits (and their log-softmax and gradient: several times the footprint).
  EXPECT_GE(eager, eager_footprint) << "eager peak " << mib(eager);

  // Pairs of 2·112 answer tokens: chunks of 64 and 32 split each pair (logits recomputed in pass 2); 256 with
  // vocabulary chunks of 1024 tiles both ways.
  int64_t previous_peak = 0, previous_tokens = 0;
  for (const LmHeadChunking chunking :
       {LmHeadChunking{64, 0}, LmHeadChunking{32, 0}, LmHeadChunking{256, 1024}}) {
    const std::string what = "chunk tokens=" + std::to_string(chunking.tokens) +
                             " vocabulary=" + std::to_string(chunking.vocabulary);
    double loss = 0;
    const int64_t peak = dpo_peak(x, true, chunking, &loss);
    const int64_t bound = dpo_bound(chunking);
    std::printf("[ memory   ] McDPO %s: peak %s, bound %s, eager %s ([2B, T, V] %s)\n", what.c_str(),
                mib(peak).c_str(), mib(bound).c_str(), mib(eager).c_str(), mib(eager_footprint).c_str());
    // It computed the loss it was asked for (float32 against float32; test_fused_linear_dpo.cpp checks it
    // against float64 properly): different summation orders, ~1e-6 relative.
    EXPECT_NEAR(loss, eager_loss, 1e-4 * std::max(1.0, std::abs(eager_loss))) << what;
    EXPECT_LE(peak, bound) << what << ": peak " << mib(peak) << " above the bound " << mib(bound);
    EXPECT_LE(bound, eager_footprint / 4) << what << ": the bound itself must be far below [2B, T, V]";
    if (previous_tokens == 2 * chunking.tokens && chunking.vocabulary == 0) {
      // Half the chunk: the peak drops by about the half tile, c/2·V·4 bytes; at least half of that.
      EXPECT_LE(peak, previous_peak - chunking.tokens * kVocabulary * kFloat / 2)
          << what << ": peak " << mib(peak) << " vs " << mib(previous_peak) << " for twice the chunk";
    }
    previous_peak = peak;
    previous_tokens = chunking.tokens;
  }
}

// ----- symmetric InfoNCE -----

struct ContrastiveProblem {
  int64_t n, N, D, offset;
  bool one_process;  // the same tensors as local and gathered: one score matrix, column softmax, score cache
};

struct ContrastiveLeaves {
  at::Tensor text_local, text_all, video_local, video_all, scale;
};

at::Tensor unit_rows(int64_t rows, int64_t D) {
  at::Tensor x = at::randn({rows, D});
  return x / x.norm(2, 1, true);
}

ContrastiveLeaves contrastive_leaves(const ContrastiveProblem& p) {
  ContrastiveLeaves x;
  x.text_all = unit_rows(p.N, p.D).requires_grad_();
  x.video_all = unit_rows(p.N, p.D).requires_grad_();
  if (p.one_process) {
    x.text_local = x.text_all;
    x.video_local = x.video_all;
  } else {
    x.text_local = x.text_all.detach().narrow(0, p.offset, p.n).clone().requires_grad_();
    x.video_local = x.video_all.detach().narrow(0, p.offset, p.n).clone().requires_grad_();
  }
  x.scale = at::scalar_tensor(1 / 0.07).requires_grad_();
  return x;
}

// Peak extra bytes of one forward + backward on `x` (gradients reset first); tile 0 = eager.
int64_t contrastive_peak(ContrastiveLeaves& x, const ContrastiveProblem& p, int64_t tile, double* loss) {
  for (at::Tensor* t : {&x.text_local, &x.text_all, &x.video_local, &x.video_all, &x.scale}) {
    t->mutable_grad().reset();
  }
  return peak_extra_bytes([&] {
    const at::Tensor value =
        tile > 0
            ? vimo::kernels::fused_symmetric_infonce(x.text_local, x.text_all, x.video_local, x.video_all,
                                                     x.scale, p.offset, tile)
            : vimo::kernels::symmetric_infonce(x.scale * at::mm(x.text_local, x.video_all.t()),
                                               x.scale * at::mm(x.video_local, x.text_all.t()), p.offset);
    value.backward();
    *loss = value.item<double>();
  });
}

// The bound, in bytes, for strips of `tile` rows (Note [Two-pass symmetric InfoNCE] and Note [Score cache]
// in kernels/fused_contrastive.cpp), with E = (n + N)·D·4 the bytes of one text and one video tensor:
//   inputs' size  4E   at most four tensors of the inputs' size at once: while a direction's passes run, its
//                      operands R̃ [n, D] and C̃ [N, D] (E), its products dL/dR̃ and dL/dC̃ (E), and the
//                      gradients already formed (≤ E: the other direction's; in one process there is one
//                      direction), then the chain rule's [n, D] temporaries once the strips are freed; in
//                      backward the stored gradients (2E) and their copies scaled by dL_out (2E)
//   cache         2E   the score cache, ≤ 2(n + N)·D values (one process only: two passes)
//   strips        tile·N·4 per strip buffer: the scores [tile, N], and in one process (two passes) also the
//                      gradient factors [tile, N]
//   small         64 KiB   row and column statistics [n], [N]
// so 4E (+ 2E) + (1 or 2)·tile·N·4 + 64 KiB: O((n + N)·D) plus one strip, against eager's [n, N] matrices.
int64_t contrastive_bound(const ContrastiveProblem& p, int64_t tile) {
  const int64_t E = (p.n + p.N) * p.D * kFloat;
  const int64_t cache = p.one_process ? 2 * E : 0;
  const int64_t strip_buffers = p.one_process ? 2 : 1;
  return 4 * E + cache + strip_buffers * tile * p.N * kFloat + kSmallStuff;
}

TEST(FusedKernelMemory, ContrastiveExtraMemoryIsInputsPlusOneStrip) {
  vimo::testing::seed_torch();
  counting_allocator();
  // Data parallelism (rank 1 of 4: two score matrices, row softmax only) and one process (one matrix, both
  // softmaxes; the score cache holds 2(n + N)·D values = 32 rows of scores here: no 64-row strip, one 32-row
  // strip, so halving the strip adds a cached strip while it drops two strip buffers' halves).
  for (const ContrastiveProblem& p :
       {ContrastiveProblem{1024, 4096, 8, 1024, false}, ContrastiveProblem{2048, 2048, 8, 0, true}}) {
    const std::string what = "n=" + std::to_string(p.n) + " N=" + std::to_string(p.N) +
                             " D=" + std::to_string(p.D) +
                             (p.one_process ? " one process" : " data parallel");
    ContrastiveLeaves x = contrastive_leaves(p);
    const int64_t eager_footprint = p.n * p.N * kFloat;  // one [n, N] float32 score matrix
    double eager_loss = 0;
    const int64_t eager = contrastive_peak(x, p, 0, &eager_loss);
    EXPECT_GE(eager, eager_footprint) << what << ": eager peak " << mib(eager);
    int64_t previous_peak = 0;
    for (const int64_t tile : {64, 32}) {
      double loss = 0;
      const int64_t peak = contrastive_peak(x, p, tile, &loss);
      const int64_t bound = contrastive_bound(p, tile);
      std::printf("[ memory   ] InfoNCE %s tile=%lld: peak %s, bound %s, eager %s ([n, N] %s)\n",
                  what.c_str(), static_cast<long long>(tile), mib(peak).c_str(), mib(bound).c_str(),
                  mib(eager).c_str(), mib(eager_footprint).c_str());
      // The same loss (float32 both, O(1): summation orders differ by ~1e-6 relative).
      EXPECT_NEAR(loss, eager_loss, 1e-4) << what;
      EXPECT_LE(peak, bound) << what << " tile=" << tile << ": peak " << mib(peak) << " above " << mib(bound);
      EXPECT_LE(bound, eager_footprint / 4) << what << ": the bound itself must be far below [n, N]";
      if (previous_peak > 0) {
        // Half the strip: the peak drops by at least half of the half strip's [tile, N] scores.
        EXPECT_LE(peak, previous_peak - tile * p.N * kFloat / 2)
            << what << " tile=" << tile << ": peak " << mib(peak) << " vs " << mib(previous_peak);
      }
      previous_peak = peak;
    }
  }
}

// Columns whose best score lies more than 40 below the matrix's largest get their log-sum-exp from their own
// scores (Note [Shared exponentials] in kernels/fused_contrastive.cpp), a strip of rows at a time as well.
// Unit rows in 64 dimensions score at most ~0.5 against each other, so at scale 100 one matched pair (score
// 100) leaves nearly every other column far: the case that once built their whole [n, F] block.
TEST(FusedKernelMemory, ContrastiveFarColumnsStayWithinTheBound) {
  vimo::testing::seed_torch();
  counting_allocator();
  const ContrastiveProblem p{2048, 2048, 64, 0, true};
  ContrastiveLeaves x = contrastive_leaves(p);
  {
    const at::NoGradGuard no_grad;
    x.video_all.narrow(0, 0, 1).copy_(x.text_all.narrow(0, 0, 1));  // the matched pair: cosine 1
  }
  x.scale = at::scalar_tensor(100.0).requires_grad_();
  const at::Tensor scores = 100 * at::mm(x.text_all.detach(), x.video_all.detach().t());  // [n, N]
  const int64_t far_columns = (std::get<0>(scores.max(0)) < scores.max() - 40).sum().item<int64_t>();
  ASSERT_GT(far_columns, p.N / 2) << "the inputs must leave most columns far";
  double eager_loss = 0, loss = 0;
  (void)contrastive_peak(x, p, 0, &eager_loss);
  const int64_t tile = 64;
  const int64_t peak = contrastive_peak(x, p, tile, &loss);
  const int64_t bound = contrastive_bound(p, tile);
  std::printf("[ memory   ] InfoNCE with %lld far columns, tile=%lld: peak %s, bound %s\n",
              static_cast<long long>(far_columns), static_cast<long long>(tile), mib(peak).c_str(),
              mib(bound).c_str());
  EXPECT_NEAR(loss, eager_loss, 1e-4 * std::max(1.0, std::abs(eager_loss)));
  EXPECT_LE(peak, bound) << "peak " << mib(peak) << " above " << mib(bound) << " with " << far_columns
                         << " far columns";
}

}  // namespace
