// The NCCL backend under mpirun: every collective on CUDA tensors against the MPI backend on the same inputs
// (and all_gather_with_grad against plain autograd); the unique id through the rendezvous store instead of
// MPI; split() against the MPI backend's. Built only with CUDA; skips, saying why, without one GPU per rank.
// Under `-np 1` it still runs NCCL's whole path (init, streams, dtypes, a split into one group) on one GPU.
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <memory>
#include <regex>
#include <string>

#include "comm/communicator.h"
#include "comm/job_store.h"
#include "comm/nccl_communicator.h"
#include "tests/comm/collective_reference.h"

namespace {
using vimo::comm::ReduceOp;
using vimo::testing::all_inputs;
using vimo::testing::dtype_name;
using vimo::testing::error_of;
using vimo::testing::mpi_world;
using vimo::testing::op_name;
using vimo::testing::shared_seed;

TEST(NcclLibrary, VersionIsMajorMinorPatch) {
  const std::string version = vimo::comm::nccl_library_version();  // needs the library, not a GPU
  EXPECT_TRUE(std::regex_match(version, std::regex(R"(\d+\.\d+\.\d+)"))) << version;
}

class NcclCommunicator : public ::testing::Test {
 protected:
  void SetUp() override {
    // Every rank must make the same decision, or the ranks that go on would wait for the ones that skipped.
    const vimo::comm::WorldInfo world = vimo::comm::world_from_environment();
    const std::string reason = vimo::testing::why_nccl_is_missing();
    at::Tensor able = at::full({1}, reason.empty() ? 1 : 0, at::kInt);
    mpi_world()->allreduce(able, ReduceOp::Min);
    if (able.item<int>() == 0) {
      GTEST_SKIP() << (reason.empty() ? "another rank cannot run NCCL (see its skip reason)" : reason);
    }
    device_ = world.local_rank;
    nccl_ = vimo::comm::make_nccl_communicator(*mpi_world(), device_);
  }

  at::Tensor on_gpu(const at::Tensor& t) const { return t.to(at::Device(at::kCUDA, device_)); }

  int device_ = 0;
  std::shared_ptr<vimo::comm::Communicator> nccl_;
};

TEST_F(NcclCommunicator, DescribesItself) {
  EXPECT_EQ(nccl_->backend_name(), "nccl");
  EXPECT_EQ(nccl_->rank(), mpi_world()->rank());
  EXPECT_EQ(nccl_->size(), mpi_world()->size());
}

TEST_F(NcclCommunicator, AllreduceMatchesMpi) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const uint64_t seed = shared_seed();
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kLong}) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min}) {
      if (op == ReduceOp::Avg && dtype == at::kLong) continue;  // rejected by both backends
      const std::string what = dtype_name(dtype) + " " + op_name(op);
      const at::Tensor inputs = all_inputs(dtype, seed, ranks, {5, 7});  // [ranks, 5, 7]
      at::Tensor on_cpu = inputs[rank].clone();
      mpi_world()->allreduce(on_cpu, op);
      at::Tensor on_cuda = on_gpu(inputs[rank]);
      nccl_->allreduce(on_cuda, op);
      // NCCL adds in the dtype itself (bf16 and fp16 included) in its own order: both results must lie within
      // their rounding bounds of the exact answer (see expect_reduced), and exact ops must agree bit for bit.
      vimo::testing::expect_reduced(on_cuda, inputs, op, dtype, what + " (nccl)");
      if (op == ReduceOp::Max || op == ReduceOp::Min || !at::isFloatingType(dtype)) {
        EXPECT_TRUE(at::equal(on_cuda.cpu(), on_cpu)) << what;
      }
    }
  }
  // A non-contiguous CUDA tensor goes through a contiguous copy and back.
  const at::Tensor inputs = all_inputs(at::kFloat, seed + 1, ranks, {4, 6});
  at::Tensor storage = on_gpu(inputs[rank].t().contiguous());  // [6, 4]
  at::Tensor view = storage.t();                               // [4, 6], not contiguous
  nccl_->allreduce(view, ReduceOp::Max);
  EXPECT_TRUE(at::equal(storage.t().cpu(), std::get<0>(inputs.max(0))));
}

