// The DDP-style GradientReducer and ZeRO-1 under mpirun (2 and 4 ranks), in float64 against one process
// trained on the concatenated batch: an MLP with parameters of varied sizes plus one the forward never uses,
// with bucket sizes that put several parameters per bucket, one per bucket, or all in one; gradient
// accumulation with NoSyncGuard against the big batch; the same bucket launch order on every rank, with the
// buckets that can be complete launched before backward's last gradients arrive (overlap); ZeroAdamW
// against AdamW on the reducer's averaged gradients, with 1/DP of its optimizer state per rank.
#include <gtest/gtest.h>
#include <mpi.h>
#include <torch/csrc/autograd/custom_function.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "checkpoints/sharded_state.h"
#include "comm/communicator.h"
#include "comm/gradient_reducer.h"
#include "tests/comm/collective_reference.h"
#include "trainer/optimizer.h"
#include "trainer/zero_optimizer.h"

namespace {
using vimo::comm::GradientReducer;
using vimo::comm::NoSyncGuard;
using vimo::comm::ReducerOptions;
using vimo::testing::mpi_world;
using vimo::testing::shared_seed;

constexpr int64_t kIn = 8, kHidden = 16, kWide = 32, kOut = 4;
constexpr size_t kUnused = 2;  // the index of the parameter the forward never uses

// x [n, 8] -> tanh(x W1ᵀ + b1) [n, 16] -> tanh(· W2ᵀ + b2) [n, 32] -> (· W3ᵀ + b3) · scale [n, 4].
// Registration order: w1, b1, unused, w2, b2, w3, b3, scale (826 elements, 6608 bytes in float64).
struct Mlp {
  std::vector<std::pair<std::string, at::Tensor>> named;

  explicit Mlp(uint64_t seed) {
    at::manual_seed(seed);
    const auto make = [&](const char* name, at::IntArrayRef shape) {
      named.emplace_back(name, (at::randn(shape, at::kDouble) * 0.5).requires_grad_(true));
    };
    make("w1", {kHidden, kIn});
    make("b1", {kHidden});
    make("unused", {5});
    make("w2", {kWide, kHidden});
    make("b2", {kWide});
    make("w3", {kOut, kWide});
    make("b3", {kOut});
    make("scale", {1});
  }
  std::vector<at::Tensor> params() const {
    std::vector<at::Tensor> out;
    for (const auto& [name, p] : named) out.push_back(p);
    return out;
  }
  const at::Tensor& operator[](size_t i) const { return named[i].second; }

