// The vocabulary-parallel McDPO / cross-entropy / sequence log-prob kernels under mpirun (2 and 4 ranks):
// every rank builds the same full inputs from a seed broadcast by rank 0, runs its shard of the LM head, and
// compares loss, metrics, grad_hidden (after the TP sum) and its grad_weight rows against the single-process
// fused kernel and the eager composition on the whole LM head: float64 within 1e-10, float32 within 1e-5
// relative, bfloat16 no worse than eager bfloat16 against float64 (+ 1e-2); V not divisible by TP,
// chunkings, an all-masked sequence, logits of ±1e4, a TP group inside a bigger world, the partial
// grad_hidden contract and the errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "kernels/fused_linear_dpo.h"
#include "kernels/vocab_parallel_dpo.h"
#include "tests/comm/collective_reference.h"

namespace {

using vimo::comm::Communicator;
using vimo::comm::ReduceOp;
using vimo::kernels::LmHeadChunking;
using vimo::kernels::McDpoConfig;
using vimo::kernels::McDpoResult;
using vimo::kernels::TpReduceOp;
using vimo::kernels::VocabParallelGroup;
using vimo::kernels::VocabShardRange;
using vimo::testing::mpi_world;

// The adapter a caller writes: a comm::Communicator seen as the kernel's TP all-reduce.
VocabParallelGroup group_of(const std::shared_ptr<Communicator>& tp, bool sum_grad_hidden = true) {
  return {.rank = tp->rank(),
          .size = tp->size(),
          .allreduce =
              [tp](at::Tensor& t, TpReduceOp op) {
                tp->allreduce(t, op == TpReduceOp::kMax ? ReduceOp::Max : ReduceOp::Sum);
              },
          .sum_grad_hidden = sum_grad_hidden};
}

// Seeds LibTorch with a seed shared by all ranks, so they draw the same inputs.
void seed_all_ranks() { at::manual_seed(vimo::testing::shared_seed()); }

struct Problem {
  int64_t B, T, H, V;
  LmHeadChunking chunking;
};

std::string describe(const Problem& p) {
  return "B=" + std::to_string(p.B) + " T=" + std::to_string(p.T) + " H=" + std::to_string(p.H) +
         " V=" + std::to_string(p.V) + " chunk tokens=" + std::to_string(p.chunking.tokens) +
         " vocabulary=" + std::to_string(p.chunking.vocabulary) + " on " +
         std::to_string(mpi_world()->size()) + " ranks";
}

// Float64 inputs, identical on every rank: a prompt, an answer of random length, padding (targets −100).
struct Inputs {
  at::Tensor hidden, weight, targets, mask, reference;  // [2B, T, H], [V, H], [2B, T], [2B, T], [2B]
};

Inputs random_inputs(const Problem& p, double logit_scale = 3) {
  Inputs x;
  const int64_t R = 2 * p.B;
  x.hidden = at::randn({R, p.T, p.H}, at::kDouble);
  x.weight = at::randn({p.V, p.H}, at::kDouble) * (logit_scale / std::sqrt(static_cast<double>(p.H)));
  x.targets = at::randint(0, p.V, {R, p.T}, at::kLong);
  const at::Tensor position = at::arange(p.T, at::kLong).unsqueeze(0);                        // [1, T]
  const at::Tensor start = at::randint(0, std::max<int64_t>(p.T / 2, 1), {R, 1}, at::kLong);  // [R, 1]
  const at::Tensor length = at::randint(1, p.T + 1, {R, 1}, at::kLong);                       // [R, 1]
  x.mask = (position >= start) & (position < start + length);
  x.targets = at::where(x.mask, x.targets, at::full_like(x.targets, -100));
  const at::Tensor policy = vimo::kernels::eager_sequence_logps(x.hidden, x.weight, x.targets, x.mask);
  x.reference = policy + 3 * at::randn({R}, at::kDouble);  // [2B]
  return x;
}

// max |got − want| / max(max |want|, floor).
double relative_error(const at::Tensor& got, const at::Tensor& want, double floor = 1) {
  const at::Tensor w = want.detach().to(at::kDouble), g = got.detach().to(at::kDouble);
  if (w.numel() == 0) return 0;
  const double magnitude = std::max(w.abs().max().item<double>(), floor);
  const double error = (g - w).abs().max().item<double>();
  return magnitude == 0 ? error : error / magnitude;
}

enum class Kind { kVocabParallel, kFused, kEager };

// One McDPO run; `weight` is the leaf that was differentiated (the shard for kVocabParallel).
struct LossRun {
  at::Tensor hidden, weight;
  McDpoResult result;
};

LossRun run_mcdpo(const Inputs& x, at::ScalarType dtype, Kind kind, const VocabParallelGroup& group,
                  const McDpoConfig& config, const LmHeadChunking& chunking) {
  LossRun run;
  run.hidden = x.hidden.to(dtype).clone().requires_grad_(true);
  const int64_t V = x.weight.size(0);
  if (kind == Kind::kVocabParallel) {
    const VocabShardRange range = vimo::kernels::vocab_shard_range(V, group.rank, group.size);
    run.weight = x.weight.narrow(0, range.begin, range.size()).to(dtype).clone().requires_grad_(true);
    run.result = vimo::kernels::vocab_parallel_linear_mcdpo(run.hidden, run.weight, x.targets, x.mask,
                                                            x.reference, V, group, config, chunking);
  } else {
    run.weight = x.weight.to(dtype).clone().requires_grad_(true);
    run.result =
        kind == Kind::kFused
            ? vimo::kernels::fused_linear_mcdpo(run.hidden, run.weight, x.targets, x.mask, x.reference,
                                                config, chunking)
            : vimo::kernels::eager_mcdpo(run.hidden, run.weight, x.targets, x.mask, x.reference, config);
  }
  run.result.loss.backward();
  return run;
}

// Expects the vocabulary-parallel run within `tolerance` of a whole-vocabulary run: every metric, the full
// grad_hidden and this rank's rows of grad_weight.
void expect_close(const LossRun& got, const LossRun& want, const VocabParallelGroup& group, double tolerance,
                  const std::string& context) {
  const McDpoResult &g = got.result, &w = want.result;
  const std::vector<std::pair<std::string, std::pair<at::Tensor, at::Tensor>>> scalars = {
      {"loss", {g.loss, w.loss}},
      {"dpo_loss", {g.dpo_loss, w.dpo_loss}},
      {"sft_loss", {g.sft_loss, w.sft_loss}},
      {"logps_chosen", {g.logps_chosen, w.logps_chosen}},
      {"logps_rejected", {g.logps_rejected, w.logps_rejected}},
      {"rewards_chosen", {g.rewards_chosen, w.rewards_chosen}},
      {"rewards_rejected", {g.rewards_rejected, w.rewards_rejected}},
      {"accuracy", {g.accuracy, w.accuracy}},
      {"margin", {g.margin, w.margin}}};
  for (const auto& [name, pair] : scalars) {
    ASSERT_EQ(pair.first.sizes(), pair.second.sizes()) << context << ": " << name;
    EXPECT_LE(relative_error(pair.first, pair.second), tolerance) << context << ": " << name;
  }
  const int64_t V = want.weight.size(0);
  const VocabShardRange range = vimo::kernels::vocab_shard_range(V, group.rank, group.size);
  ASSERT_TRUE(got.hidden.grad().defined() && got.weight.grad().defined()) << context;
  EXPECT_TRUE(at::isfinite(got.hidden.grad()).all().item<bool>()) << context;
  EXPECT_TRUE(at::isfinite(got.weight.grad()).all().item<bool>()) << context;
  EXPECT_LE(relative_error(got.hidden.grad(), want.hidden.grad(), 0), tolerance)
      << context << ": grad hidden";
  // Relative to the whole gradient's largest entry (a shard may hold only small ones).
  const at::Tensor want_shard = want.weight.grad().narrow(0, range.begin, range.size());
  const double scale = std::max(want.weight.grad().abs().max().item<double>(), 1e-300);
  EXPECT_LE(
      (got.weight.grad().to(at::kDouble) - want_shard.to(at::kDouble)).abs().max().item<double>() / scale,
      tolerance)
      << context << ": grad weight rows [" << range.begin << ", " << range.end << ")";
}

// Several problems: V divisible by 2 and 4 and not (37, 33, 29, 11), token chunks shorter than a pair,
// vocabulary chunks inside a shard, one tile per group.
const std::vector<Problem> kCases = {
    {2, 7, 8, 37, {4, 0}},     // pairs longer than the chunk; V mod TP ≠ 0
    {3, 5, 8, 48, {1000, 0}},  // one tile: pass 2 reuses pass 1's exp; V divisible
    {2, 6, 8, 37, {5, 3}},     // vocabulary chunked inside each shard
    {1, 9, 16, 40, {6, 0}},    // B = 1
    {2, 4, 4, 11, {1, 1}},     // one token, one vocabulary entry per tile; shards of 2–3 rows at TP 4
    {2, 10, 8, 33, {64, 16}},  // whole pairs in one chunk, online log-sum-exp over vocabulary chunks
};

TEST(VocabParallelDpo, ShardRuleCoversTheVocabularyWithNearlyEqualShards) {
  for (int size = 1; size <= 8; ++size) {
    for (int64_t V = size; V <= 40; ++V) {
      int64_t next = 0;
      for (int rank = 0; rank < size; ++rank) {
        const VocabShardRange r = vimo::kernels::vocab_shard_range(V, rank, size);
        ASSERT_EQ(r.begin, next) << "V=" << V << " size=" << size << " rank=" << rank;
        ASSERT_TRUE(r.size() == V / size || r.size() == V / size + 1) << "V=" << V << " size=" << size;
        next = r.end;
      }
      ASSERT_EQ(next, V) << "V=" << V << " size=" << size;
    }
  }
  EXPECT_THROW(vimo::kernels::vocab_shard_range(3, 0, 4), std::invalid_argument);
  EXPECT_THROW(vimo::kernels::vocab_shard_range(8, 4, 4), std::invalid_argument);
}

TEST(VocabParallelDpo, McDpoMatchesSingleProcessInFloat64) {
  seed_all_ranks();
  const VocabParallelGroup group = group_of(mpi_world());
  for (const McDpoConfig& config :
       {McDpoConfig{}, McDpoConfig{0.5, 1.0, 1.0, 0.2}, McDpoConfig{0.1, 0.0, 0.1, 0}}) {
    for (const Problem& p : kCases) {
      const Inputs x = random_inputs(p);
      const LossRun parallel = run_mcdpo(x, at::kDouble, Kind::kVocabParallel, group, config, p.chunking);
      const LossRun fused = run_mcdpo(x, at::kDouble, Kind::kFused, group, config, p.chunking);
      const LossRun eager = run_mcdpo(x, at::kDouble, Kind::kEager, group, config, p.chunking);
      const std::string context = describe(p) + " alpha=" + std::to_string(config.alpha);
      expect_close(parallel, fused, group, 1e-10, context + " vs fused");
      expect_close(parallel, eager, group, 1e-10, context + " vs eager");
    }
  }
}

// Float32 vocabulary-parallel against float32 single-process fused (the same per-token arithmetic, apart from
// the order in which the shards' sums are added): 1e-5 relative, the bound of the single-process float32
// test.
TEST(VocabParallelDpo, McDpoMatchesSingleProcessInFloat32) {
  seed_all_ranks();
  const VocabParallelGroup group = group_of(mpi_world());
  const McDpoConfig config{0.1, 1.0, 0.1, 0.1};
  for (const Problem& p : {Problem{2, 48, 64, 301, {40, 0}}, Problem{3, 32, 64, 257, {512, 64}}}) {
    Inputs x = random_inputs(p);
    const LossRun parallel = run_mcdpo(x, at::kFloat, Kind::kVocabParallel, group, config, p.chunking);
    const LossRun fused = run_mcdpo(x, at::kFloat, Kind::kFused, group, config, p.chunking);
    EXPECT_EQ(parallel.result.loss.scalar_type(), at::kFloat);
    expect_close(parallel, fused, group, 1e-5, describe(p) + " float32");
  }
}

// bfloat16 (8 significant bits): the rule, |vocabulary-parallel − float64 truth| ≤ |eager bfloat16 −
// truth| + 1e-2 per output, with truth the float64 eager composition on the same bfloat16-rounded values and
// eager bfloat16 on the whole head (test_fused_linear_dpo.cpp's Bfloat16NoWorseThanEagerBfloat16 for one
// process). The shards' statistics are combined in float32, so the parallel kernel is as accurate as the
// single-process one; the 1e-2 allows the bfloat16 rounding of its results (2^-8) where eager is lucky.
// grad_weight: this rank's rows, relative to the whole gradient's largest entry (see expect_close).
TEST(VocabParallelDpo, McDpoBfloat16NoWorseThanEagerBfloat16) {
  seed_all_ranks();
  const VocabParallelGroup group = group_of(mpi_world());
  const McDpoConfig config{0.1, 1.0, 0.1, 0.0};
  for (const Problem& p : {Problem{2, 24, 32, 201, {32, 0}}, Problem{2, 16, 32, 157, {20, 40}}}) {
    Inputs x = random_inputs(p);
    x.hidden = x.hidden.to(at::kBFloat16).to(at::kDouble);
    x.weight = x.weight.to(at::kBFloat16).to(at::kDouble);
    const LossRun parallel = run_mcdpo(x, at::kBFloat16, Kind::kVocabParallel, group, config, p.chunking);
    const LossRun eager = run_mcdpo(x, at::kBFloat16, Kind::kEager, group, config, p.chunking);
    const LossRun truth = run_mcdpo(x, at::kDouble, Kind::kEager, group, config, p.chunking);
    EXPECT_EQ(parallel.result.loss.scalar_type(), at::kBFloat16);
    EXPECT_EQ(parallel.weight.grad().scalar_type(), at::kBFloat16);
    // {name, parallel, eager, truth, floor of relative_error}; scalars against max(|·|, 1), gradients against
    // their largest entry.
    struct Output {
      const char* name;
      at::Tensor parallel, eager, truth;
      double floor;
    };
    const McDpoResult &r = parallel.result, &e = eager.result, &t = truth.result;
    const VocabShardRange range = vimo::kernels::vocab_shard_range(p.V, group.rank, group.size);
    const std::vector<Output> outputs = {
        {"loss", r.loss, e.loss, t.loss, 1},
        {"dpo_loss", r.dpo_loss, e.dpo_loss, t.dpo_loss, 1},
        {"sft_loss", r.sft_loss, e.sft_loss, t.sft_loss, 1},
        {"logps_chosen", r.logps_chosen, e.logps_chosen, t.logps_chosen, 1},
        {"logps_rejected", r.logps_rejected, e.logps_rejected, t.logps_rejected, 1},
        {"rewards_chosen", r.rewards_chosen, e.rewards_chosen, t.rewards_chosen, 1},
        {"rewards_rejected", r.rewards_rejected, e.rewards_rejected, t.rewards_rejected, 1},
        {"accuracy", r.accuracy, e.accuracy, t.accuracy, 1},
        {"margin", r.margin, e.margin, t.margin, 1},
        {"grad hidden", parallel.hidden.grad(), eager.hidden.grad(), truth.hidden.grad(), 0},
        // This rank's rows, against the whole gradient's largest entry (a shard may hold only small ones).
        {"grad weight shard", parallel.weight.grad(),
         eager.weight.grad().narrow(0, range.begin, range.size()),
         truth.weight.grad().narrow(0, range.begin, range.size()),
         truth.weight.grad().abs().max().item<double>()}};
    for (const Output& o : outputs) {
      const double parallel_error = relative_error(o.parallel, o.truth, o.floor);
      const double eager_error = relative_error(o.eager, o.truth, o.floor);
      EXPECT_LE(parallel_error, eager_error + 1e-2) << describe(p) << " bfloat16: " << o.name << ": parallel "
                                                    << parallel_error << ", eager " << eager_error;
    }
    EXPECT_TRUE(at::isfinite(parallel.hidden.grad()).all().item<bool>()) << describe(p);
  }
}

TEST(VocabParallelDpo, AllMaskedSequencesAndNoAnswerAtAll) {
  seed_all_ranks();
  const VocabParallelGroup group = group_of(mpi_world());
  const Problem p{3, 6, 8, 21, {5, 0}};
  Inputs x = random_inputs(p);
  x.mask[0].fill_(false);  // a chosen answer with no token
  x.mask[5].fill_(false);  // the last rejected answer empty
  expect_close(run_mcdpo(x, at::kDouble, Kind::kVocabParallel, group, {}, p.chunking),
               run_mcdpo(x, at::kDouble, Kind::kFused, group, {}, p.chunking), group, 1e-10, "empty rows");
  x.mask.fill_(false);  // no collective at all, on every rank alike
  const LossRun empty = run_mcdpo(x, at::kDouble, Kind::kVocabParallel, group, {}, p.chunking);
  expect_close(empty, run_mcdpo(x, at::kDouble, Kind::kEager, group, {}, p.chunking), group, 1e-10,
               "no answer token");
  EXPECT_EQ(empty.weight.grad().abs().max().item<double>(), 0.0);
}

// Logits of ±1e4: the max is all-reduced before any exp, so nothing overflows, in float64 and float32.
TEST(VocabParallelDpo, LogitsOfTenThousandStayFinite) {
  seed_all_ranks();
  const VocabParallelGroup group = group_of(mpi_world());
  const Problem p{2, 6, 8, 37, {5, 0}};
  const Inputs x = random_inputs(p, 1e4);
  expect_close(run_mcdpo(x, at::kDouble, Kind::kVocabParallel, group, {}, p.chunking),
               run_mcdpo(x, at::kDouble, Kind::kFused, group, {}, p.chunking), group, 1e-10, "logits 1e4");
  const LossRun single = run_mcdpo(x, at::kFloat, Kind::kVocabParallel, group, {}, p.chunking);
  const LossRun fused = run_mcdpo(x, at::kFloat, Kind::kFused, group, {}, p.chunking);
  EXPECT_TRUE(at::isfinite(single.result.loss).item<bool>());
  EXPECT_LE(relative_error(single.result.logps_chosen, fused.result.logps_chosen), 1e-5);
  EXPECT_TRUE(at::isfinite(single.hidden.grad()).all().item<bool>());
}

TEST(VocabParallelDpo, SequenceLogProbsAndCrossEntropyMatchSingleProcess) {
  seed_all_ranks();
  const VocabParallelGroup group = group_of(mpi_world());
  for (const Problem& p : kCases) {
    const Inputs x = random_inputs(p);
    const int64_t V = p.V;
    const VocabShardRange range = vimo::kernels::vocab_shard_range(V, group.rank, group.size);
    for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
      const double tolerance = dtype == at::kDouble ? 1e-10 : 1e-5;
      const at::Tensor h = x.hidden.to(dtype), w = x.weight.to(dtype);
      const at::Tensor shard = w.narrow(0, range.begin, range.size());
      EXPECT_LE(
          relative_error(vimo::kernels::vocab_parallel_linear_sequence_logps(h, shard, x.targets, x.mask, V,
                                                                             group, p.chunking),
                         vimo::kernels::fused_linear_sequence_logps(h, w, x.targets, x.mask, p.chunking)),
          tolerance)
          << describe(p);
      const at::Tensor hp = h.clone().requires_grad_(true), sp = shard.clone().requires_grad_(true);
      const at::Tensor hf = h.clone().requires_grad_(true), wf = w.clone().requires_grad_(true);
      const at::Tensor parallel =
          vimo::kernels::vocab_parallel_linear_cross_entropy(hp, sp, x.targets, x.mask, V, group, p.chunking);
      const at::Tensor fused =
          vimo::kernels::fused_linear_cross_entropy(hf, wf, x.targets, x.mask, p.chunking);
      parallel.backward();
      fused.backward();
      EXPECT_LE(relative_error(parallel, fused), tolerance) << describe(p);
      EXPECT_LE(relative_error(hp.grad(), hf.grad(), 0), tolerance) << describe(p);
      const double scale = wf.grad().abs().max().item<double>();
      EXPECT_LE(
          (sp.grad() - wf.grad().narrow(0, range.begin, range.size())).abs().max().item<double>() / scale,
          tolerance)
          << describe(p);
    }
  }
}

