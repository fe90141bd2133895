// The GradientReducer under mpirun (2 and 4 ranks) when the ranks' backward passes differ. The forward takes
// two branches in a rank-dependent order, so their gradients become ready in a different order on even and
// odd ranks (checked, since that is the point), and in some cases a gate parameter is used on rank 0 only.
// Buckets must still launch in index order on every rank (Note [Bucketing order] in
// comm/gradient_reducer.cpp) and the ranks without the gate must fill its slot with zeros (Note [Parameters
// without a gradient]): every rank ends each step with the gradients, and after three SGD steps the
// parameters, of one process that runs each rank's forward on that rank's rows of the batch. Float64.
//
// Equal-sized buckets are paired across the branches on purpose: a reducer that launched buckets as they
// became ready would all-reduce one rank's branch-b gradients with another's branch-a ones, sizes matching,
// and fail here on the values instead of hanging.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "comm/gradient_reducer.h"
#include "tests/comm/collective_reference.h"

namespace {
using vimo::comm::GradientReducer;
using vimo::comm::ReducerOptions;
using vimo::testing::mpi_world;
using vimo::testing::shared_seed;

constexpr int64_t kIn = 6, kHidden = 12, kOut = 3;
constexpr double kBytesPerMiB = 1024.0 * 1024.0;

enum class Gate {
  None,    // no gate parameter
  Middle,  // registered between the branches and the head: its bucket sits in the middle of the launch order
  First,   // registered first: it shares the last bucket with branch a's weight
};

// x [n, 6] -> a = tanh(x Waᵀ + ba), b = tanh(x Wbᵀ + bb) [n, 12], made in the order a, b on even ranks and
// b, a on odd ones -> h = a + b, times gate [12] on rank 0 only -> (h Whᵀ + bh) [n, 3]; mean squared error.
// Autograd runs the node made last first, so on even ranks branch b's gradients are ready before a's, on odd
// ranks after. Registration order: [gate if First], a.w, a.b, b.w, b.b, [gate if Middle], head.w, head.b.
struct TwoBranchNet {
  std::vector<std::pair<std::string, at::Tensor>> named;
  Gate gate_position;

  TwoBranchNet(uint64_t seed, Gate gate) : gate_position(gate) {
    at::manual_seed(seed);
    const auto make = [&](const char* name, at::IntArrayRef shape) {
      named.emplace_back(name, (at::randn(shape, at::kDouble) * 0.5).requires_grad_(true));
    };
    if (gate == Gate::First) make("gate", {kHidden});
    make("a.w", {kHidden, kIn});
    make("a.b", {kHidden});
    make("b.w", {kHidden, kIn});
    make("b.b", {kHidden});
    if (gate == Gate::Middle) make("gate", {kHidden});
    make("head.w", {kOut, kHidden});
    make("head.b", {kOut});
  }
  std::vector<at::Tensor> params() const {
    std::vector<at::Tensor> out;
    for (const auto& [name, p] : named) out.push_back(p);
    return out;
  }
  size_t index(const std::string& name) const {
    for (size_t i = 0; i < named.size(); ++i) {
      if (named[i].first == name) return i;
    }
    ADD_FAILURE() << "no parameter " << name;
    return 0;
  }
  const at::Tensor& operator[](const std::string& name) const { return named[index(name)].second; }