  // Mean squared error over the rows of x [n, 8] against y [n, 4].
  at::Tensor loss(const at::Tensor& x, const at::Tensor& y) const {
    const Mlp& m = *this;
    at::Tensor h = at::tanh(at::addmm(m[1], x, m[0].t()));       // [n, 16]
    h = at::tanh(at::addmm(m[4], h, m[3].t()));                  // [n, 32]
    const at::Tensor out = at::addmm(m[6], h, m[5].t()) * m[7];  // [n, 4]
    return (out - y).pow(2).mean();
  }
};

struct Batch {
  at::Tensor x, y;  // [n, 8], [n, 4]
  Batch rows(int64_t begin, int64_t count) const {
    return {x.narrow(0, begin, count), y.narrow(0, begin, count)};
  }
};

Batch global_batch(uint64_t seed, int64_t rows) {
  at::manual_seed(seed);
  return {at::randn({rows, kIn}, at::kDouble), at::randn({rows, kOut}, at::kDouble)};
}

// The single-process reference gets a zero gradient wherever backward gave none, as the reducer does (Note
// [Parameters without a gradient]), so that AdamW treats the unused parameter alike on both sides.
void zero_fill_missing_gradients(const Mlp& model) {
  for (const auto& [name, p] : model.named) {
    if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
  }
}

// The same integers on every rank?
bool same_on_every_rank(const std::vector<int64_t>& values) {
  at::Tensor mine = at::tensor(values, at::kLong);
  at::Tensor high = mine.clone(), low = mine.clone();
  mpi_world()->allreduce(high, vimo::comm::ReduceOp::Max);
  mpi_world()->allreduce(low, vimo::comm::ReduceOp::Min);
  return at::equal(high, low);
}

struct BucketCase {
  const char* name;
  ReducerOptions options;
  std::vector<std::vector<size_t>> buckets;  // expected parameter indices per bucket, in launch order
  int64_t launched_in_backward;              // per step: the buckets before the one holding `unused`
};

void PrintTo(const BucketCase& c, std::ostream* out) { *out << c.name; }

class ReducerTraining : public ::testing::TestWithParam<BucketCase> {};

// Float64 throughout; the reducer sums the ranks' gradients in another order than one process sums rows, so
// the gradients differ by a few ulps, and four AdamW steps (which divide by √v) keep that within 1e-10.
TEST_P(ReducerTraining, EndsWithTheParametersOfOneProcessOnTheWholeBatch) {
  const BucketCase& c = GetParam();
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int64_t per_rank = 3;
  const int steps = 4;

  Mlp distributed(seed), single(seed);
  GradientReducer reducer(distributed.params(), mpi_world(), c.options);
  ASSERT_EQ(reducer.bucket_parameters(), c.buckets);
  // Every rank of these tests runs on this host: the default is the shared-memory all-reduce.
  EXPECT_EQ(reducer.transport().rfind(c.options.shared_memory ? "shared memory" : "mpi", 0), 0u)
      << reducer.transport();
  vimo::trainer::AdamW dp_optimizer(distributed.named, {}), single_optimizer(single.named, {});
  // Overlap, by structure rather than by time: the first layer's gradients (w1, b1) are the last of backward,
  // so when either arrives (a hook run just before it is accumulated) every bucket that can already be
  // complete, those before the one holding `unused` (and w1, b1), must have been launched while backward
  // still has the first layer to accumulate. A reducer that launched in finalize(), or only at backward's
  // last hooks, would show fewer here.
  std::vector<int64_t> launched_before_first_layer;  // per step, at w1's and at b1's hook
  int64_t launched_before_step = 0;
  for (size_t first_layer : {0, 1}) {
    distributed[first_layer].register_hook([&](const at::TensorBase&) {
      launched_before_first_layer.push_back(reducer.stats().buckets_launched - launched_before_step);
    });
  }
  for (int step = 0; step < steps; ++step) {
    const Batch batch = global_batch(seed + 1 + step, per_rank * ranks);
    launched_before_step = reducer.stats().buckets_launched;
    distributed
        .loss(batch.x.narrow(0, rank * per_rank, per_rank), batch.y.narrow(0, rank * per_rank, per_rank))
        .backward();
    reducer.finalize();
    ASSERT_TRUE(distributed[kUnused].grad().defined());
    EXPECT_TRUE(distributed[kUnused].grad().eq(0).all().item<bool>());
    dp_optimizer.step(1e-2);
    dp_optimizer.zero_grad();

    single.loss(batch.x, batch.y).backward();
    zero_fill_missing_gradients(single);
    single_optimizer.step(1e-2);
    single_optimizer.zero_grad();
  }
  for (size_t i = 0; i < single.named.size(); ++i) {
    EXPECT_TRUE(at::allclose(distributed[i], single[i], 1e-10, 1e-12))
        << single.named[i].first << ": max |diff| "
        << (distributed[i] - single[i]).abs().max().item<double>();
  }

  // Every rank launched buckets 0, 1, 2, ... in that order, and those before the unused parameter's bucket
  // already during backward.
  const std::vector<int> order = reducer.last_launch_order();
  std::vector<int64_t> order64(order.begin(), order.end());
  std::vector<int64_t> expected(c.buckets.size());
  for (size_t b = 0; b < expected.size(); ++b) expected[b] = static_cast<int64_t>(b);
  EXPECT_EQ(order64, expected);
  EXPECT_TRUE(same_on_every_rank(order64)) << "the ranks launched their buckets in different orders";
  const vimo::comm::ReducerStats stats = reducer.stats();
  EXPECT_EQ(stats.steps, steps);
  EXPECT_EQ(stats.buckets_launched, steps * static_cast<int64_t>(c.buckets.size()));
  EXPECT_EQ(stats.buckets_launched_in_backward, steps * c.launched_in_backward);
  EXPECT_EQ(launched_before_first_layer, std::vector<int64_t>(2 * steps, c.launched_in_backward))
      << "buckets launched when w1's and b1's gradients arrived, per step";
  EXPECT_EQ(stats.bytes_reduced, steps * 826 * 8);
  EXPECT_GE(stats.exposed_s, 0.0);
  EXPECT_LE(stats.exposed_s, stats.span_s);  // finalize() comes after the first launch
  if (rank == 0) {
    std::printf("[ overlap  ] %s: %lld buckets, first launch to done %.3f ms/step, exposed %.3f ms/step\n",
                c.name, static_cast<long long>(c.buckets.size()), 1e3 * stats.span_s / steps,
                1e3 * stats.exposed_s / steps);
  }
}

// Bytes in registration order: w1 1024, b1 128, unused 40, w2 4096, b2 256, w3 1024, b3 32, scale 8. Buckets
// fill from the last parameter: a 105-byte first bucket closes at {scale, b3, w3}, 2097-byte ones at {b2,
// w2}, and the rest stays together.
// Each case twice: through the shared-memory all-reduce (the default on one host) and through MPI.
std::vector<BucketCase> bucket_cases() {
  const std::vector<BucketCase> cases{
      BucketCase{"SeveralPerBucket", {2097 / 1048576.0, 105 / 1048576.0}, {{7, 6, 5}, {4, 3}, {2, 1, 0}}, 2},
      BucketCase{"OnePerBucket", {1e-9, 1e-9}, {{7}, {6}, {5}, {4}, {3}, {2}, {1}, {0}}, 5},
      BucketCase{"OneBucket", {}, {{7, 6, 5, 4, 3, 2, 1, 0}}, 0}};
  std::vector<BucketCase> both;
  for (const BucketCase& c : cases) {
    both.push_back(c);
    BucketCase mpi = c;
    mpi.options.shared_memory = false;
    mpi.name = mpi.name == std::string("SeveralPerBucket") ? "SeveralPerBucketMpi"
               : mpi.name == std::string("OnePerBucket")   ? "OnePerBucketMpi"
                                                           : "OneBucketMpi";
    both.push_back(mpi);
  }
  // Note [Gradients as views of their bucket]: the default; once the old way, copied into the bucket and
  // back.
  BucketCase copied = cases[0];
  copied.name = "SeveralPerBucketCopied";
  copied.options.gradient_as_bucket_view = false;
  both.push_back(copied);
  return both;
}

INSTANTIATE_TEST_SUITE_P(BucketSizes, ReducerTraining, ::testing::ValuesIn(bucket_cases()),
                         [](const ::testing::TestParamInfo<BucketCase>& info) {
                           return std::string(info.param.name);
                         });

// Note [A progress thread for MPI]: a 16 MiB bucket, launched by the only hook, is all-reduced in several
// rounds of rendezvous messages, and Open MPI advances them only inside MPI calls. The caller makes none for
// a second before finalize(), so the bucket can finish before finalize() only through the reducer's thread.
// (With progress_interval_us = 0 this test fails: no bucket is done before finalize().)
// (The shared-memory all-reduce, the default on one host, needs no such thread: it is turned off here.)
TEST(ReducerProgress, TheThreadFinishesABucketWhileTheCallerMakesNoMpiCall) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  at::Tensor weight = at::zeros({int64_t{4} << 20}, at::kFloat).requires_grad_();  // [4 Mi] float32: 16 MiB
  ReducerOptions options;
  options.shared_memory = false;
  GradientReducer reducer({weight}, mpi_world(), options);
  const int steps = 2;
  for (int step = 0; step < steps; ++step) {
    (weight * static_cast<double>(rank + 1 + step)).sum().backward();  // d/dw = rank + 1 + step everywhere
    std::this_thread::sleep_for(std::chrono::seconds(1));
    reducer.finalize();
    const double mean = (ranks + 1) / 2.0 + step;
    EXPECT_TRUE(weight.grad().eq(mean).all().item<bool>()) << "step " << step << ": expected " << mean;
    weight.mutable_grad().reset();
  }
  const vimo::comm::ReducerStats stats = reducer.stats();
  EXPECT_EQ(stats.buckets_launched, steps);
  EXPECT_EQ(stats.buckets_done_before_finalize, steps);
  EXPECT_GT(stats.progress_polls, 0);
}