// sum_grad_hidden = false leaves each rank's partial grad_hidden; their sum is the full one.
TEST(VocabParallelDpo, PartialGradHiddenSumsToTheFullGradient) {
  seed_all_ranks();
  const VocabParallelGroup group = group_of(mpi_world(), /*sum_grad_hidden=*/false);
  const Problem p{2, 7, 8, 37, {4, 0}};
  const Inputs x = random_inputs(p);
  const LossRun parallel = run_mcdpo(x, at::kDouble, Kind::kVocabParallel, group, {}, p.chunking);
  const LossRun fused = run_mcdpo(x, at::kDouble, Kind::kFused, group, {}, p.chunking);
  at::Tensor summed = parallel.hidden.grad().clone();
  mpi_world()->allreduce(summed, ReduceOp::Sum);
  EXPECT_LE(relative_error(summed, fused.hidden.grad(), 0), 1e-10);
  if (mpi_world()->size() > 1) {
    EXPECT_GT(relative_error(parallel.hidden.grad(), fused.hidden.grad(), 0), 1e-3);
  }
}

// A TP group of 2 inside a world of 4 (DP 2 × TP 2, TP contiguous as in comm::ProcessGrid): each TP group
// runs its own problem, and the two groups' collectives do not mix.
TEST(VocabParallelDpo, TensorParallelGroupsInsideABiggerWorld) {
  if (mpi_world()->size() % 2 != 0 || mpi_world()->size() < 4) GTEST_SKIP() << "needs 4 ranks (DP 2 × TP 2)";
  seed_all_ranks();
  const int dp_rank = mpi_world()->rank() / 2;
  const std::shared_ptr<Communicator> tp = mpi_world()->split(dp_rank, mpi_world()->rank());
  const VocabParallelGroup group = group_of(tp);
  const Problem p = dp_rank == 0 ? Problem{2, 7, 8, 37, {4, 0}} : Problem{3, 5, 8, 29, {1000, 0}};
  std::vector<Inputs> inputs;
  for (const Problem& q : {Problem{2, 7, 8, 37, {4, 0}}, Problem{3, 5, 8, 29, {1000, 0}}}) {
    inputs.push_back(random_inputs(q));  // all ranks draw both, in the same order
  }
  const Inputs& x = inputs[static_cast<size_t>(dp_rank)];
  expect_close(run_mcdpo(x, at::kDouble, Kind::kVocabParallel, group, {}, p.chunking),
               run_mcdpo(x, at::kDouble, Kind::kFused, group, {}, p.chunking), group, 1e-10,
               describe(p) + " in DP group " + std::to_string(dp_rank));
}

