// The blocking collectives under mpirun, on the backend VIMO_TEST_COMM_BACKEND names (MPI by default, TCP,
// or NCCL on CUDA tensors: tests/comm/collective_reference.h): every collective against plain LibTorch on all
// ranks' inputs (rebuilt on each rank from a shared fresh seed), mismatched calls failing on every rank
// instead of hanging (MPI and TCP, which agree on each call first), and all_gather_with_grad's gradient
// against plain autograd on the whole problem in float64.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdlib>
#include <ostream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "tests/comm/collective_reference.h"

namespace {
using vimo::comm::ReduceOp;
using vimo::testing::accumulation_of;
using vimo::testing::all_inputs;
using vimo::testing::device_options;
using vimo::testing::dtype_name;
using vimo::testing::error_of;
using vimo::testing::expect_still_usable;
using vimo::testing::kNoAgreement;
using vimo::testing::now_ns;
using vimo::testing::reduce_case_name;
using vimo::testing::reduce_cases;
using vimo::testing::ReduceCase;
using vimo::testing::shared_seed;
using vimo::testing::to_device;
using vimo::testing::world;

// The fixtures of this file's tests: each skips, saying why, where the backend under test cannot run.
class WorldUnderTest : public vimo::testing::BackendTest {};
class AllreduceErrors : public vimo::testing::BackendTest {};
class AllgatherErrors : public vimo::testing::BackendTest {};
class BroadcastErrors : public vimo::testing::BackendTest {};
class CollectiveErrors : public vimo::testing::BackendTest {};
class Barrier : public vimo::testing::BackendTest {};
class Observer : public vimo::testing::BackendTest {};
class AllGatherWithGrad : public vimo::testing::BackendTest {};

TEST_F(WorldUnderTest, DescribesItself) {
  EXPECT_EQ(world()->backend_name(), vimo::testing::backend_under_test());
  int rank = -1, size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_EQ(world()->rank(), rank);
  EXPECT_EQ(world()->size(), size);
  const vimo::comm::WorldInfo launched = vimo::comm::world_from_environment();
  // mpirun sets OMPI_COMM_WORLD_*; a process started alone (an Open MPI singleton) has no launcher.
  EXPECT_EQ(launched.launcher, std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr ? "openmpi" : "none");
  EXPECT_EQ(launched.rank, rank);
  EXPECT_EQ(launched.world_size, size);
  const std::string version = vimo::comm::mpi_library_version();
  EXPECT_FALSE(version.empty());
  EXPECT_EQ(version.find('\n'), std::string::npos) << version;
  EXPECT_EQ(version.find(','), std::string::npos) << version;
}

class Allreduce : public vimo::testing::BackendTestWithParam<ReduceCase> {};

TEST_P(Allreduce, MatchesLibTorchOnAllInputs) {
  const auto [dtype, op] = GetParam();
  const int rank = world()->rank(), ranks = world()->size();
  const at::Tensor inputs = all_inputs(dtype, shared_seed(), ranks, {5, 7});  // [ranks, 5, 7]
  const at::ScalarType accumulation = accumulation_of(dtype);

  at::Tensor mine = to_device(inputs[rank]);  // [5, 7]
  world()->allreduce(mine, op);
  vimo::testing::expect_reduced(mine, inputs, op, accumulation, "contiguous");

  // A transposed view: reduced through a contiguous copy and written back into the view's storage.
  at::Tensor storage = to_device(inputs[rank].t().contiguous());  // [7, 5]
  at::Tensor view = storage.t();                                  // [5, 7], not contiguous
  world()->allreduce(view, op);
  vimo::testing::expect_reduced(view, inputs, op, accumulation, "transposed view");
  EXPECT_TRUE(at::equal(storage.t().cpu(), mine.cpu())) << "the view's result must land in its storage";
}

INSTANTIATE_TEST_SUITE_P(DtypesAndOps, Allreduce, ::testing::ValuesIn(reduce_cases()), reduce_case_name);

TEST_F(AllreduceErrors, IntegerAverageIsRejectedOnEveryRank) {
  at::Tensor counts = at::arange(4, device_options(at::kLong));
  const std::string message = error_of([&] { world()->allreduce(counts, ReduceOp::Avg); });
  EXPECT_CONTAINS(message, "[rank " + std::to_string(world()->rank()) + "] allreduce (avg) of int64");
  EXPECT_CONTAINS(message, "HINT:");
  EXPECT_TRUE(at::equal(counts.cpu(), at::arange(4, at::kLong)))
      << "a rejected call must leave the tensor alone";
  expect_still_usable();
}

class Allgather : public vimo::testing::BackendTestWithParam<at::ScalarType> {};

TEST_P(Allgather, ConcatenatesEveryRanksRowsBitForBit) {
  const at::ScalarType dtype = GetParam();
  const int rank = world()->rank();
  const int64_t ranks = world()->size();
  const uint64_t seed = shared_seed();

  const at::Tensor rows = all_inputs(dtype, seed, ranks, {3, 4});         // [ranks, 3, 4]
  const at::Tensor gathered = world()->allgather(to_device(rows[rank]));  // [ranks * 3, 4]
  EXPECT_EQ(gathered.device(), vimo::testing::device_under_test());
  EXPECT_TRUE(at::equal(gathered.cpu(), rows.reshape({ranks * 3, 4})));

  const at::Tensor cubes = all_inputs(dtype, seed + 1, ranks, {2, 3, 2});  // [ranks, 2, 3, 2]
  EXPECT_TRUE(at::equal(world()->allgather(to_device(cubes[rank])).cpu(), cubes.reshape({ranks * 2, 3, 2})));

  const at::Tensor transposed = to_device(rows[rank]).t();  // [4, 3], not contiguous
  ASSERT_FALSE(transposed.is_contiguous());
  EXPECT_TRUE(at::equal(world()->allgather(transposed).cpu(), rows.transpose(1, 2).reshape({ranks * 4, 3})));

  const at::Tensor none = at::empty({0, 4}, device_options(dtype));  // every rank contributes zero rows
  const at::Tensor gathered_none = world()->allgather(none);
  EXPECT_EQ(gathered_none.sizes(), at::IntArrayRef({0, 4}));
  EXPECT_EQ(gathered_none.scalar_type(), dtype);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, Allgather,
                         ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kLong,
                                           at::kInt, at::kByte),
                         [](const ::testing::TestParamInfo<at::ScalarType>& info) {
                           return dtype_name(info.param);
                         });