// Note [A shared-memory all-reduce for one host]: the same 16 MiB bucket through the shared segment finishes
// on the all-reduce's own thread while the caller sleeps, and every rank ends with the same bits.
TEST(ReducerProgress, TheSharedMemoryAllReduceFinishesABucketWhileTheCallerSleeps) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  at::manual_seed(shared_seed() + static_cast<uint64_t>(rank));
  at::Tensor weight = at::zeros({int64_t{4} << 20}, at::kFloat).requires_grad_();  // 16 MiB
  GradientReducer reducer({weight}, mpi_world(), ReducerOptions{});
  ASSERT_EQ(reducer.transport().rfind("shared memory", 0), 0u) << reducer.transport();
  const at::Tensor mine = at::randn({int64_t{4} << 20}, at::kFloat);
  at::Tensor everyone = mpi_world()->allgather(mine.view({1, -1}));  // [ranks, 4 Mi]
  (weight * mine).sum().backward();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  reducer.finalize();
  // float32 sums of `ranks` terms in rank order, divided by ranks: within a few ulps of the float64 mean.
  const at::Tensor expected = everyone.to(at::kDouble).mean(0);
  EXPECT_LT((weight.grad().to(at::kDouble) - expected).abs().max().item<double>(), 1e-5);
  at::Tensor all = mpi_world()->allgather(weight.grad().view({1, -1}));
  for (int r = 1; r < ranks; ++r) EXPECT_TRUE(at::equal(all[r], all[0])) << "rank " << r << " differs";
  const vimo::comm::ReducerStats stats = reducer.stats();
  EXPECT_EQ(stats.buckets_done_before_finalize, 1);
  EXPECT_EQ(stats.progress_polls, 0);
}