  // Rank `rank`'s loss on its rows x [n, 6], y [n, 3].
  at::Tensor loss(const at::Tensor& x, const at::Tensor& y, int rank) const {
    const TwoBranchNet& m = *this;
    const auto branch = [&](const char* w, const char* b) { return at::tanh(at::addmm(m[b], x, m[w].t())); };
    at::Tensor a, b;  // [n, 12] each
    if (rank % 2 == 0) {
      a = branch("a.w", "a.b");
      b = branch("b.w", "b.b");
    } else {
      b = branch("b.w", "b.b");
      a = branch("a.w", "a.b");
    }
    at::Tensor h = a + b;  // [n, 12]
    if (gate_position != Gate::None && rank == 0) h = h * m["gate"];
    const at::Tensor out = at::addmm(m["head.b"], h, m["head.w"].t());  // [n, 3]
    return (out - y).pow(2).mean();
  }
};

struct RankDependentCase {
  const char* name;
  Gate gate;
  ReducerOptions options;
  std::vector<std::vector<size_t>> buckets;  // expected parameter indices per bucket, in launch order
};

void PrintTo(const RankDependentCase& c, std::ostream* out) { *out << c.name; }

class ReducerRankDependent : public ::testing::TestWithParam<RankDependentCase> {};

// The order in which each parameter's gradient reached its AccumulateGrad in the last backward, as parameter
// indices, padded with -1 for the parameters that got none (a Tensor::register_hook runs just before
// accumulation, in autograd's order).
class ReadinessRecorder {
 public:
  explicit ReadinessRecorder(const std::vector<at::Tensor>& params) : count_(params.size()) {
    for (size_t i = 0; i < params.size(); ++i) {
      at::Tensor p = params[i];
      p.register_hook([this, i](const at::TensorBase&) { order_.push_back(static_cast<int64_t>(i)); });
    }
  }
  std::vector<int64_t> take() {
    std::vector<int64_t> order = order_;
    order.resize(count_, -1);
    order_.clear();
    return order;
  }

