// ShmAllreduce (comm/shm_allreduce.h) under mpirun (2 and 4 ranks, all on this host): sum and average of
// float32 and float64 buffers of sizes that do and do not split evenly over the ranks, against a float64
// reference and, for sums, bit for bit against the rank-order sum the header promises; the same bits on every
// rank; several operations in flight, waited in reverse order; the same buffers reused for many rounds;
// completion seen through is_completed(); the errors of allocate(), allreduce_async() and create(); and a
// rank that never arrives, named by the others' timeout.
#include <gtest/gtest.h>
#include <mpi.h>
#include <sys/statvfs.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "comm/communicator.h"
#include "comm/shm_allreduce.h"
#include "tests/comm/collective_reference.h"

namespace {
using namespace std::chrono_literals;
using vimo::comm::ReduceOp;
using vimo::comm::ShmAllreduce;
using vimo::comm::Work;
using vimo::testing::all_inputs;
using vimo::testing::dtype_name;
using vimo::testing::mpi_world;
using vimo::testing::op_name;
using vimo::testing::shared_seed;

// The last is 1 Mi + 5 elements (4 MiB in float32, 8 MiB in float64). 4099 and 1 Mi + 5 split evenly neither
// over 2 or 4 ranks nor into the implementation's 16-element slices; 1 and 7 leave some ranks an empty part.
const std::vector<int64_t> kSizes{1, 7, 1000, 4099, (int64_t{1} << 20) + 5};

// Bytes that allocate() hands out for `numel` elements: each allocation starts on a 64-byte boundary.
int64_t allocation_bytes(int64_t numel, at::ScalarType dtype) {
  const int64_t bytes = numel * static_cast<int64_t>(at::elementSize(dtype));
  return (bytes + 63) / 64 * 64;
}

// An all-reduce over the whole world, through a communicator of its own whose timeout (read by create())
// makes a hang in these tests fail within a minute rather than after the default 10 minutes. Every rank of
// these tests is on this host, so create() must succeed: it returns null on every rank or on none.
std::unique_ptr<ShmAllreduce> make_world_allreduce(int64_t capacity_bytes,
                                                   std::chrono::milliseconds timeout = 60s) {
  const std::shared_ptr<vimo::comm::Communicator> comm = mpi_world()->split(0, mpi_world()->rank());
  comm->set_timeout(timeout);
  std::string why_not;
  std::unique_ptr<ShmAllreduce> shm = ShmAllreduce::create(*comm, capacity_bytes, &why_not);
  EXPECT_NE(shm, nullptr) << "create() refused on one host: " << why_not;
  return shm;
}

// The result the header promises bit for bit for ReduceOp::Sum: each element summed over the ranks in rank
// order, every partial sum rounded to the dtype. For float32 the partial sums are formed in float64 and then
// rounded, which gives the float32 sum exactly (rounding twice is harmless for + when 53 >= 2·24 + 2), so
// the reference does not depend on how LibTorch's float32 kernels vectorise. inputs [ranks, n] -> [n].
at::Tensor sum_in_rank_order(const at::Tensor& inputs) {
  const at::ScalarType dtype = inputs.scalar_type();
  at::Tensor partial = inputs[0].to(at::kDouble);  // [n]
  for (int64_t r = 1; r < inputs.size(0); ++r)
    partial = (partial + inputs[r].to(at::kDouble)).to(dtype).to(at::kDouble);
  return partial.to(dtype);
}

// Checks this rank's result `got` [n] against every rank's `inputs` [ranks, n].
//
// Against the float64 reduction (expect_reduced): the p values of an element are summed in the dtype, so each
// of the p - 1 additions rounds a partial sum no larger than S = Σ|x| by at most 2^-24·S in float32 (2^-53·S
// in float64), and an average rounds once more; expect_reduced allows p·eps·S + eps·|exact| (eps = 2^-23 or
// 2^-52), about twice that. A rank missing, counted twice or read from a stale round moves an element by
// about |x| ~ 1, far beyond ~1e-6·S in float32 and ~1e-15·S in float64.
// A sum must also equal sum_in_rank_order() bit for bit (the header's promise); an average only within the
// bound, since the header does not say how the sum is divided.
void expect_allreduced(const at::Tensor& got, const at::Tensor& inputs, ReduceOp op,
                       const std::string& what) {
  vimo::testing::expect_reduced(got, inputs, op, inputs.scalar_type(), what);
  if (op == ReduceOp::Sum) {
    const at::Tensor exact = sum_in_rank_order(inputs);
    EXPECT_TRUE(at::equal(got, exact))
        << what << ": not the rank-order sum; largest difference "
        << (got.to(at::kDouble) - exact.to(at::kDouble)).abs().max().item<double>();
  }
}

// Every rank holds the same bits in `mine`? A collective over the world: every rank must call it.
void expect_same_bits_on_every_rank(const at::Tensor& mine, const std::string& what) {
  const at::Tensor everyone = mpi_world()->allgather(mine.reshape({1, -1}));  // [ranks, numel]
  for (int64_t r = 1; r < everyone.size(0); ++r) {
    EXPECT_TRUE(at::equal(everyone[r], everyone[0]))
        << what << ": rank " << r << " holds other bits than rank 0";
  }
}

using SumCase = std::tuple<at::ScalarType, ReduceOp>;

class ShmAllreduceResults : public ::testing::TestWithParam<SumCase> {};

// One segment holds every size, one after another: later tensors sit at offsets past earlier ones.
TEST_P(ShmAllreduceResults, MatchTheFloat64ReferenceWithTheSameBitsOnEveryRank) {
  const auto [dtype, op] = GetParam();
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  int64_t capacity = 0;
  for (int64_t n : kSizes) capacity += allocation_bytes(n, dtype);
  const std::unique_ptr<ShmAllreduce> shm = make_world_allreduce(capacity);
  ASSERT_NE(shm, nullptr);
  EXPECT_EQ(shm->rank(), rank);
  EXPECT_EQ(shm->size(), ranks);
  for (size_t i = 0; i < kSizes.size(); ++i) {
    const int64_t n = kSizes[i];
    const std::string what = op_name(op) + " of " + dtype_name(dtype) + " [" + std::to_string(n) + "]";
    const at::Tensor inputs = all_inputs(dtype, seed + i, ranks, {n});  // [ranks, n]
    at::Tensor flat = shm->allocate(n, dtype);                          // [n]
    flat.copy_(inputs[rank]);
    shm->allreduce_async(flat, op)->wait();
    expect_allreduced(flat, inputs, op, what);
    expect_same_bits_on_every_rank(flat, what);
  }
}

INSTANTIATE_TEST_SUITE_P(DtypesAndOps, ShmAllreduceResults,
                         ::testing::Combine(::testing::Values(at::kFloat, at::kDouble),
                                            ::testing::Values(ReduceOp::Sum, ReduceOp::Avg)),
                         [](const ::testing::TestParamInfo<SumCase>& info) {
                           return dtype_name(std::get<0>(info.param)) + "_" +
                                  op_name(std::get<1>(info.param));
                         });

// Mixed dtypes and sizes in one segment, as a reducer's buckets are.
struct Buffer {
  int64_t numel;
  at::ScalarType dtype;
};

// Four operations in flight at once, waited last first: each must still hold its own result.
TEST(ShmAllreduceInFlight, SeveralOperationsWaitedInReverseOrderEachHoldTheirResult) {
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const std::vector<Buffer> buffers{
      {4099, at::kFloat}, {1000, at::kDouble}, {int64_t{1} << 18, at::kFloat}, {7, at::kDouble}};
  const std::vector<ReduceOp> ops{ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Avg, ReduceOp::Sum};
  int64_t capacity = 0;
  for (const Buffer& b : buffers) capacity += allocation_bytes(b.numel, b.dtype);
  const std::unique_ptr<ShmAllreduce> shm = make_world_allreduce(capacity);
  ASSERT_NE(shm, nullptr);

  std::vector<at::Tensor> inputs, flats;  // [ranks, n] and [n] per buffer
  std::vector<std::shared_ptr<Work>> works;
  for (size_t i = 0; i < buffers.size(); ++i) {
    inputs.push_back(all_inputs(buffers[i].dtype, seed + i, ranks, {buffers[i].numel}));
    flats.push_back(shm->allocate(buffers[i].numel, buffers[i].dtype));
    flats.back().copy_(inputs.back()[rank]);
  }
  for (size_t i = 0; i < buffers.size(); ++i) works.push_back(shm->allreduce_async(flats[i], ops[i]));
  works.back()->wait();
  // The operations run one after another in start order, so the last one's end means every one has ended.
  for (size_t i = 0; i + 1 < works.size(); ++i) EXPECT_TRUE(works[i]->is_completed()) << "operation " << i;
  for (size_t i = works.size(); i-- > 0;) works[i]->wait();
  for (size_t i = 0; i < buffers.size(); ++i) {
    const std::string what = "operation " + std::to_string(i) + " (" + op_name(ops[i]) + " of " +
                             dtype_name(buffers[i].dtype) + " [" + std::to_string(buffers[i].numel) + "])";
    expect_allreduced(flats[i], inputs[i], ops[i], what);
    expect_same_bits_on_every_rank(flats[i], what);
  }
}

// The same buffers every round with new data, as a gradient reducer fills its buckets every step. Each rank
// refills a buffer the moment its wait returns, with no MPI call in between, so a rank that returned while a
// peer still reads its part would corrupt that peer's result; the checks (and their MPI calls) come after the
// last round, on copies taken at each wait.
TEST(ShmAllreduceInFlight, BuffersReusedForManyRoundsHoldEachRoundsResult) {
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int rounds = 20;
  const std::vector<Buffer> buffers{
      {(int64_t{1} << 18) + 5, at::kFloat}, {4099, at::kDouble}, {1000, at::kFloat}};
  int64_t capacity = 0;
  for (const Buffer& b : buffers) capacity += allocation_bytes(b.numel, b.dtype);
  const std::unique_ptr<ShmAllreduce> shm = make_world_allreduce(capacity);
  ASSERT_NE(shm, nullptr);

  const auto op_of = [](int round, size_t i) { return (round + i) % 2 == 0 ? ReduceOp::Sum : ReduceOp::Avg; };
  // Drawn before the rounds, so that no rank spends time between a wait and the next refill.
  std::vector<std::vector<at::Tensor>> inputs(rounds);  // per round and buffer: [ranks, n]
  for (int round = 0; round < rounds; ++round) {
    for (size_t i = 0; i < buffers.size(); ++i) {
      inputs[round].push_back(all_inputs(buffers[i].dtype, seed + 1000 * static_cast<uint64_t>(round) + i,
                                         ranks, {buffers[i].numel}));
    }
  }
  std::vector<at::Tensor> flats;
  for (const Buffer& b : buffers) flats.push_back(shm->allocate(b.numel, b.dtype));
  for (size_t i = 0; i < buffers.size(); ++i) flats[i].copy_(inputs[0][i][rank]);

  std::vector<std::vector<at::Tensor>> results(buffers.size());  // per buffer, per round: [n]
  for (int round = 0; round < rounds; ++round) {
    std::vector<std::shared_ptr<Work>> works;
    for (size_t i = 0; i < buffers.size(); ++i)
      works.push_back(shm->allreduce_async(flats[i], op_of(round, i)));
    for (size_t k = 0; k < buffers.size(); ++k) {
      const size_t i = round % 2 == 0 ? k : buffers.size() - 1 - k;  // odd rounds wait last first
      works[i]->wait();
      results[i].push_back(flats[i].clone());
      if (round + 1 < rounds) flats[i].copy_(inputs[round + 1][i][rank]);
    }
  }
  for (size_t i = 0; i < buffers.size(); ++i) {
    for (int round = 0; round < rounds; ++round) {
      const std::string what = "round " + std::to_string(round) + ", buffer " + std::to_string(i) + " (" +
                               op_name(op_of(round, i)) + " of " + dtype_name(buffers[i].dtype) + " [" +
                               std::to_string(buffers[i].numel) + "])";
      expect_allreduced(results[i][round], inputs[round][i], op_of(round, i), what);
    }
    expect_same_bits_on_every_rank(at::stack(results[i]), "buffer " + std::to_string(i) + ", all rounds");
  }
}

TEST(ShmAllreduceCompletion, IsCompletedTurnsTrueWithoutWaitAndWaitThenReturnsAtOnce) {
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int64_t n = int64_t{1} << 18;  // 1 MiB of float32
  const std::unique_ptr<ShmAllreduce> shm = make_world_allreduce(allocation_bytes(n, at::kFloat));
  ASSERT_NE(shm, nullptr);
  const at::Tensor inputs = all_inputs(at::kFloat, seed, ranks, {n});  // [ranks, n]
  at::Tensor flat = shm->allocate(n, at::kFloat);
  flat.copy_(inputs[rank]);

  const std::shared_ptr<Work> work = shm->allreduce_async(flat, ReduceOp::Avg);
  EXPECT_NE(work->description().find("allreduce"), std::string::npos) << work->description();
  // Bounded well below the communicator's timeout (60 s) so that a Work that never completes fails here.
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  bool completed = false;
  while (!(completed = work->is_completed()) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(100us);
  }
  EXPECT_TRUE(completed) << "is_completed() stayed false for 30 s";
  // A wait on a finished operation has nothing to wait for: far below any scheduling delay of a real wait.
  for (int call = 0; call < 2; ++call) {
    const auto start = std::chrono::steady_clock::now();
    work->wait();
    EXPECT_LT(std::chrono::steady_clock::now() - start, 100ms) << "wait() number " << call + 1;
  }
  EXPECT_TRUE(work->is_completed());
  expect_allreduced(flat, inputs, ReduceOp::Avg, "avg of float32 [" + std::to_string(n) + "]");
  expect_same_bits_on_every_rank(flat, "avg of float32");
}

TEST(ShmAllreduceAllocate, GivesZeroedAlignedTensorsOfFloatTypesWithinTheCapacity) {
  const int64_t capacity = 4096;  // a multiple of 64, so that allocations fill it exactly
  const std::unique_ptr<ShmAllreduce> shm = make_world_allreduce(capacity);
  ASSERT_NE(shm, nullptr);
  EXPECT_GE(shm->capacity_bytes(), capacity);

  EXPECT_THROW(shm->allocate(8, at::kLong), std::invalid_argument);
  EXPECT_THROW(shm->allocate(8, at::kBFloat16), std::invalid_argument);
  EXPECT_THROW(shm->allocate(8, at::kHalf), std::invalid_argument);
  // Sizes whose byte counts are not multiples of 64, so that each later tensor needs padding to stay aligned.
  const std::vector<Buffer> buffers{{7, at::kFloat}, {3, at::kDouble}, {1, at::kFloat}, {100, at::kDouble}};
  int64_t used = 0;
  for (const Buffer& b : buffers) {
    const std::string what = dtype_name(b.dtype) + " [" + std::to_string(b.numel) + "]";
    const at::Tensor t = shm->allocate(b.numel, b.dtype);
    used += allocation_bytes(b.numel, b.dtype);
    EXPECT_EQ(t.scalar_type(), b.dtype) << what;
    EXPECT_EQ(t.dim(), 1) << what;
    EXPECT_EQ(t.numel(), b.numel) << what;
    EXPECT_TRUE(t.is_contiguous()) << what;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data_ptr()) % 64, 0u) << what;
    EXPECT_TRUE(t.eq(0).all().item<bool>()) << what;
  }
  // Fill the rest exactly (float64 elements: `used` and the capacity are multiples of 64 bytes), then
  // overflow.
  ASSERT_EQ((capacity - used) % 8, 0);
  const at::Tensor rest = shm->allocate((capacity - used) / 8, at::kDouble);
  EXPECT_TRUE(rest.eq(0).all().item<bool>());
  EXPECT_THROW(shm->allocate(1, at::kFloat), std::length_error);

  // More than the whole capacity at once, on a fresh object.
  const std::unique_ptr<ShmAllreduce> small = make_world_allreduce(capacity);
  ASSERT_NE(small, nullptr);
  EXPECT_THROW(small->allocate(small->capacity_bytes() / 4 + 1, at::kFloat), std::length_error);
}

