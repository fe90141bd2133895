// The MPI backend under mpirun (2 and 4 ranks): every collective against plain LibTorch on all ranks' inputs
// (rebuilt on each rank from a shared fresh seed), mismatched calls failing on every rank instead of hanging,
// and all_gather_with_grad's gradient against plain autograd on the whole problem in float64.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <ostream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "tests/comm/collective_reference.h"

namespace {
using vimo::comm::ReduceOp;
using vimo::testing::all_inputs;
using vimo::testing::dtype_name;
using vimo::testing::error_of;
using vimo::testing::expect_still_usable;
using vimo::testing::mpi_world;
using vimo::testing::now_ns;
using vimo::testing::op_name;
using vimo::testing::shared_seed;

TEST(MpiCommunicator, DescribesItself) {
  EXPECT_EQ(mpi_world()->backend_name(), vimo::testing::backend_under_test());
  int rank = -1, size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_EQ(mpi_world()->rank(), rank);
  EXPECT_EQ(mpi_world()->size(), size);
  const vimo::comm::WorldInfo world = vimo::comm::world_from_environment();
  EXPECT_EQ(world.launcher, "openmpi");
  EXPECT_EQ(world.rank, rank);
  EXPECT_EQ(world.world_size, size);
  const std::string version = vimo::comm::mpi_library_version();
  EXPECT_FALSE(version.empty());
  EXPECT_EQ(version.find('\n'), std::string::npos) << version;
  EXPECT_EQ(version.find(','), std::string::npos) << version;
}

struct ReduceCase {
  at::ScalarType dtype;
  ReduceOp op;
};
void PrintTo(const ReduceCase& c, std::ostream* out) { *out << dtype_name(c.dtype) << " " << op_name(c.op); }

class MpiAllreduce : public ::testing::TestWithParam<ReduceCase> {};

TEST_P(MpiAllreduce, MatchesLibTorchOnAllInputs) {
  const auto [dtype, op] = GetParam();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const at::Tensor inputs = all_inputs(dtype, shared_seed(), ranks, {5, 7});  // [ranks, 5, 7]
  // Half types are added in float32 (Note [Half types over MPI]); the others in their own type.
  const at::ScalarType accumulation = dtype == at::kBFloat16 || dtype == at::kHalf ? at::kFloat : dtype;

  at::Tensor mine = inputs[rank].clone();  // [5, 7]
  mpi_world()->allreduce(mine, op);
  vimo::testing::expect_reduced(mine, inputs, op, accumulation, "contiguous");

  // A transposed view: reduced through a contiguous copy and written back into the view's storage.
  at::Tensor storage = inputs[rank].t().contiguous();  // [7, 5]
  at::Tensor view = storage.t();                       // [5, 7], not contiguous
  mpi_world()->allreduce(view, op);
  vimo::testing::expect_reduced(view, inputs, op, accumulation, "transposed view");
  EXPECT_TRUE(at::equal(storage.t(), mine)) << "the view's result must land in its storage";
}

std::vector<ReduceCase> reduce_cases() {
  std::vector<ReduceCase> cases;
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min})
      cases.push_back({dtype, op});
  }
  for (at::ScalarType dtype : {at::kLong, at::kInt, at::kByte}) {  // integer Avg is rejected (below)
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min}) cases.push_back({dtype, op});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(DtypesAndOps, MpiAllreduce, ::testing::ValuesIn(reduce_cases()),
                         [](const ::testing::TestParamInfo<ReduceCase>& info) {
                           return dtype_name(info.param.dtype) + "_" + op_name(info.param.op);
                         });

TEST(MpiAllreduceErrors, IntegerAverageIsRejectedOnEveryRank) {
  at::Tensor counts = at::arange(4, at::kLong);
  const std::string message = error_of([&] { mpi_world()->allreduce(counts, ReduceOp::Avg); });
  EXPECT_CONTAINS(message, "[rank " + std::to_string(mpi_world()->rank()) + "] allreduce (avg) of int64");
  EXPECT_CONTAINS(message, "HINT:");
  EXPECT_TRUE(at::equal(counts, at::arange(4, at::kLong))) << "a rejected call must leave the tensor alone";
  expect_still_usable();
}

