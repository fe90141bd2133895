// world_from_environment with OpenMPI's variables absent, complete, incomplete, malformed and out of range.
// One process: each test sets the variables itself and restores the caller's environment afterwards.
#include <gtest/gtest.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace {
using vimo::comm::world_from_environment;
using vimo::comm::WorldInfo;

constexpr const char* kRank = "OMPI_COMM_WORLD_RANK";
constexpr const char* kSize = "OMPI_COMM_WORLD_SIZE";
constexpr const char* kLocalRank = "OMPI_COMM_WORLD_LOCAL_RANK";
constexpr const char* kLocalSize = "OMPI_COMM_WORLD_LOCAL_SIZE";

// Clears OpenMPI's variables for the test and puts back whatever the caller had.
class OpenMpiEnvironment : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : {kRank, kSize, kLocalRank, kLocalSize}) {
      const char* value = std::getenv(name);
      saved_.emplace_back(name, value ? std::optional<std::string>(value) : std::nullopt);
      unsetenv(name);
    }
  }
  void TearDown() override {
    for (const auto& [name, value] : saved_) {
      if (value) {
        setenv(name, value->c_str(), 1);
      } else {
        unsetenv(name);
      }
    }
  }
  static void set_world(const std::string& rank, const std::string& size, const std::string& local_rank,
                        const std::string& local_size) {
    setenv(kRank, rank.c_str(), 1);
    setenv(kSize, size.c_str(), 1);
    setenv(kLocalRank, local_rank.c_str(), 1);
    setenv(kLocalSize, local_size.c_str(), 1);
  }
  // The message world_from_environment() throws, or "(nothing thrown)".
  static std::string error() {
    try {
      world_from_environment();
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "(nothing thrown)";
  }

 private:
  std::vector<std::pair<const char*, std::optional<std::string>>> saved_;
};

std::string this_host() {
  char name[HOST_NAME_MAX + 1] = {};
  gethostname(name, sizeof(name) - 1);
  return name;
}

TEST_F(OpenMpiEnvironment, AbsentMeansOneProcess) {
  const WorldInfo world = world_from_environment();
  EXPECT_EQ(world.rank, 0);
  EXPECT_EQ(world.world_size, 1);
  EXPECT_EQ(world.local_rank, 0);
  EXPECT_EQ(world.local_size, 1);
  EXPECT_EQ(world.launcher, "none");
  EXPECT_EQ(world.host, this_host());
  EXPECT_FALSE(world.host.empty());
}

TEST_F(OpenMpiEnvironment, ReadsAllFourVariables) {
  set_world("5", "8", "1", "4");
  const WorldInfo world = world_from_environment();
  EXPECT_EQ(world.rank, 5);
  EXPECT_EQ(world.world_size, 8);
  EXPECT_EQ(world.local_rank, 1);
  EXPECT_EQ(world.local_size, 4);
  EXPECT_EQ(world.launcher, "openmpi");
  EXPECT_EQ(world.host, this_host());
}

TEST_F(OpenMpiEnvironment, LastRankOfALargeWorld) {
  set_world("4095", "4096", "7", "8");
  const WorldInfo world = world_from_environment();
  EXPECT_EQ(world.rank, 4095);
  EXPECT_EQ(world.world_size, 4096);
}

TEST_F(OpenMpiEnvironment, MalformedValueNamesTheVariableAndValue) {
  set_world("x", "2", "0", "1");
  EXPECT_EQ(error(), "OMPI_COMM_WORLD_RANK='x' is not an integer");
  for (const std::string bad : {"", " 1", "1 ", "+1", "1.5", "0x1", "1e3", "2abc", "--1"}) {
    set_world("0", bad, "0", "1");
    const std::string message = error();
    EXPECT_NE(message.find("OMPI_COMM_WORLD_SIZE='" + bad + "' is not an integer"), std::string::npos)
        << "value '" << bad << "': " << message;
  }
  set_world("0", "2", "0", "99999999999");
  EXPECT_NE(error().find("OMPI_COMM_WORLD_LOCAL_SIZE='99999999999' is out of the range of an int"),
            std::string::npos)
      << error();
  set_world("0", "2", "one", "1");
  EXPECT_NE(error().find("OMPI_COMM_WORLD_LOCAL_RANK='one' is not an integer"), std::string::npos) << error();
}

TEST_F(OpenMpiEnvironment, OutOfRangeValuesAreRejected) {
  struct Case {
    std::vector<std::string> values;  // rank, size, local rank, local size
    std::string expected;             // a part of the message
  };
  const std::vector<Case> cases = {
      {{"4", "4", "0", "1"},
       "OMPI_COMM_WORLD_RANK=4 is out of range: expected 0 <= rank < OMPI_COMM_WORLD_SIZE=4"},
      {{"-1", "4", "0", "1"}, "OMPI_COMM_WORLD_RANK=-1 is out of range"},
      {{"0", "0", "0", "1"}, "OMPI_COMM_WORLD_SIZE=0 is out of range"},
      {{"0", "-3", "0", "1"}, "OMPI_COMM_WORLD_SIZE=-3 is out of range"},
      {{"1", "4", "2", "2"}, "OMPI_COMM_WORLD_LOCAL_RANK=2 is out of range"},
      {{"1", "4", "-1", "2"}, "OMPI_COMM_WORLD_LOCAL_RANK=-1 is out of range"},
      {{"1", "4", "0", "5"}, "OMPI_COMM_WORLD_LOCAL_SIZE=5 is out of range"},
      {{"1", "4", "0", "0"}, "OMPI_COMM_WORLD_LOCAL_SIZE=0 is out of range"},
  };
  for (const Case& c : cases) {
    set_world(c.values[0], c.values[1], c.values[2], c.values[3]);
    const std::string message = error();
    EXPECT_NE(message.find(c.expected), std::string::npos)
        << "expected '" << c.expected << "' in: " << message;
    EXPECT_NE(message.find("HINT:"), std::string::npos) << message;
  }
}

TEST_F(OpenMpiEnvironment, IncompleteSetNamesTheMissingVariable) {
  setenv(kRank, "0", 1);
  setenv(kSize, "2", 1);
  const std::string message = error();
  EXPECT_NE(message.find("OMPI_COMM_WORLD_LOCAL_RANK is not set"), std::string::npos) << message;
  EXPECT_NE(message.find("HINT:"), std::string::npos) << message;

  unsetenv(kRank);
  unsetenv(kSize);
  setenv(kLocalSize, "1", 1);  // even one stray variable is an error, not a silent single process
  EXPECT_NE(error().find("OMPI_COMM_WORLD_RANK is not set"), std::string::npos) << error();
}

// The one error format of both backends' checked calls.
TEST(FailedCallDescription, NamesRankFunctionPlaceReasonAndHint) {
  EXPECT_EQ(
      vimo::comm::detail::describe_failed_call(1, "MPI_Allreduce(MPI_IN_PLACE, data, count, type, op, comm_)",
                                               "/work/main/comm/mpi_communicator.cpp", 88,
                                               "MPI_ERR_TRUNCATE: message truncated", "see the other ranks"),
      "[rank 1] MPI_Allreduce failed at comm/mpi_communicator.cpp:88: MPI_ERR_TRUNCATE: message truncated. "
      "HINT: see the other ranks");
  EXPECT_EQ(vimo::comm::detail::describe_failed_call(0, "ncclGetVersion(&code)", "comm/nccl_communicator.cpp",
                                                     7, "invalid argument", ""),
            "[rank 0] ncclGetVersion failed at comm/nccl_communicator.cpp:7: invalid argument");
}

}  // namespace