// A parameter with no elements (registered first, so alone in the last bucket) gets no data pointer from
// LibTorch: both transports must still average the others and give it an empty gradient.
TEST(ReducerEmptyParameter, AnEmptyBucketIsReducedThroughEitherTransport) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  for (const bool shared_memory : {true, false}) {
    at::Tensor empty = at::zeros({0}, at::kFloat).requires_grad_();
    at::Tensor weight = at::zeros({int64_t{1} << 19}, at::kFloat).requires_grad_();  // 2 MiB: its own bucket
    ReducerOptions options;
    options.shared_memory = shared_memory;
    GradientReducer reducer({empty, weight}, mpi_world(), options);
    ASSERT_EQ(reducer.bucket_parameters().size(), 2u);
    (weight * static_cast<double>(rank + 1)).sum().backward();
    reducer.finalize();
    EXPECT_TRUE(weight.grad().eq((ranks + 1) / 2.0).all().item<bool>()) << reducer.transport();
    ASSERT_TRUE(empty.grad().defined()) << reducer.transport();
    EXPECT_EQ(empty.grad().numel(), 0);
  }
}

// A custom backward may return no gradient for an input: AccumulateGrad leaves .grad() alone, and the reducer
// takes the parameter as one without a gradient (zeros in the average) instead of failing backward.
struct NoGradient : torch::autograd::Function<NoGradient> {
  static at::Tensor forward(torch::autograd::AutogradContext* /*ctx*/, const at::Tensor& x) {
    return x.clone();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* /*ctx*/,
                                                 torch::autograd::variable_list /*grads*/) {
    return {at::Tensor()};
  }
};

TEST(ReducerUndefinedGradient, AGradientAutogradDidNotDeliverCountsAsZero) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  at::Tensor p = at::zeros({5}, at::kDouble).requires_grad_();
  at::Tensor q = at::zeros({3}, at::kDouble).requires_grad_();
  GradientReducer reducer({p, q}, mpi_world(), {});
  ((p * static_cast<double>(rank + 1)).sum() + NoGradient::apply(q).sum()).backward();
  reducer.finalize();
  EXPECT_TRUE(p.grad().eq((ranks + 1) / 2.0).all().item<bool>());
  ASSERT_TRUE(q.grad().defined());
  EXPECT_TRUE(q.grad().eq(0).all().item<bool>());
}

// A parameter frozen after the reducer was made gets no gradient, as in one process (AdamW then leaves it
// alone, instead of decaying it and applying its old momentum), while the others are averaged as before.
TEST(ReducerFrozenParameter, AParameterFrozenAfterConstructionGetsNoGradient) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  at::Tensor p = at::ones({4}, at::kDouble).requires_grad_();
  at::Tensor frozen = at::ones({4}, at::kDouble).requires_grad_();
  GradientReducer reducer({p, frozen}, mpi_world(), {});
  frozen.requires_grad_(false);
  for (int step = 0; step < 2; ++step) {
    ((p * frozen).sum() * static_cast<double>(rank + 1)).backward();
    reducer.finalize();
    EXPECT_TRUE(p.grad().eq((step + 1) * (ranks + 1) / 2.0).all().item<bool>()) << "step " << step;
    EXPECT_FALSE(frozen.grad().defined()) << "step " << step;
  }
}

// Note [Gradients as views of their bucket]: after finalize() the parameters of one bucket have gradients
// that share its memory (and with the option off, their own). A second step without clearing them adds into
// those views in place, and must give the first average plus the second; destroying the reducer (whose
// shared-memory segment would go with it) leaves every .grad(), and every other handle on one, readable and
// unchanged.
TEST(ReducerBucketView, GradientsViewTheirBucketAccumulateInPlaceAndOutliveTheReducer) {
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int64_t per_rank = 3;
  for (const bool shared_memory : {true, false}) {
    for (const bool as_view : {true, false}) {
      SCOPED_TRACE(::testing::Message() << "shared_memory " << shared_memory << ", view " << as_view);
      Mlp distributed(seed), single(seed);
      std::vector<at::Tensor> kept;     // the gradients after two steps, copied
      std::vector<at::Tensor> handles;  // ... and the gradients themselves, held past the reducer
      {
        ReducerOptions options{2097 / 1048576.0, 105 / 1048576.0};
        options.shared_memory = shared_memory;
        options.gradient_as_bucket_view = as_view;
        GradientReducer reducer(distributed.params(), mpi_world(), options);
        for (int step = 0; step < 2; ++step) {  // no zero_grad in between: the second step accumulates
          const Batch batch = global_batch(seed + 1 + step, per_rank * ranks);
          const Batch mine = batch.rows(rank * per_rank, per_rank);
          distributed.loss(mine.x, mine.y).backward();
          reducer.finalize();
          single.loss(batch.x, batch.y).backward();
        }
        zero_fill_missing_gradients(single);
        for (const std::vector<size_t>& bucket : reducer.bucket_parameters()) {
          for (size_t i : bucket) {
            if (i == bucket[0]) continue;
            EXPECT_EQ(distributed[i].grad().is_alias_of(distributed[bucket[0]].grad()), as_view)
                << single.named[i].first << " and " << single.named[bucket[0]].first;
          }
        }
        for (size_t i = 0; i < single.named.size(); ++i) {
          EXPECT_TRUE(at::allclose(distributed[i].grad(), single[i].grad(), 1e-10, 1e-13))
              << single.named[i].first << ": max |diff| "
              << (distributed[i].grad() - single[i].grad()).abs().max().item<double>();
          kept.push_back(distributed[i].grad().clone());
          handles.push_back(distributed[i].grad());
        }
      }
      for (size_t i = 0; i < single.named.size(); ++i) {
        ASSERT_TRUE(distributed[i].grad().defined()) << single.named[i].first;
        EXPECT_TRUE(at::equal(distributed[i].grad(), kept[i])) << single.named[i].first;
        EXPECT_TRUE(at::equal(handles[i], kept[i])) << single.named[i].first;
      }
    }
  }
}