TEST_F(AllgatherErrors, DifferentShapesFailOnEveryRankNamingEachShape) {
  SKIP_ON_NCCL(kNoAgreement);
  SKIP_WITHOUT_A_SECOND_RANK();
  const int rank = world()->rank();
  const at::Tensor mine = at::zeros({rank + 1, 4});  // rank r has r + 1 rows
  const std::string message = error_of([&] { world()->allgather(mine); });
  EXPECT_CONTAINS(message, "[rank " + std::to_string(rank) + "] the ranks made different calls");
  for (int r = 0; r < world()->size(); ++r) {
    EXPECT_CONTAINS(
        message, "rank " + std::to_string(r) + ": allgather of float32 [" + std::to_string(r + 1) + ", 4]");
  }
  EXPECT_CONTAINS(message, "HINT:");
  expect_still_usable();
}

TEST_F(AllgatherErrors, DifferentDtypesFailOnEveryRank) {
  SKIP_ON_NCCL(kNoAgreement);
  SKIP_WITHOUT_A_SECOND_RANK();
  const at::Tensor mine = at::zeros({2, 4}, world()->rank() == 0 ? at::kDouble : at::kFloat);
  const std::string message = error_of([&] { world()->allgather(mine); });
  EXPECT_CONTAINS(message, "rank 0: allgather of float64 [2, 4]");
  EXPECT_CONTAINS(message, "rank 1: allgather of float32 [2, 4]");
  expect_still_usable();
}