class MpiAllgather : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(MpiAllgather, ConcatenatesEveryRanksRowsBitForBit) {
  const at::ScalarType dtype = GetParam();
  const int rank = mpi_world()->rank();
  const int64_t ranks = mpi_world()->size();
  const uint64_t seed = shared_seed();

  const at::Tensor rows = all_inputs(dtype, seed, ranks, {3, 4});  // [ranks, 3, 4]
  const at::Tensor gathered = mpi_world()->allgather(rows[rank]);  // [ranks * 3, 4]
  EXPECT_TRUE(at::equal(gathered, rows.reshape({ranks * 3, 4})));

  const at::Tensor cubes = all_inputs(dtype, seed + 1, ranks, {2, 3, 2});  // [ranks, 2, 3, 2]
  EXPECT_TRUE(at::equal(mpi_world()->allgather(cubes[rank]), cubes.reshape({ranks * 2, 3, 2})));

  const at::Tensor transposed = rows[rank].t();  // [4, 3], not contiguous
  ASSERT_FALSE(transposed.is_contiguous());
  EXPECT_TRUE(at::equal(mpi_world()->allgather(transposed), rows.transpose(1, 2).reshape({ranks * 4, 3})));

  const at::Tensor none = at::empty({0, 4}, rows.options());  // every rank contributes zero rows
  const at::Tensor gathered_none = mpi_world()->allgather(none);
  EXPECT_EQ(gathered_none.sizes(), at::IntArrayRef({0, 4}));
  EXPECT_EQ(gathered_none.scalar_type(), dtype);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MpiAllgather,
                         ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kLong,
                                           at::kInt, at::kByte),
                         [](const ::testing::TestParamInfo<at::ScalarType>& info) {
                           return dtype_name(info.param);
                         });

TEST(MpiAllgatherErrors, DifferentShapesFailOnEveryRankNamingEachShape) {
  const int rank = mpi_world()->rank();
  const at::Tensor mine = at::zeros({rank + 1, 4});  // rank r has r + 1 rows
  const std::string message = error_of([&] { mpi_world()->allgather(mine); });
  EXPECT_CONTAINS(message, "[rank " + std::to_string(rank) + "] the ranks made different calls");
  for (int r = 0; r < mpi_world()->size(); ++r) {
    EXPECT_CONTAINS(
        message, "rank " + std::to_string(r) + ": allgather of float32 [" + std::to_string(r + 1) + ", 4]");
  }
  EXPECT_CONTAINS(message, "HINT:");
  expect_still_usable();
}

TEST(MpiAllgatherErrors, DifferentDtypesFailOnEveryRank) {
  const at::Tensor mine = at::zeros({2, 4}, mpi_world()->rank() == 0 ? at::kDouble : at::kFloat);
  const std::string message = error_of([&] { mpi_world()->allgather(mine); });
  EXPECT_CONTAINS(message, "rank 0: allgather of float64 [2, 4]");
  EXPECT_CONTAINS(message, "rank 1: allgather of float32 [2, 4]");
  expect_still_usable();
}

TEST(MpiAllgatherErrors, OneRankRejectingItsInputStopsAllRanks) {
  const int rank = mpi_world()->rank(), last = mpi_world()->size() - 1;
  // The last rank passes a 0-dim tensor, which allgather cannot stack along dim 0; the others a valid one.
  const at::Tensor mine = rank == last ? at::zeros({}) : at::zeros({2, 4});
  const std::string message = error_of([&] { mpi_world()->allgather(mine); });
  if (rank == last) {
    EXPECT_CONTAINS(message,
                    "[rank " + std::to_string(last) + "] allgather gathers along dim 0 but got a 0-dim");
  } else {
    EXPECT_CONTAINS(message,
                    "abandoned on every rank: rank(s) " + std::to_string(last) + " rejected their input");
  }
  expect_still_usable();
}