// Buckets of other dtypes than float32 / float64 keep MPI while the rest go through shared memory: a
// bfloat16 parameter and a float32 one, each its own bucket, both averaged.
TEST(ReducerMixedDtypes, ABfloat16BucketGoesThroughMpiBesideASharedMemoryOne) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  at::Tensor half = at::zeros({64}, at::kBFloat16).requires_grad_();
  at::Tensor single = at::zeros({int64_t{1} << 19}, at::kFloat).requires_grad_();  // 2 MiB: its own bucket
  GradientReducer reducer({half, single}, mpi_world(), ReducerOptions{});
  ASSERT_EQ(reducer.bucket_parameters().size(), 2u);
  EXPECT_EQ(reducer.transport().rfind("shared memory", 0), 0u) << reducer.transport();
  EXPECT_NE(reducer.transport().find("for 1 of 2 buckets"), std::string::npos) << reducer.transport();
  for (int step = 0; step < 2; ++step) {
    // d/d(half) = rank + 1, d/d(single) = 2 (rank + 1) + step: small integers, exact in bfloat16.
    ((half.to(at::kFloat) * (rank + 1)).sum() + (single * (2.0 * (rank + 1) + step)).sum()).backward();
    reducer.finalize();
    EXPECT_TRUE(half.grad().to(at::kFloat).eq((ranks + 1) / 2.0).all().item<bool>())
        << half.grad().to(at::kFloat).slice(0, 0, 4);
    EXPECT_TRUE(single.grad().eq(ranks + 1.0 + step).all().item<bool>()) << "step " << step;
    half.mutable_grad().reset();
    single.mutable_grad().reset();
  }
}

// A channels_last parameter's .grad() keeps its strides as a view of the bucket, and is averaged.
TEST(ReducerBucketView, AChannelsLastParameterKeepsItsLayout) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  for (const bool shared_memory : {true, false}) {
    at::manual_seed(shared_seed());
    at::Tensor conv = at::randn({4, 3, 5, 6}).contiguous(at::MemoryFormat::ChannelsLast).requires_grad_();
    at::Tensor bias = at::zeros({7}).requires_grad_();  // in the same bucket, after it in memory
    ASSERT_FALSE(conv.is_contiguous());
    ReducerOptions options;
    options.shared_memory = shared_memory;
    GradientReducer reducer({conv, bias}, mpi_world(), options);
    ASSERT_EQ(reducer.bucket_parameters().size(), 1u);
    const at::Tensor pattern =
        at::arange(conv.numel(), at::kFloat).view(conv.sizes());  // a different value each
    ((conv * pattern).sum() * (rank + 1) + bias.sum() * (rank + 1)).backward();
    reducer.finalize();
    SCOPED_TRACE(reducer.transport());
    EXPECT_EQ(conv.grad().strides(), conv.strides());
    EXPECT_TRUE(conv.grad().is_alias_of(bias.grad()));
    EXPECT_TRUE(at::equal(conv.grad(), pattern * ((ranks + 1) / 2.0)));
    EXPECT_TRUE(bias.grad().eq((ranks + 1) / 2.0).all().item<bool>());
  }
}