TEST_F(AllgatherErrors, OneRankRejectingItsInputStopsAllRanks) {
  SKIP_ON_NCCL(kNoAgreement);
  const int rank = world()->rank(), last = world()->size() - 1;
  // The last rank passes a 0-dim tensor, which allgather cannot stack along dim 0; the others a valid one.
  const at::Tensor mine = rank == last ? at::zeros({}) : at::zeros({2, 4});
  const std::string message = error_of([&] { world()->allgather(mine); });
  if (rank == last) {
    EXPECT_CONTAINS(message,
                    "[rank " + std::to_string(last) + "] allgather gathers along dim 0 but got a 0-dim");
  } else {
    EXPECT_CONTAINS(message,
                    "abandoned on every rank: rank(s) " + std::to_string(last) + " rejected their input");
  }
  expect_still_usable();
}

TEST_F(AllgatherErrors, UnsupportedDtypeOnOneRankStopsAllRanks) {
  SKIP_ON_NCCL(kNoAgreement);
  const bool odd_one = world()->rank() == 0;
  const at::Tensor mine = at::zeros({2}, odd_one ? at::kBool : at::kFloat);
  const std::string message = error_of([&] { world()->allgather(mine); });
  const std::string backend = vimo::testing::backend_under_test() == "tcp" ? "TCP" : "MPI";
  EXPECT_CONTAINS(message,
                  odd_one ? "allgather got a bool tensor, which the " + backend + " backend does not support"
                          : "rank(s) 0 rejected their input");
  expect_still_usable();
}

class Broadcast : public vimo::testing::BackendTestWithParam<at::ScalarType> {};

TEST_P(Broadcast, EveryRankEndsWithTheRootsTensor) {
  const int rank = world()->rank(), ranks = world()->size();
  const at::Tensor inputs = all_inputs(GetParam(), shared_seed(), ranks, {3, 5});  // [ranks, 3, 5]
  for (int root = 0; root < ranks; ++root) {
    at::Tensor mine = to_device(inputs[rank]);
    world()->broadcast(mine, root);
    EXPECT_TRUE(at::equal(mine.cpu(), inputs[root])) << "root " << root;

    at::Tensor storage = to_device(inputs[rank].t().contiguous());  // [5, 3]
    at::Tensor view = storage.t();                                  // [3, 5], not contiguous
    world()->broadcast(view, root);
    EXPECT_TRUE(at::equal(storage.cpu(), inputs[root].t())) << "root " << root << ", transposed view";
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, Broadcast,
                         ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16, at::kLong),
                         [](const ::testing::TestParamInfo<at::ScalarType>& info) {
                           return dtype_name(info.param);
                         });

TEST_F(BroadcastErrors, RootOutsideTheWorldFailsOnEveryRank) {
  const int ranks = world()->size();
  for (int root : {ranks, -1}) {
    at::Tensor mine = at::zeros({3}, device_options());
    const std::string message = error_of([&] { world()->broadcast(mine, root); });
    EXPECT_CONTAINS(message, "broadcast from rank " + std::to_string(root) + ", but the ranks are 0.." +
                                 std::to_string(ranks - 1));
  }
  expect_still_usable();
}

TEST_F(CollectiveErrors, DifferentCollectivesFailTogether) {
  SKIP_ON_NCCL(kNoAgreement);
  SKIP_WITHOUT_A_SECOND_RANK();
  // Rank 0 enters a barrier while the others broadcast: MPI alone would pair these up and misbehave.
  at::Tensor mine = at::zeros({3});
  const std::string message = error_of([&] {
    if (world()->rank() == 0) {
      world()->barrier();
    } else {
      world()->broadcast(mine, 0);
    }
  });
  EXPECT_CONTAINS(message, "rank 0: barrier; rank 1: broadcast from rank 0 of float32 [3]");
  expect_still_usable();
}