// The header asks for "the whole of a tensor from allocate()" and "ReduceOp::Sum or ReduceOp::Avg" but does
// not say which exception a violation raises, so these expect some std::exception. The same calls fail on
// every rank and start nothing: a valid operation afterwards still gives the right result.
TEST(ShmAllreduceErrors, ForeignTensorsAndOtherOpsAreRefusedAndStartNothing) {
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const int64_t n = 1000;
  const std::unique_ptr<ShmAllreduce> shm = make_world_allreduce(allocation_bytes(n, at::kFloat));
  ASSERT_NE(shm, nullptr);
  at::Tensor flat = shm->allocate(n, at::kFloat);

  at::Tensor foreign = at::zeros({n}, at::kFloat);
  EXPECT_THROW(shm->allreduce_async(foreign, ReduceOp::Sum), std::exception)
      << "a tensor not from allocate()";
  EXPECT_THROW(shm->allreduce_async(flat, ReduceOp::Max), std::exception) << "ReduceOp::Max";
  EXPECT_THROW(shm->allreduce_async(flat, ReduceOp::Min), std::exception) << "ReduceOp::Min";
  EXPECT_THROW(shm->allreduce_async(at::Tensor(), ReduceOp::Sum), std::exception) << "an undefined tensor";

  const at::Tensor inputs = all_inputs(at::kFloat, seed, ranks, {n});  // [ranks, n]
  flat.copy_(inputs[rank]);
  shm->allreduce_async(flat, ReduceOp::Sum)->wait();
  expect_allreduced(flat, inputs, ReduceOp::Sum, "sum of float32 after refused calls");
}