TEST(ReducerAccumulation, NoSyncMicroStepsThenOneReductionEqualTheBigBatch) {
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int64_t micro_steps = 3, micro_rows = 2, per_rank = micro_steps * micro_rows;
  const Batch batch = global_batch(seed + 1, per_rank * ranks);

  Mlp distributed(seed), single(seed);
  GradientReducer reducer(distributed.params(), mpi_world(), {2097 / 1048576.0, 105 / 1048576.0});
  for (int64_t m = 0; m < micro_steps; ++m) {
    const Batch micro = batch.rows(rank * per_rank + m * micro_rows, micro_rows);
    // Each micro-step's loss is a mean over its rows; 1/micro_steps makes the sum of them the rank's mean.
    if (m + 1 < micro_steps) {
      NoSyncGuard no_sync(reducer);
      (distributed.loss(micro.x, micro.y) / micro_steps).backward();
      reducer.finalize();  // a no-op without synchronisation
      EXPECT_EQ(reducer.stats().buckets_launched, 0) << "a no_sync micro-step communicated";
    } else {
      (distributed.loss(micro.x, micro.y) / micro_steps).backward();
      reducer.finalize();
    }
  }
  EXPECT_EQ(reducer.stats().buckets_launched, 3);
  single.loss(batch.x, batch.y).backward();
  zero_fill_missing_gradients(single);
  for (size_t i = 0; i < single.named.size(); ++i) {
    EXPECT_TRUE(at::allclose(distributed[i].grad(), single[i].grad(), 1e-10, 1e-13))
        << single.named[i].first << ": max |diff| "
        << (distributed[i].grad() - single[i].grad()).abs().max().item<double>();
  }
}

TEST(ReducerErrors, DifferentParametersOnOneRankFailOnEveryRank) {
  Mlp model(1);
  std::vector<at::Tensor> params = model.params();
  if (mpi_world()->rank() == mpi_world()->size() - 1) params.pop_back();
  try {
    GradientReducer reducer(params, mpi_world(), {});
    ADD_FAILURE() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("the ranks built different gradient buckets"), std::string::npos)
        << e.what();
  }
}

TEST(ReducerErrors, SecondBackwardBeforeFinalizeIsNamed) {
  Mlp model(2);
  GradientReducer reducer(model.params(), mpi_world(), {1e-9, 1e-9});
  const Batch batch = global_batch(3, 2);
  model.loss(batch.x, batch.y).backward();
  try {
    model.loss(batch.x, batch.y).backward();
    ADD_FAILURE() << "no error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("got a second gradient before finalize()"), std::string::npos)
        << e.what();
  }
  reducer.finalize();  // every rank is in the same state, so the step still completes
  // ... with the first backward's gradients (every rank had the same batch, so they are the average): the
  // refused second gradient was not added into a bucket (Note [Gradients as views of their bucket]).
  Mlp reference(2);
  reference.loss(batch.x, batch.y).backward();
  zero_fill_missing_gradients(reference);
  for (size_t i = 0; i < reference.named.size(); ++i) {
    EXPECT_TRUE(at::allclose(model[i].grad(), reference[i].grad(), 1e-12, 1e-14))
        << reference.named[i].first << ": max |diff| "
        << (model[i].grad() - reference[i].grad()).abs().max().item<double>();
  }
}

// A reducer destroyed with its buckets in flight (finalize() skipped): the all-reduces end before the
// buckets go, so every rank keeps the same, averaged gradient in both transports.
TEST(ReducerErrors, DestroyedInFlightEveryRankKeepsTheSameAverage) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  for (const bool shared_memory : {true, false}) {
    at::Tensor weight = at::zeros({int64_t{8} << 20}, at::kFloat).requires_grad_();  // 32 MiB
    {
      ReducerOptions options;
      options.shared_memory = shared_memory;
      GradientReducer reducer({weight}, mpi_world(), options);
      (weight * static_cast<double>(rank + 1)).sum().backward();
    }
    ASSERT_TRUE(weight.grad().defined());
    EXPECT_TRUE(weight.grad().eq((ranks + 1) / 2.0).all().item<bool>())
        << "shared_memory " << shared_memory << ": " << weight.grad().min().item<double>() << " to "
        << weight.grad().max().item<double>();
  }
}