TEST_F(NcclCommunicator, AllgatherAndBroadcastMatchMpiBitForBit) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const uint64_t seed = shared_seed();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kLong, at::kByte}) {
    const at::Tensor inputs = all_inputs(dtype, seed, ranks, {3, 4});  // [ranks, 3, 4]
    const at::Tensor gathered = nccl_->allgather(on_gpu(inputs[rank]));
    EXPECT_TRUE(gathered.is_cuda());
    EXPECT_TRUE(at::equal(gathered.cpu(), mpi_world()->allgather(inputs[rank]))) << dtype_name(dtype);
    for (int root = 0; root < ranks; ++root) {
      at::Tensor mine = on_gpu(inputs[rank]);
      nccl_->broadcast(mine, root);
      EXPECT_TRUE(at::equal(mine.cpu(), inputs[root])) << dtype_name(dtype) << " from root " << root;
    }
  }
  nccl_->barrier();
}

// The asynchronous calls run on the communicator's own stream, ordered after the caller's: each input here is
// written on the caller's (non-default) stream behind a ~50 ms spin kernel and the calls start at once, with
// no synchronisation, so a side stream that did not wait would move the stale values. After wait(), the
// caller's stream reads the results without a device synchronisation. Broadcast, a ring of sends and
// receives (even ranks send first: Note [Ordering of asynchronous point-to-point calls]), an all-reduce and a
// barrier, each against every rank's inputs rebuilt from the shared seed.
TEST_F(NcclCommunicator, AsyncCallsAreOrderedAfterTheCallersStream) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const uint64_t seed = shared_seed();
  const c10::cuda::CUDAStream caller = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_);
  const c10::cuda::CUDAStreamGuard on_caller(caller);
  const at::Tensor inputs = all_inputs(at::kFloat, seed, ranks, {1 << 16});  // [ranks, 65536]
  const auto written_late = [&](const at::Tensor& values) {
    at::Tensor target = on_gpu(at::zeros_like(values));
    at::cuda::sleep(100'000'000);  // cycles: ~50 ms at 2 GHz
    target.copy_(on_gpu(values));
    return target;
  };
  const int root = static_cast<int>(seed % static_cast<uint64_t>(ranks));
  at::Tensor broadcast = written_late(inputs[rank]);
  nccl_->broadcast_async(broadcast, root)->wait();
  EXPECT_TRUE(at::equal(broadcast.cpu(), inputs[root]));

  at::Tensor sum = written_late(inputs[rank]);
  const std::shared_ptr<vimo::comm::Work> reducing = nccl_->allreduce_async(sum, ReduceOp::Sum);
  reducing->wait();
  vimo::testing::expect_reduced(sum, inputs, ReduceOp::Sum, at::kFloat, "allreduce_async (nccl)");

  if (ranks > 1) {
    const int next = (rank + 1) % ranks, previous = (rank + ranks - 1) % ranks;
    const at::Tensor message = written_late(inputs[rank]);
    at::Tensor received = on_gpu(at::zeros({1 << 16}));
    std::shared_ptr<vimo::comm::Work> sent, got;
    if (rank % 2 == 0) {
      sent = nccl_->send_async(message, next, 0);
      got = nccl_->recv_async(received, previous, 0);
    } else {
      got = nccl_->recv_async(received, previous, 0);
      sent = nccl_->send_async(message, next, 0);
    }
    got->wait();
    sent->wait();
    EXPECT_TRUE(at::equal(received.cpu(), inputs[previous]));
  }
  nccl_->barrier_async()->wait();
}