TEST(ShmAllreduceCreate, OneRankCommunicatorGivesNullWithAReason) {
  const int rank = mpi_world()->rank();
  const std::shared_ptr<vimo::comm::Communicator> alone = mpi_world()->split(/*color=*/rank, /*key=*/0);
  ASSERT_EQ(alone->size(), 1);
  std::string why_not;
  EXPECT_EQ(ShmAllreduce::create(*alone, 4096, &why_not), nullptr);
  EXPECT_FALSE(why_not.empty());
  EXPECT_EQ(ShmAllreduce::create(*alone, 4096), nullptr) << "without a reason to fill";
}

// A segment larger than all of /dev/shm: rank 0's posix_fallocate fails at once (tmpfs checks the size
// against its own before reserving a page), and every rank gets null with rank 0's reason, instead of a
// SIGBUS in the middle of a later step.
TEST(ShmAllreduceCreate, ASegmentLargerThanDevShmGivesNullWithRankZerosReasonOnEveryRank) {
  struct statvfs info {};
  ASSERT_EQ(statvfs("/dev/shm", &info), 0);
  const auto shm_bytes = static_cast<int64_t>(info.f_blocks) * static_cast<int64_t>(info.f_frsize);
  const int64_t per_rank = shm_bytes / mpi_world()->size() + (int64_t{64} << 20);
  std::string why_not;
  EXPECT_EQ(ShmAllreduce::create(*mpi_world(), per_rank, &why_not), nullptr);
  EXPECT_NE(why_not.find("rank 0: cannot reserve"), std::string::npos) << why_not;
  // The failure leaves the communicator usable: a segment of a sane size works next.
  std::string again;
  const std::unique_ptr<ShmAllreduce> shm = ShmAllreduce::create(*mpi_world(), 4096, &again);
  EXPECT_NE(shm, nullptr) << again;
}