// Float64: ZeRO's reduce-scatter and the reducer's all-reduce add the ranks' gradients in their own orders.
// The sharded model's weights are loaded after its optimizer is made, as a resume and init_from do: the
// steps must update the loaded weights (they once updated the ones the optimizer had copied when made).
TEST(ZeroOne, MatchesAdamWOnAveragedGradientsWithOneShardOfTheState) {
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int64_t per_rank = 3;
  Mlp unsharded(seed), sharded(seed + 1);
  GradientReducer reducer(unsharded.params(), mpi_world(), {2097 / 1048576.0, 105 / 1048576.0});
  vimo::trainer::AdamW adamw(unsharded.named, {});
  vimo::trainer::ZeroAdamW zero(sharded.named, mpi_world(), {});
  {
    const at::NoGradGuard no_grad;
    for (size_t i = 0; i < sharded.named.size(); ++i) sharded.named[i].second.copy_(unsharded[i]);
  }
  for (int step = 0; step < 4; ++step) {
    const Batch batch = global_batch(seed + 1 + step, per_rank * ranks);
    const Batch mine = batch.rows(rank * per_rank, per_rank);
    unsharded.loss(mine.x, mine.y).backward();
    reducer.finalize();
    adamw.step(1e-2);
    adamw.zero_grad();
    sharded.loss(mine.x, mine.y).backward();
    zero.step(1e-2);
    zero.zero_grad();
  }
  EXPECT_EQ(zero.steps_taken(), 4);
  for (size_t i = 0; i < unsharded.named.size(); ++i) {
    EXPECT_TRUE(at::allclose(sharded[i], unsharded[i], 1e-10, 1e-12))
        << unsharded.named[i].first << ": max |diff| "
        << (sharded[i] - unsharded[i]).abs().max().item<double>();
  }

  // Optimizer state, counted from the moment tensors themselves: the shards' bytes add up to AdamW's, and no
  // rank holds more than its ceil(826 / DP) elements' worth (two float64 moments each).
  int64_t unsharded_bytes = 0;
  for (const auto& [name, t] : adamw.state_tensors()) unsharded_bytes += t.numel() * 8;
  EXPECT_EQ(unsharded_bytes, 826 * 2 * 8);
  const int64_t mine_bytes = zero.state_bytes();
  const at::Tensor all_bytes = mpi_world()->allgather(at::tensor({mine_bytes}, at::kLong));  // [ranks]
  EXPECT_EQ(all_bytes.sum().item<int64_t>(), unsharded_bytes);
  EXPECT_EQ(zero.shard_elements(), (826 + ranks - 1) / ranks);
  EXPECT_LE(all_bytes.max().item<int64_t>(), zero.shard_elements() * 2 * 8);
  if (rank == 0) {
    std::printf("[ zero-1   ] optimizer state: AdamW %lld bytes per rank; ZeroAdamW over %d ranks:",
                static_cast<long long>(unsharded_bytes), ranks);
    for (int r = 0; r < ranks; ++r)
      std::printf(" %lld", static_cast<long long>(all_bytes[r].item<int64_t>()));
    std::printf(" bytes (ideal 1/DP = %.1f)\n", static_cast<double>(unsharded_bytes) / ranks);
  }
}

}  // namespace

namespace {

// Checkpoints hold whole moments (trainer/zero_optimizer.h): ZeroAdamW's full_state_tensors() equal AdamW's
// state after the same steps, moments saved by either continue in the other, also over another number of
// ranks (half the world, by split), and clipping acts on the averaged gradient as clip_gradients does after
// a GradientReducer. Float64; every step clips (checked), so the norms must agree too.
TEST(ZeroOne, WholeMomentsMoveBetweenAdamWAndDpSizesAndClippingMatches) {
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int64_t per_rank = 3;
  const double max_norm = 0.05, lr = 1e-2;
  Mlp unsharded(seed), sharded(seed);
  GradientReducer reducer(unsharded.params(), mpi_world(), {});
  vimo::trainer::AdamW adamw(unsharded.named, {});
  vimo::trainer::ZeroAdamW zero(sharded.named, mpi_world(), {});
  for (int step = 0; step < 3; ++step) {
    const Batch batch = global_batch(seed + 10 + step, per_rank * ranks);
    const Batch mine = batch.rows(rank * per_rank, per_rank);
    unsharded.loss(mine.x, mine.y).backward();
    reducer.finalize();
    const double reference_norm = vimo::trainer::clip_gradients(unsharded.params(), max_norm);
    adamw.step(lr);
    adamw.zero_grad();
    sharded.loss(mine.x, mine.y).backward();
    const double norm = zero.step(lr, max_norm);
    zero.zero_grad();
    EXPECT_GT(reference_norm, max_norm) << "step " << step << " did not clip";
    EXPECT_NEAR(norm, reference_norm, 1e-10 * reference_norm) << "step " << step;
  }
  for (size_t i = 0; i < unsharded.named.size(); ++i) {
    EXPECT_TRUE(at::allclose(sharded[i], unsharded[i], 1e-10, 1e-12)) << unsharded.named[i].first;
  }
  const std::map<std::string, at::Tensor> whole = zero.full_state_tensors(),
                                          reference = adamw.state_tensors();
  ASSERT_EQ(whole.size(), reference.size());
  for (const auto& [name, t] : reference) {
    ASSERT_TRUE(whole.count(name)) << name;
    EXPECT_TRUE(whole.at(name).sizes().equals(t.sizes())) << name;
    EXPECT_TRUE(at::allclose(whole.at(name), t, 1e-10, 1e-14)) << name;
  }

  // Continue from step 3 two ways: AdamW with ZeRO's moments, and ZeroAdamW over half the ranks (each rank
  // alone at 2 ranks) with AdamW's. Every rank trains on the whole batch, so any group's average is that
  // batch's gradient.
  Mlp resumed(seed), resharded(seed);
  {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < unsharded.named.size(); ++i) {
      resumed.named[i].second.copy_(unsharded[i]);
      resharded.named[i].second.copy_(unsharded[i]);
    }
  }
  vimo::trainer::AdamW from_zero(resumed.named, {});
  from_zero.load_state_tensors(whole, zero.steps_taken());
  const std::shared_ptr<vimo::comm::Communicator> half = mpi_world()->split(rank % 2, rank);
  vimo::trainer::ZeroAdamW from_adamw(resharded.named, half, {});
  from_adamw.load_full_state_tensors(reference, adamw.steps_taken());
  EXPECT_EQ(from_adamw.steps_taken(), 3);
  for (int step = 3; step < 6; ++step) {
    const Batch batch = global_batch(seed + 10 + step, per_rank * ranks);
    resumed.loss(batch.x, batch.y).backward();
    zero_fill_missing_gradients(resumed);  // as the reducer and ZeroAdamW treat the unused parameter
    vimo::trainer::clip_gradients(resumed.params(), max_norm);
    from_zero.step(lr);
    from_zero.zero_grad();
    resharded.loss(batch.x, batch.y).backward();
    from_adamw.step(lr, max_norm);
    from_adamw.zero_grad();
  }
  for (size_t i = 0; i < resumed.named.size(); ++i) {
    EXPECT_TRUE(at::allclose(resharded[i], resumed[i], 1e-10, 1e-12))
        << resumed.named[i].first << ": max |diff| "
        << (resharded[i] - resumed[i]).abs().max().item<double>();
  }