// The *_into calls write the caller's output: the all-gather equals MPI's bit for bit, the int64 sum of the
// reduce-scatter too (integer sums do not depend on the order), and an output of the wrong shape is refused
// before anything is enqueued, naming the shape it needed.
TEST_F(NcclCommunicator, IntoCallsFillTheCallersOutput) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const uint64_t seed = shared_seed();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kLong}) {
    const at::Tensor inputs = all_inputs(dtype, seed, ranks, {3, 4});  // [ranks, 3, 4]
    at::Tensor gathered = on_gpu(at::full({3 * ranks, 4}, 7, at::TensorOptions().dtype(dtype)));
    const void* storage = gathered.data_ptr();
    nccl_->allgather_into(on_gpu(inputs[rank]), gathered);
    EXPECT_EQ(gathered.data_ptr(), storage) << dtype_name(dtype);
    EXPECT_TRUE(at::equal(gathered.cpu(), mpi_world()->allgather(inputs[rank]))) << dtype_name(dtype);
  }
  const at::Tensor inputs = all_inputs(at::kLong, seed + 1, ranks, {2 * ranks, 3});  // [ranks, 2 * ranks, 3]
  at::Tensor shard = on_gpu(at::zeros({2, 3}, at::kLong));
  nccl_->reduce_scatter_into(on_gpu(inputs[rank]), shard, ReduceOp::Sum);
  EXPECT_TRUE(at::equal(shard.cpu(), mpi_world()->reduce_scatter(inputs[rank], ReduceOp::Sum)));
  at::Tensor wrong = on_gpu(at::zeros({3, 3}, at::kLong));
  try {
    nccl_->reduce_scatter_into(on_gpu(inputs[rank]), wrong, ReduceOp::Sum);
    ADD_FAILURE() << "an output of the wrong shape was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("[2, 3]"), std::string::npos) << e.what();
  }
  nccl_->barrier();
}

TEST_F(NcclCommunicator, RejectsCpuTensorsOnEveryRank) {
  at::Tensor on_cpu = at::zeros({3});
  try {
    nccl_->allreduce(on_cpu, ReduceOp::Sum);
    ADD_FAILURE() << "a CPU tensor was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("but this NCCL communicator runs on cuda:"), std::string::npos)
        << e.what();
  }
  nccl_->barrier();
}

TEST_F(NcclCommunicator, AllGatherWithGradMatchesTheCpuGradient) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int64_t rows = 3;
  at::manual_seed(shared_seed());
  const at::Tensor all_rows = at::randn({ranks * rows, 4}, at::kDouble);  // [ranks * rows, D]
  auto gradient = [&](const std::shared_ptr<vimo::comm::Communicator>& comm, const at::Device& device) {
    const at::Tensor local = all_rows.narrow(0, rank * rows, rows).to(device).requires_grad_(true);
    const at::Tensor gathered = vimo::comm::all_gather_with_grad(local, comm);
    (local.matmul(gathered.t()).pow(2).sum(1).mean() + ((rank + 1) * gathered).tanh().sum()).backward();
    return local.grad().cpu();
  };
  const at::Tensor on_cpu = gradient(mpi_world(), at::Device(at::kCPU));
  const at::Tensor on_cuda = gradient(nccl_, at::Device(at::kCUDA, device_));
  EXPECT_TRUE(at::allclose(on_cuda, on_cpu, 1e-12, 1e-12)) << (on_cuda - on_cpu).abs().max().item<double>();
}

// A store key no earlier communicator of this run used: every rank makes the same calls, so the same keys.
std::string fresh_key(const std::string& what) {
  static int made = 0;
  return "nccl/test/" + what + "/" + std::to_string(made++);
}

// The unique id through the store, as under torchrun (the store is formed over MPI here only because mpirun
// started the ranks): the same collectives must give the MPI backend's results.
TEST_F(NcclCommunicator, StoreBootstrapGivesTheSameCommunicator) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const std::unique_ptr<vimo::comm::JobStore> job = vimo::comm::start_job_store(*mpi_world());
  const std::unique_ptr<vimo::comm::StoreClient> store = vimo::comm::connect_job_store(*job, rank);
  const std::shared_ptr<vimo::comm::Communicator> nccl =
      vimo::comm::make_nccl_communicator(*store, fresh_key("world"), rank, ranks, device_);
  EXPECT_EQ(nccl->backend_name(), "nccl");
  EXPECT_EQ(nccl->rank(), rank);
  EXPECT_EQ(nccl->size(), ranks);
  EXPECT_EQ(nccl->timeout(), vimo::comm::default_collective_timeout());
  const at::Tensor inputs =
      vimo::testing::all_inputs(at::kLong, shared_seed(), ranks, {3, 5});  // [ranks, 3, 5]
  at::Tensor on_cuda = on_gpu(inputs[rank]);
  nccl->allreduce(on_cuda, ReduceOp::Sum);
  EXPECT_TRUE(at::equal(on_cuda.cpu(), inputs.sum(0)));
  nccl->barrier();
}