 private:
  size_t count_;
  std::vector<int64_t> order_;
};

// Rounding: the reducer adds the ranks' gradients in rank order and divides by their number; one process
// adds the same per-rank terms (each scaled by 1 / ranks) in autograd's order. Both are float64 sums of at
// most 4 terms of size about 1, so they differ by a few ulps (~1e-15); 1e-13 absolute leaves a hundredfold
// margin, while a gradient all-reduced with the wrong bucket (off by up to ~0.9 in a trial), or a gate slot
// left stale from the step before (~1e-4 and up), is far outside it.
constexpr double kRtol = 1e-10, kAtol = 1e-13;

TEST_P(ReducerRankDependent, EveryRankEndsWithTheGradientsOfOneProcess) {
  const RankDependentCase& c = GetParam();
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int64_t per_rank = 3;
  const int steps = 3;
  const double lr = 0.1;

  TwoBranchNet distributed(seed, c.gate), single(seed, c.gate);
  ReadinessRecorder readiness(distributed.params());
  GradientReducer reducer(distributed.params(), mpi_world(), c.options);
  ASSERT_EQ(reducer.bucket_parameters(), c.buckets);
  EXPECT_EQ(reducer.transport().rfind(c.options.shared_memory ? "shared memory" : "mpi", 0), 0u)
      << reducer.transport();

  for (int step = 0; step < steps; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    at::manual_seed(seed + 1 + step);
    const at::Tensor x = at::randn({per_rank * ranks, kIn}, at::kDouble);   // [ranks * 3, 6]
    const at::Tensor y = at::randn({per_rank * ranks, kOut}, at::kDouble);  // [ranks * 3, 3]

    distributed.loss(x.narrow(0, rank * per_rank, per_rank), y.narrow(0, rank * per_rank, per_rank), rank)
        .backward();
    // The premise: branch a's gradients came after b's on even ranks and before them on odd ones, and the
    // gate's only on rank 0.
    const std::vector<int64_t> order = readiness.take();
    const auto position = [&](const std::string& name) {
      return std::find(order.begin(), order.end(), static_cast<int64_t>(distributed.index(name))) -
             order.begin();
    };
    EXPECT_EQ(position("a.w") < position("b.w"), rank % 2 == 1) << "rank " << rank << "'s readiness order";
    if (c.gate != Gate::None) {
      EXPECT_EQ(position("gate") < static_cast<int64_t>(order.size()), rank == 0) << "rank " << rank;
    }
    reducer.finalize();
    // Only now: a collective of the test's between backward and finalize() would be matched against a bucket
    // that one rank launched during backward and another only in finalize().
    const at::Tensor orders =
        mpi_world()->allgather(at::tensor(order, at::kLong).unsqueeze(0));  // [ranks, P]
    ASSERT_FALSE(at::equal(orders[0], orders[1])) << "ranks 0 and 1 readied their gradients alike";

    // One process: the mean over the ranks of each rank's loss on its rows, which is what averaging the
    // ranks' gradients computes.
    at::Tensor total = at::zeros({}, at::kDouble);
    for (int r = 0; r < ranks; ++r) {
      total =
          total + single.loss(x.narrow(0, r * per_rank, per_rank), y.narrow(0, r * per_rank, per_rank), r);
    }
    (total / ranks).backward();
    for (const auto& [name, p] : single.named) {
      const at::Tensor& got = distributed[name].grad();
      ASSERT_TRUE(got.defined()) << name;
      EXPECT_TRUE(at::allclose(got, p.grad(), kRtol, kAtol))
          << name << ": max |diff| " << (got - p.grad()).abs().max().item<double>();
    }

    // Same launch order everywhere: 0, 1, 2, ...
    const std::vector<int> launched = reducer.last_launch_order();
    std::vector<int64_t> launched64(launched.begin(), launched.end()), expected(c.buckets.size());
    for (size_t b = 0; b < expected.size(); ++b) expected[b] = static_cast<int64_t>(b);
    EXPECT_EQ(launched64, expected);

    // SGD, and gradients set to none: the next step's gate slot on the ranks without it must be zeros again,
    // not what this step left in the bucket.
    at::NoGradGuard no_grad;
    for (auto* model : {&distributed, &single}) {
      for (auto& [name, p] : model->named) {
        p.sub_(p.grad() * lr);
        p.mutable_grad().reset();
      }
    }
  }
  for (const auto& [name, p] : single.named) {
    EXPECT_TRUE(at::allclose(distributed[name], p, kRtol, kAtol))
        << name << ": max |diff| " << (distributed[name] - p).abs().max().item<double>();
  }
}

// Bytes (float64): a.w 576, a.b 96, b.w 576, b.b 96, gate 96, head.w 288, head.b 24. Buckets fill from the
// last parameter. With caps of 312 (first) and 672 bytes, the head is the first bucket and each branch one
// bucket of 672 bytes; with 312 and 768, a gate registered first shares the last bucket with a.w.
std::vector<RankDependentCase> rank_dependent_cases() {
  const ReducerOptions one_per_bucket{1e-9, 1e-9};
  const ReducerOptions branch_buckets{672 / kBytesPerMiB, 312 / kBytesPerMiB};
  const ReducerOptions gate_with_a_w{768 / kBytesPerMiB, 312 / kBytesPerMiB};
  const std::vector<RankDependentCase> cases{
      // a.w 0, a.b 1, b.w 2, b.b 3, head.w 4, head.b 5
      {"BranchOrderOnePerBucket", Gate::None, one_per_bucket, {{5}, {4}, {3}, {2}, {1}, {0}}},
      {"BranchOrderBranchBuckets", Gate::None, branch_buckets, {{5, 4}, {3, 2}, {1, 0}}},
      // a.w 0, a.b 1, b.w 2, b.b 3, gate 4, head.w 5, head.b 6: on ranks other than 0 bucket {4} waits for
      // finalize(), and every bucket after it with it.
      {"GateInTheMiddleOnePerBucket", Gate::Middle, one_per_bucket, {{6}, {5}, {4}, {3}, {2}, {1}, {0}}},
      // gate 0, a.w 1, a.b 2, b.w 3, b.b 4, head.w 5, head.b 6
      {"GateFirstSharingABucket", Gate::First, gate_with_a_w, {{6, 5}, {4, 3, 2}, {1, 0}}},
  };
  std::vector<RankDependentCase> both;
  for (const RankDependentCase& c : cases) {
    both.push_back(c);  // shared memory, the default on one host
    RankDependentCase mpi = c;
    mpi.options.shared_memory = false;
    both.push_back(mpi);
  }
  return both;
}

INSTANTIATE_TEST_SUITE_P(Cases, ReducerRankDependent, ::testing::ValuesIn(rank_dependent_cases()),
                         [](const ::testing::TestParamInfo<RankDependentCase>& info) {
                           return std::string(info.param.name) +
                                  (info.param.options.shared_memory ? "" : "Mpi");
                         });

}  // namespace