  // A checkpoint without the moments (or of another model) is refused with the missing name.
  try {
    from_adamw.load_full_state_tensors({}, 0);
    ADD_FAILURE() << "empty moments were accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("is missing from the checkpoint"), std::string::npos) << e.what();
  }
}

// Note [Every rank writes its own part]: ZeroAdamW's moments saved by every rank in pieces through a real
// CheckpointManager, with no gather: each rank's file holds only its shard's moments (about 1/DP of AdamW's),
// and the checkpoint reads back into AdamW (whole, equal to the gathered moments) and into a ZeroAdamW over
// half the ranks (equal, bit for bit, to one loaded from the gathered moments).
TEST(ZeroOne, MomentsSavedInPiecesByEveryRankLoadIntoAdamWAndAnotherDpSize) {
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  Mlp sharded(seed);
  vimo::trainer::ZeroAdamW zero(sharded.named, mpi_world(), {});
  for (int step = 0; step < 2; ++step) {
    const Batch mine = global_batch(seed + 20 + step, 3 * ranks).rows(rank * 3, 3);
    sharded.loss(mine.x, mine.y).backward();
    zero.step(1e-2);
    zero.zero_grad();
  }
  const std::string root =
      (vimo::testing::shared_test_dir("zero_pieces", "checkpoints") / "checkpoints").string();
  vimo::checkpoints::TensorFile own, replicated;
  vimo::checkpoints::add_pieces(own, zero.state_pieces());
  const std::string dir =
      vimo::checkpoints::CheckpointManager(root, 1, mpi_world()).save(2, replicated, "{}", "", &own);
  const std::map<std::string, at::Tensor> gathered = zero.full_state_tensors();
  const vimo::checkpoints::Checkpoint checkpoint = vimo::checkpoints::CheckpointManager::load(dir);
  ASSERT_EQ(checkpoint.rank_files.size(), static_cast<size_t>(ranks));
  int64_t whole_elements = 0, file_elements = 0;
  for (const auto& [name, t] : gathered) whole_elements += t.numel();
  for (const auto& [name, t] : vimo::checkpoints::read_safetensors(checkpoint.rank_files[rank]).tensors)
    file_elements += t.numel();
  EXPECT_EQ(file_elements, 2 * std::min(zero.shard_elements(), 826 - rank * zero.shard_elements()))
      << "rank " << rank << "'s file holds other than its shard's two moments (" << whole_elements
      << " in all)";

  const vimo::checkpoints::StateReader reader(checkpoint);
  Mlp resumed(seed), resharded(seed), reference(seed);
  vimo::trainer::AdamW adamw(resumed.named, {});
  adamw.load_state_tensors(
      [&] {
        std::map<std::string, at::Tensor> whole;
        for (const auto& [name, t] : gathered) whole[name] = reader.read_whole(name);
        return whole;
      }(),
      zero.steps_taken());
  for (const auto& [name, t] : adamw.state_tensors()) EXPECT_TRUE(at::equal(t, gathered.at(name))) << name;
  const std::shared_ptr<vimo::comm::Communicator> half = mpi_world()->split(rank % 2, rank);
  vimo::trainer::ZeroAdamW from_pieces(resharded.named, half, {}), from_whole(reference.named, half, {});
  from_pieces.load_state(reader, zero.steps_taken());
  from_whole.load_full_state_tensors(gathered, zero.steps_taken());
  const std::map<std::string, at::Tensor> got = from_pieces.state_tensors(),
                                          want = from_whole.state_tensors();
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [name, t] : want) EXPECT_TRUE(at::equal(got.at(name), t)) << name;
  EXPECT_EQ(from_pieces.steps_taken(), 2);
  mpi_world()->barrier();
}

}  // namespace
