// What a collective should return, computed on each rank with plain LibTorch from every rank's input: the
// inputs come from a seed fresh per run that all ranks agree on, so each rank can rebuild all of them.
// Shared by the MPI and NCCL tests.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/job_store.h"
#include "comm/tcp_communicator.h"
#include "tests/random_seed.h"

namespace vimo::testing {

// The backend the suite runs on: "mpi", or "tcp" when VIMO_TEST_COMM_BACKEND=tcp (the same suite over the TCP
// backend, its ranks meeting through a store formed over MPI, which only launched them).
inline std::string backend_under_test() {
  const char* value = std::getenv("VIMO_TEST_COMM_BACKEND");
  return value != nullptr && std::string(value) == "tcp" ? "tcp" : "mpi";
}

// The world under test, made once per process: MPI_COMM_WORLD as a vimo communicator, or the same ranks over
// TCP (see backend_under_test).
inline std::shared_ptr<comm::Communicator> mpi_world() {
  static const std::shared_ptr<comm::Communicator> world = [] {
    std::shared_ptr<comm::Communicator> mpi = comm::make_mpi_communicator();
    if (backend_under_test() != "tcp") return mpi;
    // The store's server and client live as long as the process: rank 0 may not close it while others read.
    static std::unique_ptr<comm::JobStore> store = comm::start_job_store(*mpi);
    static std::unique_ptr<comm::StoreClient> client = comm::connect_job_store(*store, mpi->rank());
    return comm::make_tcp_communicator(*client, "tcp/test-world", mpi->rank(), mpi->size(), store->token);
  }();
  return world;
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

// After a call failed on every rank, `comm` must still work (nobody is stuck mid-call).
inline void expect_still_usable(comm::Communicator& comm = *mpi_world()) {
  at::Tensor one = at::ones({2}, at::kLong);
  comm.allreduce(one, comm::ReduceOp::Sum);
  EXPECT_TRUE(at::equal(one, at::full({2}, comm.size(), at::kLong)));
}

// steady_clock in ns: comparable between the ranks of one host (CLOCK_MONOTONIC), not across hosts.
inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace vimo::testing

#define EXPECT_CONTAINS(text, part) \
  EXPECT_NE(std::string(text).find(part), std::string::npos) << "expected '" << (part) << "' in: " << (text)