// Rank 1 never starts the operation the others start: their waits fail after the timeout of the
// communicator at create() (a later change of that timeout must not matter), naming rank 1 and no other
// rank, and the object refuses to be used afterwards.
TEST(ShmAllreduceTimeout, ARankThatNeverArrivesIsNamedAfterTheTimeout) {
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  const std::chrono::milliseconds timeout = 1s;
  const std::shared_ptr<vimo::comm::Communicator> comm = mpi_world()->split(0, rank);
  comm->set_timeout(timeout);
  std::string why_not;
  std::unique_ptr<ShmAllreduce> shm = ShmAllreduce::create(*comm, 4096, &why_not);
  comm->set_timeout(60s);
  ASSERT_NE(shm, nullptr) << why_not;  // null on every rank or on none
  at::Tensor flat = shm->allocate(1000, at::kFloat);
  flat.fill_(static_cast<double>(rank));
  // Every rank but 1 then starts well within the timeout, so that rank 1 alone is behind.
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank != 1) {
    const auto start = std::chrono::steady_clock::now();
    const std::shared_ptr<Work> work = shm->allreduce_async(flat, ReduceOp::Sum);
    std::string message;
    try {
      work->wait();
      ADD_FAILURE() << "wait() returned although rank 1 never started the operation";
    } catch (const std::runtime_error& e) {
      message = e.what();
    }
    const auto elapsed = std::chrono::steady_clock::now() - start;
    // The waits measure from the operation's start; 2 s on top for scheduling on an oversubscribed host.
    EXPECT_GE(elapsed, timeout * 9 / 10);
    EXPECT_LT(elapsed, timeout + 2s) << "the timeout set after create() was used";
    EXPECT_NE(message.find("rank 1"), std::string::npos) << message;
    for (int r = 0; r < ranks; ++r) {
      if (r == 1 || r == rank) continue;  // "[rank <self>]" may prefix the message
      EXPECT_EQ(message.find("rank " + std::to_string(r)), std::string::npos)
          << "rank " << r << " did arrive: " << message;
    }
    // "Unusable" in the header, without an exception type: the next operation must fail, not hang or succeed.
    EXPECT_THROW(shm->allreduce_async(flat, ReduceOp::Sum)->wait(), std::exception) << "after a timeout";
  }
  shm.reset();
  MPI_Barrier(MPI_COMM_WORLD);
}

