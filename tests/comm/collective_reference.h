// What a collective should return, computed on each rank with plain LibTorch from every rank's input: the
// inputs come from a seed fresh per run that all ranks agree on, so each rank can rebuild all of them.
// Shared by the suites that run on every backend (world(): MPI, TCP or NCCL) and the other multi-rank tests.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <limits>
#include <memory>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/job_store.h"
#include "comm/tcp_communicator.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"
#if defined(VIMO_HAVE_CUDA)
#include <torch/cuda.h>

#include "comm/nccl_communicator.h"
#endif

namespace vimo::testing {

// The backend the suite runs on (VIMO_TEST_COMM_BACKEND): "mpi" by default; "tcp", the same suite over the
// TCP backend, its ranks meeting through a store formed over MPI, which only launched them; or "nccl", the
// same suite on CUDA tensors, one GPU per rank, skipped with the reason where there is none.
inline std::string backend_under_test() {
  const char* value = std::getenv("VIMO_TEST_COMM_BACKEND");
  const std::string backend = value == nullptr || *value == '\0' ? "mpi" : value;
  if (backend != "mpi" && backend != "tcp" && backend != "nccl") {
    throw std::invalid_argument("VIMO_TEST_COMM_BACKEND=" + backend + ": expected mpi, tcp or nccl");
  }
  return backend;
}

// MPI_COMM_WORLD as a vimo communicator, made once per process: the reference and bootstrap of every suite.
inline std::shared_ptr<comm::Communicator> mpi_world() {
  static const std::shared_ptr<comm::Communicator> world = comm::make_mpi_communicator();
  return world;
}

// Where the backend under test keeps its tensors: this rank's GPU for NCCL (its local rank), else the CPU.
inline at::Device device_under_test() {
  if (backend_under_test() != "nccl") return at::Device(at::kCPU);
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(comm::world_from_environment().local_rank));
}

// A copy of `tensor` on that device (always a copy, so that a call in place never writes the reference it
// came from), and options for making tensors there.
inline at::Tensor to_device(const at::Tensor& tensor) {
  return tensor.to(device_under_test(), /*non_blocking=*/false, /*copy=*/true);
}
inline at::TensorOptions device_options(at::ScalarType dtype = at::kFloat) {
  return at::TensorOptions().dtype(dtype).device(device_under_test());
}

// Why this process cannot run NCCL, or "": it needs a CUDA build and one GPU per rank of this host.
inline std::string why_nccl_is_missing() {
#if defined(VIMO_HAVE_CUDA)
  const comm::WorldInfo world = comm::world_from_environment();
  if (!torch::cuda::is_available()) return "no CUDA device (torch::cuda::is_available() is false)";
  if (static_cast<int>(torch::cuda::device_count()) < world.local_size) {
    return "NCCL needs one GPU per rank: " + std::to_string(world.local_size) + " ranks on this host but " +
           std::to_string(torch::cuda::device_count()) + " CUDA device(s)";
  }
  return "";
#else
  return "this build has no CUDA (VIMO_HAVE_CUDA is off), so no NCCL backend";
#endif
}

// The world under test, made once per process with the ranks of MPI_COMM_WORLD (see backend_under_test).
inline std::shared_ptr<comm::Communicator> world() {
  static const std::shared_ptr<comm::Communicator> world = []() -> std::shared_ptr<comm::Communicator> {
    const std::string backend = backend_under_test();
    if (backend == "mpi") return mpi_world();
#if defined(VIMO_HAVE_CUDA)
    if (backend == "nccl") return comm::make_nccl_communicator(*mpi_world(), device_under_test().index());
#endif
    if (backend != "tcp") throw std::logic_error("no " + backend + " backend in this build");
    // The store's server and client live as long as the process: rank 0 may not close it while others read.
    static std::unique_ptr<comm::JobStore> store = comm::start_job_store(*mpi_world());
    static std::unique_ptr<comm::StoreClient> client = comm::connect_job_store(*store, mpi_world()->rank());
    return comm::make_tcp_communicator(*client, "tcp/test-world", mpi_world()->rank(), mpi_world()->size(),
                                       store->token);
  }();
  return world;
}

// Why the backend under test cannot run here, agreed by every rank (so that they skip together: a rank that
// could run it alone must not go on and wait for the others), or "". A collective over MPI on its first
// call, which every rank makes in the same test's SetUp (gtest runs the tests in the same order on each).
inline const std::string& missing_backend() {
  static const std::string reason = [] {
    if (backend_under_test() != "nccl") return std::string();  // MPI and TCP run wherever the suite runs
    const std::string mine = why_nccl_is_missing();
    int able = mine.empty() ? 1 : 0;
    MPI_Allreduce(MPI_IN_PLACE, &able, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (able == 1) return std::string();
    return mine.empty() ? std::string("another rank cannot run NCCL (its output says why)") : mine;
  }();
  return reason;
}

// The fixture of every test of the suites that run on each backend: skips the test, saying why, where the
// backend under test is missing (no GPU per rank for NCCL), so that gtest reports it skipped, not passed.
class BackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!missing_backend().empty()) GTEST_SKIP() << missing_backend();
  }
};
template <typename Param>
class BackendTestWithParam : public BackendTest, public ::testing::WithParamInterface<Param> {};