TEST(MpiAllgatherErrors, UnsupportedDtypeOnOneRankStopsAllRanks) {
  const bool odd_one = mpi_world()->rank() == 0;
  const at::Tensor mine = at::zeros({2}, odd_one ? at::kBool : at::kFloat);
  const std::string message = error_of([&] { mpi_world()->allgather(mine); });
  const std::string backend = vimo::testing::backend_under_test() == "tcp" ? "TCP" : "MPI";
  EXPECT_CONTAINS(message,
                  odd_one ? "allgather got a bool tensor, which the " + backend + " backend does not support"
                          : "rank(s) 0 rejected their input");
  expect_still_usable();
}

class MpiBroadcast : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(MpiBroadcast, EveryRankEndsWithTheRootsTensor) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const at::Tensor inputs = all_inputs(GetParam(), shared_seed(), ranks, {3, 5});  // [ranks, 3, 5]
  for (int root = 0; root < ranks; ++root) {
    at::Tensor mine = inputs[rank].clone();
    mpi_world()->broadcast(mine, root);
    EXPECT_TRUE(at::equal(mine, inputs[root])) << "root " << root;

    at::Tensor storage = inputs[rank].t().contiguous();  // [5, 3]
    at::Tensor view = storage.t();                       // [3, 5], not contiguous
    mpi_world()->broadcast(view, root);
    EXPECT_TRUE(at::equal(storage, inputs[root].t())) << "root " << root << ", transposed view";
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MpiBroadcast,
                         ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16, at::kLong),
                         [](const ::testing::TestParamInfo<at::ScalarType>& info) {
                           return dtype_name(info.param);
                         });

TEST(MpiBroadcastErrors, RootOutsideTheWorldFailsOnEveryRank) {
  const int ranks = mpi_world()->size();
  for (int root : {ranks, -1}) {
    at::Tensor mine = at::zeros({3});
    const std::string message = error_of([&] { mpi_world()->broadcast(mine, root); });
    EXPECT_CONTAINS(message, "broadcast from rank " + std::to_string(root) + ", but the ranks are 0.." +
                                 std::to_string(ranks - 1));
  }
  expect_still_usable();
}

TEST(MpiCollectiveErrors, DifferentCollectivesFailTogether) {
  // Rank 0 enters a barrier while the others broadcast: MPI alone would pair these up and misbehave.
  at::Tensor mine = at::zeros({3});
  const std::string message = error_of([&] {
    if (mpi_world()->rank() == 0) {
      mpi_world()->barrier();
    } else {
      mpi_world()->broadcast(mine, 0);
    }
  });
  EXPECT_CONTAINS(message, "rank 0: barrier; rank 1: broadcast from rank 0 of float32 [3]");
  expect_still_usable();
}