TEST_F(Barrier, NoRankLeavesBeforeEveryRankHasArrived) {
  const vimo::comm::WorldInfo launched = vimo::comm::world_from_environment();
  if (launched.local_size != launched.world_size) {
    GTEST_SKIP() << "the check compares clock readings across ranks, so it needs them all on one host";
  }
  const int rank = world()->rank(), last = world()->size() - 1;
  world()->barrier();
  // Make the last rank arrive clearly late, so that a barrier that lets ranks through early would be caught.
  if (rank == last) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const int64_t arrived = now_ns();
  world()->barrier();
  const int64_t left = now_ns();
  const at::Tensor times = vimo::testing::mpi_world()->allgather(
      at::tensor({arrived, left}, at::kLong).unsqueeze(0));  // [ranks, 2]
  const int64_t last_arrival = times.select(1, 0).max().item<int64_t>();
  const int64_t first_departure = times.select(1, 1).min().item<int64_t>();
  EXPECT_LE(last_arrival, first_departure)
      << "a rank left the barrier " << (last_arrival - first_departure) << " ns before the last rank arrived";
}

// What the backend reports to the watchdog's CollectiveObserver: every wait, named by a string literal.
class RecordingObserver final : public vimo::comm::CollectiveObserver {
 public:
  void enter_collective(const char* name, int64_t bytes) override {
    EXPECT_EQ(depth, 0) << name << " entered inside another wait";
    ++depth;
    entered.emplace_back(name, bytes);
  }
  void leave_collective() override { --depth; }

  std::vector<std::pair<std::string, int64_t>> entered;  // (name, bytes) of every wait
  int depth = 0;
};

// The names are no longer parsed out of a formatted description but come from the call's signature (Note
// [The fixed cost of a blocking call] in comm/mpi_internal.h): each call must still report its own name and
// payload size, enter and leave in pairs, and the agreement's wait counts as the call's. NCCL's blocking
// calls only enqueue on the caller's stream: the host waits in them only while NCCL still connects to the
// peers, so they may report no wait; its other waits (an asynchronous call's, the barrier's) must be
// reported like the others.
TEST_F(Observer, EveryWaitIsReportedWithTheCallsNameAndSize) {
  const int rank = world()->rank(), ranks = world()->size();
  RecordingObserver observer;
  vimo::comm::set_collective_observer(&observer);
  struct Uninstall {  // also when a call throws: later tests must not report into a destroyed observer
    ~Uninstall() { vimo::comm::set_collective_observer(nullptr); }
  } uninstall;
  const auto expect_reported = [&](const std::string& name, int64_t bytes, bool must_wait, auto&& call) {
    observer.entered.clear();
    call();
    EXPECT_EQ(observer.depth, 0) << name << " left a wait open";
    if (must_wait) {
      EXPECT_FALSE(observer.entered.empty()) << name << " reported no wait";
    }
    for (const auto& [entered_name, entered_bytes] : observer.entered) {
      EXPECT_EQ(entered_name, name);
      EXPECT_EQ(entered_bytes, bytes) << name;
    }
  };
  at::Tensor four = at::ones({4}, device_options());                 // [4], 16 bytes
  at::Tensor rows = at::ones({2, 3}, device_options());              // [2, 3], 24 bytes
  at::Tensor all_rows = at::ones({2 * ranks, 3}, device_options());  // [ranks * 2, 3]
  at::Tensor shard = at::empty({2, 3}, device_options());
  const bool waits = vimo::testing::backend_under_test() != "nccl";  // must a blocking call wait?
  expect_reported("allreduce", 16, waits, [&] { world()->allreduce(four, ReduceOp::Avg); });
  expect_reported("allreduce", 16, true, [&] { world()->allreduce_async(four, ReduceOp::Sum)->wait(); });
  expect_reported("allgather", 24, waits, [&] { world()->allgather(rows); });
  expect_reported("allgather", 24, waits, [&] { world()->allgather_into(rows, all_rows); });
  expect_reported("reduce_scatter", 24 * ranks, waits,
                  [&] { world()->reduce_scatter(all_rows, ReduceOp::Sum); });
  expect_reported("reduce_scatter", 24 * ranks, waits,
                  [&] { world()->reduce_scatter_into(all_rows, shard, ReduceOp::Max); });
  expect_reported("broadcast", 16, waits, [&] { world()->broadcast(four, 0); });
  expect_reported("barrier", 0, true, [&] { world()->barrier(); });
  if (ranks > 1 && rank == 0) expect_reported("send", 16, waits, [&] { world()->send(four, 1, 7); });
  if (ranks > 1 && rank == 1) expect_reported("recv", 16, waits, [&] { world()->recv(four, 0, 7); });
  world()->barrier();
}