// Why a test skips on NCCL (SKIP_ON_NCCL): what NCCL does differently from the CPU backends.
inline constexpr const char* kNoAgreement =
    "the ranks do not agree on a call before it runs (Note [Agreeing on a collective before running it] in "
    "comm/mpi_agreement.cpp), so mismatched calls are NCCL's to detect or to hang on";
inline constexpr const char* kNoMessageSizes =
    "a receive does not learn the size of the message it matched, so a wrong size cannot be named";
inline constexpr const char* kOnlyEnqueued =
    "blocking calls only enqueue on the caller's stream: the host never waits in them, so nothing times out "
    "there";

// The type a backend adds `dtype` in: NCCL adds in the dtype itself; MPI and TCP add the half types in
// float32 (Note [Half types over MPI]) and the others in their own type.
inline at::ScalarType accumulation_of(at::ScalarType dtype) {
  if (backend_under_test() == "nccl") return dtype;
  return dtype == at::kBFloat16 || dtype == at::kHalf ? at::kFloat : dtype;
}

// An empty scratch directory that every rank names the same: rank 0 makes it (fresh_test_dir) and sends its
// path with plain MPI. The ranks share one host under mpirun, so they share its file system.
inline std::filesystem::path shared_test_dir(const std::string& suite, const std::string& name) {
  std::string path = mpi_world()->rank() == 0 ? fresh_test_dir(suite, name).string() : "";
  int length = static_cast<int>(path.size());
  MPI_Bcast(&length, 1, MPI_INT, 0, MPI_COMM_WORLD);
  path.resize(length);
  MPI_Bcast(path.data(), length, MPI_CHAR, 0, MPI_COMM_WORLD);
  return path;
}

// A seed fresh per run (or VIMO_TEST_SEED), drawn by rank 0 and sent to all ranks with plain MPI, so that the
// communicator under test does not carry its own test data.
inline uint64_t shared_seed() {
  uint64_t seed = fresh_seed();
  MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  if (mpi_world()->rank() == 0)
    std::printf("[ seed     ] VIMO_TEST_SEED=%llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

inline std::string dtype_name(at::ScalarType dtype) { return std::string(c10::getDtypeNames(dtype).first); }

inline std::string op_name(comm::ReduceOp op) {
  switch (op) {
    case comm::ReduceOp::Sum:
      return "sum";
    case comm::ReduceOp::Avg:
      return "avg";
    case comm::ReduceOp::Max:
      return "max";
    case comm::ReduceOp::Min:
      return "min";
  }
  return "unknown";
}

// Every rank's input [ranks, rows...] of `dtype`, identical on all ranks; rank r contributes element r.
// Floating inputs are exactly representable in `dtype` (drawn in float64, then rounded); uint8 inputs stay
// below 256 / ranks so that their sum does not wrap.
inline at::Tensor all_inputs(at::ScalarType dtype, uint64_t seed, int64_t ranks, at::IntArrayRef rows) {
  at::manual_seed(seed);
  std::vector<int64_t> shape{ranks};
  shape.insert(shape.end(), rows.begin(), rows.end());
  if (at::isFloatingType(dtype)) return at::randn(shape, at::kDouble).to(dtype);
  if (dtype == at::kByte) return at::randint(0, 256 / ranks, shape, at::kLong).to(dtype);
  return at::randint(-1000, 1000, shape, at::kLong).to(dtype);
}

// A dtype and reduction, the parameter of the reduction suites, named "float32_sum" in test names.
struct ReduceCase {
  at::ScalarType dtype;
  comm::ReduceOp op;
};
inline void PrintTo(const ReduceCase& c, std::ostream* out) {
  *out << dtype_name(c.dtype) << " " << op_name(c.op);
}
inline std::string reduce_case_name(const ::testing::TestParamInfo<ReduceCase>& info) {
  return dtype_name(info.param.dtype) + "_" + op_name(info.param.op);
}

// Every reduction of every floating dtype, and the integer ones but Avg (rejected: AllreduceErrors).
inline std::vector<ReduceCase> reduce_cases() {
  std::vector<ReduceCase> cases;
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    for (comm::ReduceOp op :
         {comm::ReduceOp::Sum, comm::ReduceOp::Avg, comm::ReduceOp::Max, comm::ReduceOp::Min})
      cases.push_back({dtype, op});
  }
  for (at::ScalarType dtype : {at::kLong, at::kInt, at::kByte}) {
    for (comm::ReduceOp op : {comm::ReduceOp::Sum, comm::ReduceOp::Max, comm::ReduceOp::Min})
      cases.push_back({dtype, op});
  }
  return cases;
}

// The exact reduction over dim 0 in float64 (exact for our integers; for floats, within a few float64
// roundings).
inline at::Tensor reduce_in_float64(const at::Tensor& inputs, comm::ReduceOp op) {
  const at::Tensor x = inputs.to(at::kDouble);
  switch (op) {
    case comm::ReduceOp::Sum:
      return x.sum(0);
    case comm::ReduceOp::Avg:
      return x.sum(0) / static_cast<double>(x.size(0));
    case comm::ReduceOp::Max:
      return std::get<0>(x.max(0));
    case comm::ReduceOp::Min:
      return std::get<0>(x.min(0));
  }
  return {};
}

inline double machine_epsilon(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return std::numeric_limits<double>::epsilon();  // 2^-52
    case at::kFloat:
      return std::numeric_limits<float>::epsilon();  // 2^-23
    case at::kBFloat16:
      return 1.0 / 128;  // 2^-7: 8 significant bits
    case at::kHalf:
      return 1.0 / 1024;  // 2^-10: 11 significant bits
    default:
      return 0;  // integers: exact
  }
}