// The last rank asks for a device that does not exist: every rank fails, the others naming it, none hangs.
TEST_F(NcclCommunicator, StoreBootstrapNamesTheRankThatCouldNotPrepare) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const std::unique_ptr<vimo::comm::JobStore> job = vimo::comm::start_job_store(*mpi_world());
  const std::unique_ptr<vimo::comm::StoreClient> store = vimo::comm::connect_job_store(*job, rank);
  const int failing = ranks - 1;
  const std::string error = error_of([&] {
    vimo::comm::make_nccl_communicator(*store, fresh_key("missing_gpu"), rank, ranks,
                                       rank == failing ? 4096 : device_);
  });
  if (rank == failing) {
    EXPECT_NE(error.find("CUDA device 4096 does not exist"), std::string::npos) << error;
  } else {
    EXPECT_NE(error.find("rank " + std::to_string(failing) + " failed to prepare"), std::string::npos)
        << error;
  }
  mpi_world()->barrier();  // rank 0's store outlives every rank's use of it
}

// Groups of even and odd ranks, ordered backwards by key: the same groups, ranks and sums as MPI's split.
// The group outlives the communicator it was split from, and starts with its timeout.
TEST_F(NcclCommunicator, SplitMatchesTheMpiSplit) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int color = rank % 2, key = -rank;
  std::shared_ptr<vimo::comm::Communicator> group;
  {
    std::shared_ptr<vimo::comm::Communicator> parent =
        vimo::comm::make_nccl_communicator(*mpi_world(), device_);
    parent->set_timeout(std::chrono::seconds(123));
    group = parent->split(color, key);
  }
  const std::shared_ptr<vimo::comm::Communicator> reference = mpi_world()->split(color, key);
  EXPECT_EQ(group->backend_name(), "nccl");
  EXPECT_EQ(group->rank(), reference->rank());
  EXPECT_EQ(group->size(), reference->size());
  EXPECT_EQ(group->timeout(), std::chrono::seconds(123));
  const at::Tensor inputs = vimo::testing::all_inputs(at::kLong, shared_seed(), ranks, {4});  // [ranks, 4]
  at::Tensor on_cpu = inputs[rank].clone();
  reference->allreduce(on_cpu, ReduceOp::Sum);
  at::Tensor on_cuda = on_gpu(inputs[rank]);
  group->allreduce(on_cuda, ReduceOp::Sum);
  EXPECT_TRUE(at::equal(on_cuda.cpu(), on_cpu));
  // Splitting a split works the same way: one group per rank.
  const std::shared_ptr<vimo::comm::Communicator> alone = group->split(group->rank(), 0);
  EXPECT_EQ(alone->size(), 1);
  EXPECT_EQ(alone->rank(), 0);
  group->barrier();
}

TEST_F(NcclCommunicator, SplitWithANegativeColorFailsOnEveryRank) {
  const int rank = mpi_world()->rank();
  const std::string error = error_of([&] { nccl_->split(rank == 0 ? -1 : 0, 0); });
  if (rank == 0) {
    EXPECT_NE(error.find("split got color -1, but colors must be >= 0"), std::string::npos) << error;
  } else {
    EXPECT_NE(error.find("rank 0 passed a negative color"), std::string::npos) << error;
  }
  nccl_->barrier();  // refused on every rank before NCCL saw it: the communicator is still whole
}

}  // namespace