TEST(VocabParallelDpo, RejectsAWrongShardOrGroupOnEveryRank) {
  seed_all_ranks();
  const VocabParallelGroup group = group_of(mpi_world());
  const Problem p{1, 4, 8, 20, {4, 0}};
  const Inputs x = random_inputs(p);
  const at::Tensor whole = x.weight;  // [V, H]: the whole head, not a shard (every rank sees size > 1 or 1)
  const at::Tensor too_few = x.weight.narrow(0, 0, 1);
  try {
    vimo::kernels::vocab_parallel_linear_mcdpo(x.hidden, too_few, x.targets, x.mask, x.reference, p.V, group);
    FAIL() << "a 1-row shard was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("slice the weight with vocab_shard_range"), std::string::npos)
        << e.what();
  }
  VocabParallelGroup bad = group;
  bad.allreduce = nullptr;
  EXPECT_THROW(
      vimo::kernels::vocab_parallel_linear_cross_entropy(x.hidden, whole, x.targets, x.mask, p.V, bad),
      std::invalid_argument);
  at::Tensor out_of_range = x.targets.clone();
  out_of_range.masked_fill_(x.mask, p.V);  // targets are global ids < V
  const VocabShardRange range = vimo::kernels::vocab_shard_range(p.V, group.rank, group.size);
  EXPECT_THROW(vimo::kernels::vocab_parallel_linear_sequence_logps(
                   x.hidden, x.weight.narrow(0, range.begin, range.size()), out_of_range, x.mask, p.V, group),
               std::invalid_argument);
}

}  // namespace
