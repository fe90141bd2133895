// The asynchronous broadcast, barrier, send and receive under mpirun, on the backend VIMO_TEST_COMM_BACKEND
// names (MPI by default, TCP, or NCCL on CUDA tensors: tests/comm/collective_reference.h): results against
// every rank's inputs rebuilt from a shared fresh seed, bit for bit; a barrier no rank leaves early; receives
// of one tag matched in the order started; a message of the wrong size named in the wait, with the
// communicator still usable (MPI and TCP).
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "tests/comm/collective_reference.h"

namespace {
using vimo::comm::ReduceOp;
using vimo::comm::Work;
using vimo::testing::all_inputs;
using vimo::testing::device_options;
using vimo::testing::dtype_name;
using vimo::testing::error_of;
using vimo::testing::expect_still_usable;
using vimo::testing::kNoMessageSizes;
using vimo::testing::now_ns;
using vimo::testing::shared_seed;
using vimo::testing::to_device;
using vimo::testing::world;

// The fixtures of this file's tests: each skips, saying why, where the backend under test cannot run.
class BroadcastAsyncErrors : public vimo::testing::BackendTest {};
class BarrierAsync : public vimo::testing::BackendTest {};
class StridedSendRecvAsync : public vimo::testing::BackendTest {};
class SendRecvAsyncErrors : public vimo::testing::BackendTest {};
class MixedAsync : public vimo::testing::BackendTest {};

class BroadcastAsync : public vimo::testing::BackendTestWithParam<at::ScalarType> {};

// Two broadcasts in flight from different roots, one into a strided tensor, waited in reverse order.
TEST_P(BroadcastAsync, EveryRankEndsWithTheRootsTensorBitForBit) {
  const at::ScalarType dtype = GetParam();
  const int rank = world()->rank(), ranks = world()->size();
  const uint64_t seed = shared_seed();
  const at::Tensor vectors = all_inputs(dtype, seed, ranks, {70'001});     // [ranks, 70001]
  const at::Tensor matrices = all_inputs(dtype, seed + 1, ranks, {5, 3});  // [ranks, 5, 3]
  const int first_root = static_cast<int>(seed % static_cast<uint64_t>(ranks));
  const int second_root = (first_root + 1) % ranks;

  at::Tensor vector = to_device(vectors[rank]);  // every rank starts from its own values
  at::Tensor storage = to_device(matrices[rank].t().contiguous());
  at::Tensor matrix = storage.t();  // [5, 3], not contiguous
  const std::shared_ptr<Work> first = world()->broadcast_async(vector, first_root);
  const std::shared_ptr<Work> second = world()->broadcast_async(matrix, second_root);
  second->wait();
  first->wait();
  EXPECT_TRUE(at::equal(vector.cpu(), vectors[first_root]));
  EXPECT_TRUE(at::equal(storage.t().cpu(), matrices[second_root]));
  EXPECT_CONTAINS(second->description(), "broadcast");
}

INSTANTIATE_TEST_SUITE_P(Dtypes, BroadcastAsync,
                         ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kLong,
                                           at::kInt, at::kByte),
                         [](const ::testing::TestParamInfo<at::ScalarType>& info) {
                           return dtype_name(info.param);
                         });

TEST_F(BroadcastAsyncErrors, RootOutsideTheWorldIsRejectedOnThisRank) {
  at::Tensor t = at::zeros({2}, device_options());
  EXPECT_CONTAINS(error_of([&] { world()->broadcast_async(t, world()->size()); }), "but the ranks are 0..");
  expect_still_usable(*world());
}

TEST_F(BarrierAsync, NoRankFinishesBeforeEveryRankHasStarted) {
  const vimo::comm::WorldInfo launched = vimo::comm::world_from_environment();
  if (launched.local_size != launched.world_size) {
    GTEST_SKIP() << "the check compares clock readings across ranks, so it needs them all on one host";
  }
  const int rank = world()->rank(), last = world()->size() - 1;
  world()->barrier();
  // The last rank starts clearly late, so that a barrier that lets ranks through early would be caught.
  if (rank == last) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const int64_t started = now_ns();
  const std::shared_ptr<Work> work = world()->barrier_async();
  work->wait();
  const int64_t finished = now_ns();
  const at::Tensor times = vimo::testing::mpi_world()->allgather(
      at::tensor({started, finished}, at::kLong).unsqueeze(0));  // [ranks, 2]
  const int64_t last_start = times.select(1, 0).max().item<int64_t>();
  const int64_t first_finish = times.select(1, 1).min().item<int64_t>();
  EXPECT_LE(last_start, first_finish) << "a rank's barrier finished " << (last_start - first_finish)
                                      << " ns before the last rank started its own";
}

class SendRecvAsync : public vimo::testing::BackendTestWithParam<at::ScalarType> {};

// Every rank sends three messages of one tag to the next rank and receives three from the previous one,
// all in flight at once. Even ranks start their sends first, odd ranks their receives (Note [Ordering of
// asynchronous point-to-point calls]). The receives must match the messages in the order started.
TEST_P(SendRecvAsync, ARingOfSeveralMessagesPerTagArrivesInOrder) {
  SKIP_WITHOUT_A_SECOND_RANK();
  const at::ScalarType dtype = GetParam();
  const int rank = world()->rank(), ranks = world()->size();
  const int next = (rank + 1) % ranks, previous = (rank + ranks - 1) % ranks;
  const uint64_t seed = shared_seed();
  constexpr int kMessages = 3;
  std::vector<at::Tensor> inputs;  // [ranks, 200000] per message: large enough not to be buffered
  std::vector<at::Tensor> mine;    // [200000] per message, on the device
  for (int m = 0; m < kMessages; ++m) {
    inputs.push_back(all_inputs(dtype, seed + m, ranks, {200'000}));
    mine.push_back(to_device(inputs.back()[rank]));
  }
  std::vector<at::Tensor> received(kMessages);
  for (at::Tensor& r : received) r = at::zeros({200'000}, device_options(dtype));
  const int tag = 11;

  std::vector<std::shared_ptr<Work>> works;
  const auto start_sends = [&] {
    for (int m = 0; m < kMessages; ++m) works.push_back(world()->send_async(mine[m], next, tag));
  };
  const auto start_receives = [&] {
    for (int m = 0; m < kMessages; ++m) works.push_back(world()->recv_async(received[m], previous, tag));
  };
  if (rank % 2 == 0) {
    start_sends();
    start_receives();
  } else {
    start_receives();
    start_sends();
  }
  for (auto it = works.rbegin(); it != works.rend(); ++it) (*it)->wait();
  for (int m = 0; m < kMessages; ++m) {
    EXPECT_TRUE(at::equal(received[m].cpu(), inputs[m][previous]))
        << "message " << m << " from rank " << previous;
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, SendRecvAsync,
                         ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kLong),
                         [](const ::testing::TestParamInfo<at::ScalarType>& info) {
                           return dtype_name(info.param);
                         });

// A strided receiver gets the message in its elements' logical order.
TEST_F(StridedSendRecvAsync, AStridedReceiverGetsTheMessageInLogicalOrder) {
  SKIP_WITHOUT_A_SECOND_RANK();
  const int rank = world()->rank();
  const uint64_t seed = shared_seed();  // a collective: every rank takes part before ranks 2+ leave
  if (rank > 1) return;
  const at::Tensor matrices = all_inputs(at::kFloat, seed, 2, {4, 3});  // [2, 4, 3]
  if (rank == 0) {
    world()->send_async(to_device(matrices[0].t().contiguous()).t(), 1, 5)->wait();
  } else {
    at::Tensor storage = at::zeros({3, 4}, device_options());
    at::Tensor target = storage.t();  // [4, 3], not contiguous
    world()->recv_async(target, 0, 5)->wait();
    EXPECT_TRUE(at::equal(storage.t().cpu(), matrices[0]));
  }
}

// A message longer and one shorter than the receiving tensor: each fails its wait naming the call, and
// every later wait of that Work says the same; the next message of the tag is then received intact.
TEST_F(SendRecvAsyncErrors, AMessageOfTheWrongSizeFailsTheWaitAndTheStreamGoesOn) {
  SKIP_ON_NCCL(kNoMessageSizes);
  SKIP_WITHOUT_A_SECOND_RANK();
  const int rank = world()->rank();
  if (rank == 0) {
    world()->send(at::ones({5}), 1, 3);
    world()->send(at::ones({2}), 1, 3);
    world()->send(at::arange(4, at::kFloat), 1, 3);
  } else if (rank == 1) {
    at::Tensor four = at::zeros({4});
    const std::shared_ptr<Work> longer = world()->recv_async(four, 0, 3);
    const std::string message = error_of([&] { longer->wait(); });
    EXPECT_CONTAINS(message, "[rank 1] recv of float32 [4] from rank 0 (tag 3): the message held ");
    EXPECT_CONTAINS(message, " bytes, but float32 [4] needs 16");  // MPI knows only "more than 16"
    EXPECT_CONTAINS(message, "HINT:");
    EXPECT_EQ(error_of([&] { longer->wait(); }), message);

    const std::shared_ptr<Work> shorter = world()->recv_async(four, 0, 3);
    EXPECT_CONTAINS(
        error_of([&] { shorter->wait(); }),
        "[rank 1] recv of float32 [4] from rank 0 (tag 3): the message held 8 bytes, but float32 [4] "
        "needs 16");

    world()->recv_async(four, 0, 3)->wait();
    EXPECT_TRUE(at::equal(four, at::arange(4, at::kFloat)));
  }
  expect_still_usable(*world());
}

// A message of another dtype whose bytes are not a whole number of the receiver's elements: named in bytes.
TEST_F(SendRecvAsyncErrors, AMessageOfAnotherDtypeIsNamedInBytes) {
  SKIP_ON_NCCL(kNoMessageSizes);
  SKIP_WITHOUT_A_SECOND_RANK();
  const int rank = world()->rank();
  if (rank == 0) {
    world()->send(at::ones({3}, at::kFloat), 1, 9);  // 12 bytes
  } else if (rank == 1) {
    at::Tensor two = at::zeros({2}, at::kLong);  // 16 bytes
    const std::shared_ptr<Work> work = world()->recv_async(two, 0, 9);
    EXPECT_CONTAINS(error_of([&] { work->wait(); }), "the message held 12 bytes, but int64 [2] needs 16");
  }
  expect_still_usable(*world());
}

// A receive that nothing matches times out like the blocking one: nothing arrived, so the communicator stays
// usable (on MPI the receive is cancelled), and a message sent later goes to a later receive.
TEST_F(SendRecvAsyncErrors, AReceiveThatTimesOutLeavesTheCommunicatorUsable) {
  SKIP_ON_NCCL("a receive cannot be cancelled: one that times out aborts the communicator");
  SKIP_WITHOUT_A_SECOND_RANK();
  const int rank = world()->rank();
  const std::chrono::milliseconds before = world()->timeout();
  if (rank == 1) {
    world()->set_timeout(std::chrono::milliseconds(300));
    at::Tensor t = at::zeros({2});
    const std::shared_ptr<Work> work = world()->recv_async(t, 0, 77);
    const std::string message = error_of([&] { work->wait(); });
    EXPECT_CONTAINS(message, "recv of float32 [2] from rank 0 (tag 77)");
    EXPECT_CONTAINS(message, "timed out");
    EXPECT_CONTAINS(message, "stays usable");
    world()->set_timeout(before);
  }
  expect_still_usable(*world());  // rank 0 waits here for rank 1's timeout
  if (rank == 0) world()->send(at::full({2}, 5.0), 1, 77);
  if (rank == 1) {
    at::Tensor t = at::zeros({2});
    world()->recv_async(t, 0, 77)->wait();
    EXPECT_TRUE(at::equal(t, at::full({2}, 5.0)));
  }
  expect_still_usable(*world());
}

TEST_F(SendRecvAsyncErrors, BadPeersAndTagsAreRejectedOnThisRank) {
  const int rank = world()->rank(), ranks = world()->size();
  at::Tensor t = at::zeros({2}, device_options());
  EXPECT_CONTAINS(error_of([&] { world()->send_async(t, rank, 0); }), "which is this rank");
  EXPECT_CONTAINS(error_of([&] { world()->recv_async(t, ranks, 0); }), "but the ranks are 0..");
  if (ranks > 1) {
    EXPECT_CONTAINS(error_of([&] { world()->recv_async(t, (rank + 1) % ranks, -1); }), "tags must be in 0..");
  }
  expect_still_usable(*world());
}

// Point-to-point Works in flight while a collective runs: all finish with their own results. On MPI and TCP
// the even ranks' sends start before the all-reduce; NCCL runs a communicator's calls in order (Note
// [Ordering of asynchronous point-to-point calls]), where a send before the all-reduce would wait for a
// receive queued behind it, so there every point-to-point call starts after the all-reduce.
TEST_F(MixedAsync, SendsAndReceivesAroundAnAllreduceInFlight) {
  SKIP_WITHOUT_A_SECOND_RANK();
  const int rank = world()->rank(), ranks = world()->size();
  const bool in_order = vimo::testing::backend_under_test() == "nccl";
  const int next = (rank + 1) % ranks, previous = (rank + ranks - 1) % ranks;
  const uint64_t seed = shared_seed();
  const at::Tensor messages = all_inputs(at::kDouble, seed, ranks, {1000});     // [ranks, 1000]
  const at::Tensor summands = all_inputs(at::kDouble, seed + 1, ranks, {257});  // [ranks, 257]
  const at::Tensor message = to_device(messages[rank]);
  at::Tensor sum = to_device(summands[rank]);
  at::Tensor received = at::zeros({1000}, device_options(at::kDouble));
  std::vector<std::shared_ptr<Work>> works;
  if (in_order) works.push_back(world()->allreduce_async(sum, ReduceOp::Sum));
  if (rank % 2 == 0) works.push_back(world()->send_async(message, next, 1));
  if (!in_order) works.push_back(world()->allreduce_async(sum, ReduceOp::Sum));
  works.push_back(world()->recv_async(received, previous, 1));
  if (rank % 2 == 1) works.push_back(world()->send_async(message, next, 1));
  for (const auto& work : works) work->wait();
  EXPECT_TRUE(at::equal(received.cpu(), messages[previous]));
  // Doubles summed over at most 4 ranks in an order the backend picks: within a few ulps of the ordered sum.
  EXPECT_TRUE(at::allclose(sum.cpu(), summands.sum(0), 1e-14, 1e-14));
}

}  // namespace