TEST(MpiBarrier, NoRankLeavesBeforeEveryRankHasArrived) {
  const vimo::comm::WorldInfo world = vimo::comm::world_from_environment();
  if (world.local_size != world.world_size) {
    GTEST_SKIP() << "the check compares clock readings across ranks, so it needs them all on one host";
  }
  const int rank = mpi_world()->rank(), last = mpi_world()->size() - 1;
  mpi_world()->barrier();
  // Make the last rank arrive clearly late, so that a barrier that lets ranks through early would be caught.
  if (rank == last) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const int64_t arrived = now_ns();
  mpi_world()->barrier();
  const int64_t left = now_ns();
  const at::Tensor times =
      mpi_world()->allgather(at::tensor({arrived, left}, at::kLong).unsqueeze(0));  // [ranks, 2]
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
// payload size, enter and leave in pairs, and the agreement's wait counts as the call's.
TEST(MpiObserver, EveryWaitIsReportedWithTheCallsNameAndSize) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  RecordingObserver observer;
  vimo::comm::set_collective_observer(&observer);
  struct Uninstall {  // also when a call throws: later tests must not report into a destroyed observer
    ~Uninstall() { vimo::comm::set_collective_observer(nullptr); }
  } uninstall;
  const auto expect_reported = [&](const std::string& name, int64_t bytes, auto&& call) {
    observer.entered.clear();
    call();
    EXPECT_EQ(observer.depth, 0) << name << " left a wait open";
    ASSERT_FALSE(observer.entered.empty()) << name << " reported no wait";
    for (const auto& [entered_name, entered_bytes] : observer.entered) {
      EXPECT_EQ(entered_name, name);
      EXPECT_EQ(entered_bytes, bytes) << name;
    }
  };
  at::Tensor four = at::ones({4});                 // [4], 16 bytes
  at::Tensor rows = at::ones({2, 3});              // [2, 3], 24 bytes
  at::Tensor all_rows = at::ones({2 * ranks, 3});  // [ranks * 2, 3]
  at::Tensor shard = at::empty({2, 3});
  expect_reported("allreduce", 16, [&] { mpi_world()->allreduce(four, ReduceOp::Avg); });
  expect_reported("allreduce", 16, [&] { mpi_world()->allreduce_async(four, ReduceOp::Sum)->wait(); });
  expect_reported("allgather", 24, [&] { mpi_world()->allgather(rows); });
  expect_reported("allgather", 24, [&] { mpi_world()->allgather_into(rows, all_rows); });
  expect_reported("reduce_scatter", 24 * ranks,
                  [&] { mpi_world()->reduce_scatter(all_rows, ReduceOp::Sum); });
  expect_reported("reduce_scatter", 24 * ranks,
                  [&] { mpi_world()->reduce_scatter_into(all_rows, shard, ReduceOp::Max); });
  expect_reported("broadcast", 16, [&] { mpi_world()->broadcast(four, 0); });
  expect_reported("barrier", 0, [&] { mpi_world()->barrier(); });
  if (rank == 0) expect_reported("send", 16, [&] { mpi_world()->send(four, 1, 7); });
  if (rank == 1) expect_reported("recv", 16, [&] { mpi_world()->recv(four, 0, 7); });
  mpi_world()->barrier();
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
  for (int r = 0; r < mpi_world()->size(); ++r)
    total = total + loss_of_rank(x.narrow(0, r * rows, rows), x, weights, r);
  total.backward();
  return x.grad().narrow(0, rank * rows, rows);
}

TEST(AllGatherWithGrad, GradientIsThatOfTheSumOfAllRanksLosses) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int64_t rows = 3, width = 4;
  at::manual_seed(shared_seed());
  const at::Tensor all_rows = at::randn({ranks * rows, width}, at::kDouble);  // [ranks * rows, D]
  const at::Tensor weights = at::randn({ranks * rows, width}, at::kDouble);   // [ranks * rows, D]

  const at::Tensor local = all_rows.narrow(0, rank * rows, rows).clone().requires_grad_(true);  // [rows, D]
  const at::Tensor gathered = vimo::comm::all_gather_with_grad(local, mpi_world());  // [ranks * rows, D]
  EXPECT_TRUE(at::equal(gathered.detach(), all_rows));
  loss_of_rank(local, gathered, weights, rank).backward();
  // The same float64 sums in another order (the all-reduce adds the ranks' parts its own way): agreement to
  // within a few float64 roundings of numbers of size ~10 to 100.
  EXPECT_TRUE(at::allclose(local.grad(), reference_gradient(all_rows, weights, rank, rows), 1e-12, 1e-12))
      << (local.grad() - reference_gradient(all_rows, weights, rank, rows)).abs().max().item<double>();

  // A non-contiguous input: the gradient reaches the leaf it is a view of.
  const at::Tensor leaf =
      all_rows.narrow(0, rank * rows, rows).t().contiguous().requires_grad_(true);  // [D, rows]
  const at::Tensor transposed_view = leaf.t();                                      // [rows, D]
  loss_of_rank(transposed_view, vimo::comm::all_gather_with_grad(transposed_view, mpi_world()), weights, rank)
      .backward();
  EXPECT_TRUE(at::allclose(leaf.grad().t(), reference_gradient(all_rows, weights, rank, rows), 1e-12, 1e-12));
}

TEST(AllGatherWithGrad, ZeroRowsOnEveryRank) {
  const at::Tensor local = at::zeros({0, 4}, at::kDouble).requires_grad_(true);
  const at::Tensor gathered = vimo::comm::all_gather_with_grad(local, mpi_world());
  EXPECT_EQ(gathered.sizes(), at::IntArrayRef({0, 4}));
  (gathered.sum() + local.sum()).backward();
  ASSERT_TRUE(local.grad().defined());
  EXPECT_EQ(local.grad().sizes(), at::IntArrayRef({0, 4}));
}

}  // namespace