// An empty tensor (an empty bucket) has no data pointer in LibTorch: its all-reduce is done at once on every
// rank and takes no operation number, so the operations after it still pair up across ranks.
TEST(ShmAllreduceAllocate, AnEmptyTensorIsReducedAtOnceAndTheNextOperationStillPairsUp) {
  const uint64_t seed = shared_seed();
  const int rank = mpi_world()->rank(), ranks = mpi_world()->size();
  std::string why_not;
  const std::unique_ptr<ShmAllreduce> shm = ShmAllreduce::create(*mpi_world(), 1 << 16, &why_not);
  ASSERT_NE(shm, nullptr) << why_not;
  at::Tensor empty = shm->allocate(0, at::kFloat);
  at::Tensor flat = shm->allocate(1000, at::kDouble);
  const std::shared_ptr<Work> nothing = shm->allreduce_async(empty, ReduceOp::Avg);
  EXPECT_TRUE(nothing->is_completed());
  nothing->wait();
  const at::Tensor inputs = all_inputs(at::kDouble, seed, ranks, {1000});  // [ranks, 1000]
  flat.copy_(inputs[rank]);
  shm->allreduce_async(flat, ReduceOp::Sum)->wait();
  EXPECT_TRUE(at::allclose(flat, inputs.sum(0), 1e-12, 1e-12));
}