// Rank r's loss in the gradient tests: its rows scored against every rank's rows (mean over its rows), plus a
// term on the gathered rows weighted by r, so that each rank's loss sends a different gradient to every
// owner.
at::Tensor loss_of_rank(const at::Tensor& local, const at::Tensor& gathered, const at::Tensor& weights,
                        int r) {
  return local.matmul(gathered.t()).pow(2).sum(1).mean() + ((r + 1) * gathered * weights).tanh().sum();
}

// The gradient of Σ_r loss_r with respect to rank `rank`'s rows, by plain autograd on the whole problem
// (see Note [Gradient of the gathered negatives] in comm/communicator.cpp).
at::Tensor reference_gradient(const at::Tensor& all_rows, const at::Tensor& weights, int rank, int64_t rows) {
  const at::Tensor x = all_rows.clone().requires_grad_(true);  // [ranks * rows, D]
  at::Tensor total = at::zeros({}, x.options());
  for (int r = 0; r < world()->size(); ++r)
    total = total + loss_of_rank(x.narrow(0, r * rows, rows), x, weights, r);
  total.backward();
  return x.grad().narrow(0, rank * rows, rows);
}

TEST_F(AllGatherWithGrad, GradientIsThatOfTheSumOfAllRanksLosses) {
  const int rank = world()->rank(), ranks = world()->size();
  const int64_t rows = 3, width = 4;
  at::manual_seed(shared_seed());
  const at::Tensor all_rows = at::randn({ranks * rows, width}, at::kDouble);  // [ranks * rows, D]
  const at::Tensor weights = at::randn({ranks * rows, width}, at::kDouble);   // [ranks * rows, D]

  const at::Tensor expected = reference_gradient(all_rows, weights, rank, rows);  // [rows, D], on the CPU
  const at::Tensor weights_here = to_device(weights);

  const at::Tensor local =
      to_device(all_rows.narrow(0, rank * rows, rows)).requires_grad_(true);     // [rows, D]
  const at::Tensor gathered = vimo::comm::all_gather_with_grad(local, world());  // [ranks * rows, D]
  EXPECT_TRUE(at::equal(gathered.detach().cpu(), all_rows));
  loss_of_rank(local, gathered, weights_here, rank).backward();
  // The same float64 sums in another order (the all-reduce adds the ranks' parts its own way): agreement to
  // within a few float64 roundings of numbers of size ~10 to 100.
  EXPECT_TRUE(at::allclose(local.grad().cpu(), expected, 1e-12, 1e-12))
      << (local.grad().cpu() - expected).abs().max().item<double>();

  // A non-contiguous input: the gradient reaches the leaf it is a view of.
  const at::Tensor leaf =
      to_device(all_rows.narrow(0, rank * rows, rows).t().contiguous()).requires_grad_(true);  // [D, rows]
  const at::Tensor transposed_view = leaf.t();                                                 // [rows, D]
  loss_of_rank(transposed_view, vimo::comm::all_gather_with_grad(transposed_view, world()), weights_here,
               rank)
      .backward();
  EXPECT_TRUE(at::allclose(leaf.grad().t().cpu(), expected, 1e-12, 1e-12));
}

TEST_F(AllGatherWithGrad, ZeroRowsOnEveryRank) {
  const at::Tensor local = at::zeros({0, 4}, device_options(at::kDouble)).requires_grad_(true);
  const at::Tensor gathered = vimo::comm::all_gather_with_grad(local, world());
  EXPECT_EQ(gathered.sizes(), at::IntArrayRef({0, 4}));
  (gathered.sum() + local.sum()).backward();
  ASSERT_TRUE(local.grad().defined());
  EXPECT_EQ(local.grad().sizes(), at::IntArrayRef({0, 4}));
}

}  // namespace