// Checks an all-reduce result `got` (in the input's dtype) against every rank's `inputs` [ranks, ...].
//
// Max and min pick one of the inputs, and integer sums are exact: those must match bit for bit. A floating
// sum depends on the order in which the backend adds the p inputs, in its accumulation type (float32 for half
// types over MPI, see Note [Half types over MPI]; the dtype itself otherwise, NCCL included). Each of the p-1
// additions rounds a partial sum, whose magnitude is at most S = Σ|x|, by at most u·S (u = eps/2), so the
// accumulated sum is within (p-1)·u_acc·S of the exact one. Avg divides by p (S/p, one more rounding of the
// result), and rounding back to the dtype costs at most u_dtype·|result|. Our float64 reference adds its own
// (p-1)·u_64·S. Allowing p·eps_acc·S + eps_dtype·|exact| covers all of these with a factor of two to spare,
// and stays far below any real bug: a missing or doubled rank moves the result by about |x| ~ 1, and the bf16
// allowance is one ulp.
inline void expect_reduced(const at::Tensor& got, const at::Tensor& inputs, comm::ReduceOp op,
                           at::ScalarType accumulation, const std::string& what) {
  ASSERT_EQ(got.scalar_type(), inputs.scalar_type()) << what;
  ASSERT_EQ(got.sizes(), inputs[0].sizes()) << what;
  const at::Tensor exact = reduce_in_float64(inputs, op);
  const at::Tensor actual = got.cpu().to(at::kDouble);
  const bool exact_match =
      op == comm::ReduceOp::Max || op == comm::ReduceOp::Min || !at::isFloatingType(inputs.scalar_type());
  if (exact_match) {
    EXPECT_TRUE(at::equal(actual, exact))
        << what << ": largest difference " << (actual - exact).abs().max().item<double>();
    return;
  }
  const int64_t ranks = inputs.size(0);
  at::Tensor magnitude = inputs.to(at::kDouble).abs().sum(0);  // S = Σ|x| per element
  if (op == comm::ReduceOp::Avg) magnitude = magnitude / static_cast<double>(ranks);
  const at::Tensor allowed = static_cast<double>(ranks) * machine_epsilon(accumulation) * magnitude +
                             machine_epsilon(inputs.scalar_type()) * exact.abs();
  const at::Tensor excess = (actual - exact).abs() - allowed;
  EXPECT_TRUE(excess.le(0).all().item<bool>())
      << what << ": " << excess.gt(0).sum().item<int64_t>()
      << " element(s) beyond the rounding bound; worst excess " << excess.max().item<double>();
}

// The message `call` throws (on this rank), or "(nothing thrown)".
template <typename Call>
std::string error_of(Call&& call) {
  try {
    call();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(nothing thrown)";
}

// After a call failed on every rank, `comm` (of the backend under test) must still work: nobody is stuck
// mid-call.
inline void expect_still_usable(comm::Communicator& comm = *world()) {
  at::Tensor one = at::ones({2}, device_options(at::kLong));
  comm.allreduce(one, comm::ReduceOp::Sum);
  EXPECT_TRUE(at::equal(one.cpu(), at::full({2}, comm.size(), at::kLong)));
}

// steady_clock in ns: comparable between the ranks of one host (CLOCK_MONOTONIC), not across hosts.
inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace vimo::testing

// Skips the test on the NCCL backend, saying what NCCL does not do that the test checks. Every rank runs the
// same backend, so all of them skip together.
#define SKIP_ON_NCCL(reason) \
  if (::vimo::testing::backend_under_test() == "nccl") GTEST_SKIP() << "not on NCCL: " << (reason)
// Skips a test that needs another rank to talk to, as under `-np 1` (the one case a single GPU runs).
#define SKIP_WITHOUT_A_SECOND_RANK() \
  if (::vimo::testing::mpi_world()->size() < 2) GTEST_SKIP() << "needs a second rank"

#define EXPECT_CONTAINS(text, part) \
  EXPECT_NE(std::string(text).find(part), std::string::npos) << "expected '" << (part) << "' in: " << (text)