// A rank whose operation failed (here: timed out waiting for rank 1) marks its counter, and rank 1, arriving
// late, fails at once naming it instead of waiting out a timeout of its own.
TEST(ShmAllreduceTimeout, ALateRankFailsAtOnceNamingTheRankThatGaveUp) {
  const int rank = mpi_world()->rank();
  const std::shared_ptr<vimo::comm::Communicator> comm = mpi_world()->split(0, rank);
  comm->set_timeout(1s);
  std::string why_not;
  std::unique_ptr<ShmAllreduce> shm = ShmAllreduce::create(*comm, 4096, &why_not);
  ASSERT_NE(shm, nullptr) << why_not;
  at::Tensor flat = shm->allocate(100, at::kFloat);
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 1) std::this_thread::sleep_for(2500ms);  // the others give up after 1 s
  const auto start = std::chrono::steady_clock::now();
  std::string message;
  try {
    shm->allreduce_async(flat, ReduceOp::Sum)->wait();
    ADD_FAILURE() << "wait() returned although the others gave up before rank 1 arrived";
  } catch (const std::runtime_error& e) {
    message = e.what();
  }
  if (rank == 1) {
    EXPECT_LT(std::chrono::steady_clock::now() - start, 500ms) << "rank 1 waited out its own timeout";
    EXPECT_NE(message.find("rank 0 gave up"), std::string::npos) << message;
  } else {
    EXPECT_NE(message.find("timed out"), std::string::npos) << message;
  }
  shm.reset();
  MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace
