// reduce_scatter, send/recv, asynchronous Works and timeouts under mpirun, on the backend
// VIMO_TEST_COMM_BACKEND names (MPI by default, TCP, or NCCL on CUDA tensors:
// tests/comm/collective_reference.h): reduce_scatter and send/recv against plain LibTorch on all ranks'
// inputs (rebuilt on each rank from a shared fresh seed), asynchronous Works (several in flight at once,
// waited in any order), and timeouts: a collective that only some ranks enter fails on those ranks after the
// timeout with an error naming the call, instead of hanging.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <memory>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "tests/comm/collective_reference.h"

namespace {
using vimo::comm::ReduceOp;
using vimo::comm::Work;
using vimo::testing::accumulation_of;
using vimo::testing::all_inputs;
using vimo::testing::device_options;
using vimo::testing::dtype_name;
using vimo::testing::error_of;
using vimo::testing::expect_reduced;
using vimo::testing::expect_still_usable;
using vimo::testing::kNoAgreement;
using vimo::testing::kNoMessageSizes;
using vimo::testing::kOnlyEnqueued;
using vimo::testing::reduce_case_name;
using vimo::testing::reduce_cases;
using vimo::testing::ReduceCase;
using vimo::testing::shared_seed;
using vimo::testing::to_device;
using vimo::testing::world;

// The fixtures of this file's tests: each skips, saying why, where the backend under test cannot run.
class ReduceScatterErrors : public vimo::testing::BackendTest {};
class SendRecvErrors : public vimo::testing::BackendTest {};
class AsyncWork : public vimo::testing::BackendTest {};
class IntoCalls : public vimo::testing::BackendTest {};
class CollectiveTimeout : public vimo::testing::BackendTest {};

class ReduceScatter : public vimo::testing::BackendTestWithParam<ReduceCase> {};

TEST_P(ReduceScatter, EachRankGetsTheReductionOfItsRows) {
  const auto [dtype, op] = GetParam();
  const int rank = world()->rank(), ranks = world()->size();
  const int64_t rows = 2;
  const at::Tensor inputs =
      all_inputs(dtype, shared_seed(), ranks, {ranks * rows, 3});             // [ranks, ranks*2, 3]
  const at::Tensor my_rows_everywhere = inputs.narrow(1, rank * rows, rows);  // [ranks, 2, 3]

  const at::Tensor mine = to_device(inputs[rank]);  // [ranks*2, 3]

  const at::Tensor got = world()->reduce_scatter(mine, op);  // [2, 3]
  expect_reduced(got, my_rows_everywhere, op, accumulation_of(dtype), "blocking");

  at::Tensor output = at::empty({rows, 3}, device_options(dtype));  // [2, 3]
  world()->reduce_scatter_async(mine, output, op)->wait();
  expect_reduced(output, my_rows_everywhere, op, accumulation_of(dtype), "async");

  at::Tensor into = at::empty({rows, 3}, device_options(dtype));  // [2, 3]
  world()->reduce_scatter_into(mine, into, op);
  expect_reduced(into, my_rows_everywhere, op, accumulation_of(dtype), "blocking into");

  const at::Tensor storage = to_device(inputs[rank].t().contiguous());  // [3, ranks*2]
  const at::Tensor view = storage.t();                                  // [ranks*2, 3], not contiguous
  ASSERT_FALSE(view.is_contiguous());
  expect_reduced(world()->reduce_scatter(view, op), my_rows_everywhere, op, accumulation_of(dtype),
                 "transposed input");
}

INSTANTIATE_TEST_SUITE_P(DtypesAndOps, ReduceScatter, ::testing::ValuesIn(reduce_cases()), reduce_case_name);

TEST_F(ReduceScatterErrors, UndivisibleRowsFailOnEveryRank) {
  SKIP_WITHOUT_A_SECOND_RANK();  // one rank divides every row count
  const int ranks = world()->size();
  const at::Tensor input = at::zeros({ranks + 1, 2}, device_options());
  const std::string message = error_of([&] { world()->reduce_scatter(input, ReduceOp::Sum); });
  EXPECT_CONTAINS(message, "reduce_scatter splits dim 0 of float32 [" + std::to_string(ranks + 1) +
                               ", 2] among " + std::to_string(ranks) + " ranks");
  EXPECT_CONTAINS(message, "HINT:");
  const std::string average = error_of(
      [&] { world()->reduce_scatter(at::zeros({ranks}, device_options(at::kLong)), ReduceOp::Avg); });
  EXPECT_CONTAINS(average, "reduce_scatter (avg) of int64 tensors is not supported");
  expect_still_usable(*world());
}

TEST_F(ReduceScatterErrors, ZeroRowsPerRank) {
  const at::Tensor got =
      world()->reduce_scatter(at::zeros({0, 4}, device_options(at::kDouble)), ReduceOp::Sum);
  EXPECT_EQ(got.sizes(), at::IntArrayRef({0, 4}));
}

class SendRecv : public vimo::testing::BackendTestWithParam<at::ScalarType> {};

// Every rank sends to the next and receives from the previous. Even ranks send first and odd ranks receive
// first, so the ring completes even for messages too large to be buffered (1.2 MB or more here).
TEST_P(SendRecv, RingMovesEveryTensorBitForBit) {
  SKIP_WITHOUT_A_SECOND_RANK();
  const at::ScalarType dtype = GetParam();
  const int rank = world()->rank(), ranks = world()->size();
  const int next = (rank + 1) % ranks, previous = (rank + ranks - 1) % ranks;
  const uint64_t seed = shared_seed();
  const at::Tensor inputs = all_inputs(dtype, seed, ranks, {300'000});  // [ranks, 300000]
  const at::Tensor mine = to_device(inputs[rank]);
  at::Tensor received = at::zeros({300'000}, device_options(dtype));
  const int tag = 7;
  if (rank % 2 == 0) {
    world()->send(mine, next, tag);
    world()->recv(received, previous, tag);
  } else {
    world()->recv(received, previous, tag);
    world()->send(mine, next, tag);
  }
  EXPECT_TRUE(at::equal(received.cpu(), inputs[previous]));

  // A strided sender and a strided receiver: the message is the tensor's elements in logical order.
  const at::Tensor matrices = all_inputs(dtype, seed + 1, ranks, {4, 3});     // [ranks, 4, 3]
  const at::Tensor strided = to_device(matrices[rank].t().contiguous()).t();  // [4, 3], not contiguous
  at::Tensor storage = at::zeros({3, 4}, device_options(dtype));
  at::Tensor target = storage.t();  // [4, 3], not contiguous
  if (rank % 2 == 0) {
    world()->send(strided, next, tag + 1);
    world()->recv(target, previous, tag + 1);
  } else {
    world()->recv(target, previous, tag + 1);
    world()->send(strided, next, tag + 1);
  }
  EXPECT_TRUE(at::equal(storage.t().cpu(), matrices[previous]));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, SendRecv,
                         ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kLong),
                         [](const ::testing::TestParamInfo<at::ScalarType>& info) {
                           return dtype_name(info.param);
                         });

TEST_F(SendRecvErrors, WrongSizeIsNamedAndTheSenderIsReleased) {
  SKIP_ON_NCCL(kNoMessageSizes);
  SKIP_WITHOUT_A_SECOND_RANK();
  const int rank = world()->rank();
  if (rank == 0) {
    world()->send(at::ones({4}), 1,
                  3);  // returns: the receiver takes the message even though it rejects it
  } else if (rank == 1) {
    at::Tensor five = at::zeros({5});
    const std::string message = error_of([&] { world()->recv(five, 0, 3); });
    EXPECT_CONTAINS(message, "[rank 1] recv of float32 [5] from rank 0 (tag 3): the message held 16 bytes");
    EXPECT_CONTAINS(message, "HINT:");
  }
  expect_still_usable(*world());
}

TEST_F(SendRecvErrors, BadPeersAndTagsAreRejectedLocally) {
  const int rank = world()->rank(), ranks = world()->size();
  at::Tensor t = at::zeros({2}, device_options());
  EXPECT_CONTAINS(error_of([&] { world()->send(t, rank, 0); }), "which is this rank");
  EXPECT_CONTAINS(error_of([&] { world()->recv(t, ranks, 0); }), "but the ranks are 0..");
  if (ranks > 1) {
    EXPECT_CONTAINS(error_of([&] { world()->send(t, (rank + 1) % ranks, -1); }), "tags must be in 0..");
  }
  expect_still_usable(*world());
}

class AllreduceAsync : public vimo::testing::BackendTestWithParam<ReduceCase> {};

TEST_P(AllreduceAsync, MatchesLibTorchOnAllInputs) {
  const auto [dtype, op] = GetParam();
  const int rank = world()->rank(), ranks = world()->size();
  const at::Tensor inputs = all_inputs(dtype, shared_seed(), ranks, {5, 7});  // [ranks, 5, 7]
  at::Tensor mine = to_device(inputs[rank]);
  std::shared_ptr<Work> work = world()->allreduce_async(mine, op);
  work->wait();
  EXPECT_TRUE(work->is_completed());
  expect_reduced(mine, inputs, op, accumulation_of(dtype), "contiguous");

  at::Tensor storage = to_device(inputs[rank].t().contiguous());  // [7, 5]
  at::Tensor view = storage.t();                                  // [5, 7], not contiguous
  world()->allreduce_async(view, op)->wait();
  EXPECT_TRUE(at::equal(storage.t().cpu(), mine.cpu())) << "the view's result must land in its storage";
}

INSTANTIATE_TEST_SUITE_P(DtypesAndOps, AllreduceAsync, ::testing::ValuesIn(reduce_cases()), reduce_case_name);

TEST_F(AsyncWork, SeveralInFlightFinishInAnyOrder) {
  const int rank = world()->rank(), ranks = world()->size();
  const uint64_t seed = shared_seed();
  const at::Tensor floats = all_inputs(at::kFloat, seed, ranks, {1000});             // [ranks, 1000]
  const at::Tensor halves = all_inputs(at::kBFloat16, seed + 1, ranks, {37});        // [ranks, 37]
  const at::Tensor longs = all_inputs(at::kLong, seed + 2, ranks, {3, 2});           // [ranks, 3, 2]
  const at::Tensor doubles = all_inputs(at::kDouble, seed + 3, ranks, {ranks * 4});  // [ranks, ranks*4]

  at::Tensor a = to_device(floats[rank]), b = to_device(halves[rank]);
  const at::Tensor my_longs = to_device(longs[rank]), my_doubles = to_device(doubles[rank]);
  at::Tensor gathered = at::empty({ranks * 3, 2}, device_options(at::kLong));  // [ranks*3, 2]
  at::Tensor scattered = at::empty({4}, device_options(at::kDouble));          // [4]
  std::vector<at::Tensor> buckets;  // 12 more in flight: [ranks, 64] inputs each
  std::vector<at::Tensor> bucket_inputs;
  std::shared_ptr<Work> work_a = world()->allreduce_async(a, ReduceOp::Sum);
  std::shared_ptr<Work> work_b = world()->allreduce_async(b, ReduceOp::Max);
  std::shared_ptr<Work> work_c = world()->allgather_async(my_longs, gathered);
  std::shared_ptr<Work> work_d = world()->reduce_scatter_async(my_doubles, scattered, ReduceOp::Avg);
  std::vector<std::shared_ptr<Work>> bucket_works;
  for (int i = 0; i < 12; ++i) {
    bucket_inputs.push_back(all_inputs(at::kDouble, seed + 10 + i, ranks, {64}));
    buckets.push_back(to_device(bucket_inputs.back()[rank]));
    bucket_works.push_back(world()->allreduce_async(buckets.back(), ReduceOp::Avg));
  }
  EXPECT_EQ(work_a->description(), "allreduce (sum) of float32 [1000]");
  EXPECT_EQ(work_d->description(), "reduce_scatter (avg) of float64 [" + std::to_string(ranks * 4) + "]");

  // The first one by polling (each poll drives MPI; on NCCL it queries the event), the rest waited for in
  // reverse order of launch.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!work_a->is_completed()) ASSERT_LT(std::chrono::steady_clock::now(), give_up) << "never completed";
  for (int i = 11; i >= 0; --i) bucket_works[i]->wait();
  work_d->wait();
  work_c->wait();
  work_b->wait();
  work_a->wait();  // again: a no-op
  expect_reduced(a, floats, ReduceOp::Sum, at::kFloat, "a");
  expect_reduced(b, halves, ReduceOp::Max, at::kFloat, "b");
  EXPECT_TRUE(at::equal(gathered.cpu(), longs.reshape({ranks * 3, 2})));
  expect_reduced(scattered, doubles.narrow(1, rank * 4, 4), ReduceOp::Avg, at::kDouble, "d");
  for (int i = 0; i < 12; ++i) {
    expect_reduced(buckets[i], bucket_inputs[i], ReduceOp::Avg, at::kDouble, "bucket " + std::to_string(i));
  }
}

TEST_F(AsyncWork, BadOutputIsRejectedOnThisRank) {
  const int ranks = world()->size();
  const std::string device = vimo::testing::device_under_test().str();
  at::Tensor wrong = at::empty({ranks * 3 + 1, 2}, device_options());
  EXPECT_CONTAINS(error_of([&] {
                    world()->allgather_async(at::zeros({3, 2}, device_options()), wrong);
                  }),
                  "allgather of float32 [3, 2] needs a contiguous " + device + " output of float32 [" +
                      std::to_string(ranks * 3) + ", 2]");
  at::Tensor doubles = at::empty({2}, device_options(at::kDouble));
  EXPECT_CONTAINS(error_of([&] {
                    world()->reduce_scatter_async(at::zeros({ranks * 2}, device_options()), doubles,
                                                  ReduceOp::Sum);
                  }),
                  "needs a contiguous " + device + " output of float32 [2]");
  expect_still_usable(*world());
}

// allgather_into moves bits, so it must equal the allocating call exactly, for every dtype.
TEST_F(IntoCalls, AllgatherIntoEqualsAllgather) {
  const int rank = world()->rank(), ranks = world()->size();
  for (at::ScalarType dtype :
       {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kLong, at::kInt, at::kByte}) {
    const at::Tensor inputs = all_inputs(dtype, shared_seed(), ranks, {3, 5});  // [ranks, 3, 5]
    at::Tensor output = at::full({ranks * 3, 5}, 7, device_options(dtype));     // [ranks*3, 5]
    world()->allgather_into(to_device(inputs[rank]), output);
    EXPECT_TRUE(at::equal(output.cpu(), inputs.reshape({ranks * 3, 5}))) << dtype_name(dtype);
  }
}

// The blocking *_into calls agree on the call first, so one rank's bad output fails every rank (instead of
// leaving the others in the collective), and the communicator stays usable.
TEST_F(IntoCalls, OneRanksBadOutputFailsEveryRank) {
  SKIP_ON_NCCL(kNoAgreement);
  const int rank = world()->rank(), ranks = world()->size();
  at::Tensor output = at::empty({rank == 0 ? ranks * 3 + 1 : ranks * 3, 2});
  const std::string gather = error_of([&] { world()->allgather_into(at::zeros({3, 2}), output); });
  if (rank == 0) {
    EXPECT_CONTAINS(gather,
                    "needs a contiguous cpu output of float32 [" + std::to_string(ranks * 3) + ", 2]");
  } else {
    EXPECT_CONTAINS(gather, "rank(s) 0 rejected their input");
  }
  at::Tensor shard = at::empty({rank == ranks - 1 ? 3 : 2}, at::kFloat);
  const std::string scatter =
      error_of([&] { world()->reduce_scatter_into(at::zeros({ranks * 2}), shard, ReduceOp::Sum); });
  EXPECT_NE(scatter, "(nothing thrown)");
  if (rank == ranks - 1) {
    EXPECT_CONTAINS(scatter, "needs a contiguous cpu output of float32 [2]");
  }
  expect_still_usable(*world());
}

TEST_F(AsyncWork, DroppedWorkStillCompletes) {
  const int rank = world()->rank(), ranks = world()->size();
  const at::Tensor inputs = all_inputs(at::kDouble, shared_seed(), ranks, {16});
  at::Tensor mine = to_device(inputs[rank]);
  { world()->allreduce_async(mine, ReduceOp::Sum); }  // the Work's destructor waits for it
  expect_reduced(mine, inputs, ReduceOp::Sum, at::kDouble, "dropped");
}

TEST_F(CollectiveTimeout, DefaultComesFromTheEnvironment) {
  if (std::getenv("VIMO_COMM_TIMEOUT_S") == nullptr) {
    EXPECT_EQ(vimo::comm::default_collective_timeout(), std::chrono::seconds(600));
    EXPECT_EQ(world()->timeout(), std::chrono::seconds(600));
  }
  auto dedicated = world()->split(0, world()->rank());  // of the backend under test
  EXPECT_THROW(dedicated->set_timeout(std::chrono::milliseconds(0)), std::invalid_argument);
  dedicated->set_timeout(std::chrono::milliseconds(1500));
  EXPECT_EQ(dedicated->split(0, dedicated->rank())->timeout(), std::chrono::milliseconds(1500))
      << "a split starts with its parent's timeout";
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Only rank 0 enters the collective. It must fail there after the 1 s timeout, naming the call, its size and
// the rank, and the communicator must refuse further calls; the other ranks never touch it. Each case uses a
// communicator of its own (split by every rank from the world), so the world stays usable.
TEST_F(CollectiveTimeout, BlockingCallThatOnlyOneRankMakesFailsNamingIt) {
  SKIP_WITHOUT_A_SECOND_RANK();  // alone, rank 0 completes the call
  SKIP_ON_NCCL(kOnlyEnqueued);
  auto dedicated = world()->split(0, world()->rank());  // of the backend under test
  dedicated->set_timeout(std::chrono::seconds(1));
  if (dedicated->rank() == 0) {
    at::Tensor x = at::ones({4});
    const auto start = std::chrono::steady_clock::now();
    const std::string message = error_of([&] { dedicated->allreduce(x, ReduceOp::Sum); });
    const double waited = seconds_since(start);
    EXPECT_CONTAINS(message,
                    "[rank 0] allreduce (sum) of float32 [4] (16 bytes) timed out after 1 s on a "
                    "communicator of " +
                        std::to_string(dedicated->size()) + " ranks");
    EXPECT_CONTAINS(message, "HINT:");
    EXPECT_GE(waited, 1.0);
    EXPECT_LT(waited, 30.0);
    EXPECT_CONTAINS(error_of([&] { dedicated->barrier(); }),
                    "[rank 0] barrier refused: this communicator is unusable");
  }
  world()->barrier();
}

// On NCCL the timeout aborts rank 0's communicator, and the others keep theirs to the end of the process:
// NCCL destroys and aborts a communicator together with the other ranks of its node, so theirs must not be
// destroyed alone while rank 0's is aborted. Every rank first makes one call on it together, so that NCCL's
// lazy connection set-up (it waits for the peers) is behind them, and rank 0's lone call fails in its wait
// rather than in its enqueue.
TEST_F(CollectiveTimeout, AsyncWaitThatOnlyOneRankStartedFailsNamingIt) {
  SKIP_WITHOUT_A_SECOND_RANK();                         // alone, rank 0 completes the call
  auto dedicated = world()->split(0, world()->rank());  // of the backend under test
  at::Tensor together = at::ones({3}, device_options(at::kDouble));
  dedicated->allreduce_async(together, ReduceOp::Avg)->wait();
  dedicated->set_timeout(std::chrono::seconds(1));
  if (vimo::testing::backend_under_test() == "nccl" && dedicated->rank() != 0) {
    static auto* kept = new std::vector<std::shared_ptr<vimo::comm::Communicator>>();  // never destroyed
    kept->push_back(dedicated);
  }
  if (dedicated->rank() == 0) {
    at::Tensor x = at::ones({3}, device_options(at::kDouble));
    std::shared_ptr<Work> work;
    const auto start = std::chrono::steady_clock::now();
    const std::string message = error_of([&] {
      // With VIMO_COMM_CHECK_ASYNC=1 the launch itself agrees on the call, and times out there instead.
      work = dedicated->allreduce_async(x, ReduceOp::Avg);
      EXPECT_FALSE(work->is_completed());
      work->wait();
    });
    EXPECT_CONTAINS(message, "[rank 0] allreduce (avg) of float64 [3] (24 bytes) timed out after 1 s");
    EXPECT_GE(seconds_since(start), 1.0);
    if (work) {
      EXPECT_CONTAINS(error_of([&] { work->wait(); }), "refused: this communicator is unusable");
    }
  }
  world()->barrier();
}

TEST_F(CollectiveTimeout, RecvWithoutASenderTimesOutAndLeavesTheCommunicatorUsable) {
  SKIP_ON_NCCL(kOnlyEnqueued);
  SKIP_WITHOUT_A_SECOND_RANK();
  auto dedicated = world()->split(0, world()->rank());  // of the backend under test
  dedicated->set_timeout(std::chrono::seconds(1));
  if (dedicated->rank() == 0) {
    at::Tensor x = at::zeros({2});
    EXPECT_CONTAINS(error_of([&] { dedicated->recv(x, 1, 99); }),
                    "[rank 0] recv of float32 [2] from rank 1 (tag 99) (8 bytes) timed out after 1 s");
  }
  world()->barrier();  // the others wait here, not in the check below, which has the short timeout
  expect_still_usable(*dedicated);
}

}  // namespace
