// world_from_environment with the launcher's variables absent; OpenMPI's complete, incomplete, malformed and
// out of range; torchrun's and Slurm's; and the precedence between them. One process: each test sets the
// variables itself and restores the caller's environment afterwards.
#include <gtest/gtest.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/launcher_env.h"

namespace {
using vimo::comm::world_from_environment;
using vimo::comm::WorldInfo;
namespace launcher_env = vimo::comm::launcher_env;

constexpr const char* kRank = launcher_env::kOpenMpiRank;
constexpr const char* kSize = launcher_env::kOpenMpiSize;
constexpr const char* kLocalRank = launcher_env::kOpenMpiLocalRank;
constexpr const char* kLocalSize = launcher_env::kOpenMpiLocalSize;

// Every variable a launcher sets that world_from_environment may read: a test under mpirun, torchrun or
// srun must not see its own launcher's.
const std::vector<const char*> kLauncherVariables = {
    launcher_env::kOpenMpiRank,       launcher_env::kOpenMpiSize,         launcher_env::kOpenMpiLocalRank,
    launcher_env::kOpenMpiLocalSize,  launcher_env::kTorchRank,           launcher_env::kTorchWorldSize,
    launcher_env::kTorchLocalRank,    launcher_env::kTorchLocalWorldSize, launcher_env::kMasterAddr,
    launcher_env::kMasterPort,        launcher_env::kSlurmProcId,         launcher_env::kSlurmNtasks,
    launcher_env::kSlurmLocalId,      launcher_env::kSlurmNodeId,         launcher_env::kSlurmNtasksPerNode,
    launcher_env::kSlurmTasksPerNode, launcher_env::kSlurmStepNodeList,   launcher_env::kSlurmJobNodeList,
    launcher_env::kSlurmJobId,        launcher_env::kRendezvousPort,      launcher_env::kRendezvousToken,
};

// Clears the launchers' variables for the test and puts back whatever the caller had.
class LauncherEnvironment : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : kLauncherVariables) {
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
  // torchrun's variables for one worker of a job whose rendezvous is head:29500.
  static void set_torchrun(const std::string& rank, const std::string& size, const std::string& local_rank,
                           const std::optional<std::string>& local_size) {
    setenv(launcher_env::kTorchRank, rank.c_str(), 1);
    setenv(launcher_env::kTorchWorldSize, size.c_str(), 1);
    setenv(launcher_env::kTorchLocalRank, local_rank.c_str(), 1);
    if (local_size) setenv(launcher_env::kTorchLocalWorldSize, local_size->c_str(), 1);
    setenv(launcher_env::kMasterAddr, "head", 1);
    setenv(launcher_env::kMasterPort, "29500", 1);
  }
  // srun's variables for task `rank` of `size`, `per_node` tasks on each node of gpu[01-04].
  static void set_slurm(const std::string& rank, const std::string& size, const std::string& local_rank,
                        const std::string& per_node) {
    setenv(launcher_env::kSlurmProcId, rank.c_str(), 1);
    setenv(launcher_env::kSlurmNtasks, size.c_str(), 1);
    setenv(launcher_env::kSlurmLocalId, local_rank.c_str(), 1);
    setenv(launcher_env::kSlurmNtasksPerNode, per_node.c_str(), 1);
    setenv(launcher_env::kSlurmStepNodeList, "gpu[01-04]", 1);
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

TEST_F(LauncherEnvironment, AbsentMeansOneProcess) {
  const WorldInfo world = world_from_environment();
  EXPECT_EQ(world.rank, 0);
  EXPECT_EQ(world.world_size, 1);
  EXPECT_EQ(world.local_rank, 0);
  EXPECT_EQ(world.local_size, 1);
  EXPECT_EQ(world.launcher, "none");
  EXPECT_EQ(world.host, this_host());
  EXPECT_FALSE(world.host.empty());
}

TEST_F(LauncherEnvironment, ReadsAllFourVariables) {
  set_world("5", "8", "1", "4");
  const WorldInfo world = world_from_environment();
  EXPECT_EQ(world.rank, 5);
  EXPECT_EQ(world.world_size, 8);
  EXPECT_EQ(world.local_rank, 1);
  EXPECT_EQ(world.local_size, 4);
  EXPECT_EQ(world.launcher, "openmpi");
  EXPECT_EQ(world.host, this_host());
}

TEST_F(LauncherEnvironment, LastRankOfALargeWorld) {
  set_world("4095", "4096", "7", "8");
  const WorldInfo world = world_from_environment();
  EXPECT_EQ(world.rank, 4095);
  EXPECT_EQ(world.world_size, 4096);
}

TEST_F(LauncherEnvironment, MalformedValueNamesTheVariableAndValue) {
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

TEST_F(LauncherEnvironment, OutOfRangeValuesAreRejected) {
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

TEST_F(LauncherEnvironment, IncompleteSetNamesTheMissingVariable) {
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

TEST_F(LauncherEnvironment, ReadsTorchrunsVariables) {
  set_torchrun("5", "8", "1", "4");
  const WorldInfo world = world_from_environment();
  EXPECT_EQ(world.rank, 5);
  EXPECT_EQ(world.world_size, 8);
  EXPECT_EQ(world.local_rank, 1);
  EXPECT_EQ(world.local_size, 4);
  EXPECT_EQ(world.launcher, "torchrun");
  EXPECT_EQ(world.host, this_host());
}

// See Note [World from the launcher]: an unknown local size reads as the smallest one consistent with the
// local rank.
TEST_F(LauncherEnvironment, TorchrunWithoutLocalWorldSize) {
  set_torchrun("6", "8", "2", std::nullopt);
  const WorldInfo world = world_from_environment();
  EXPECT_EQ(world.local_rank, 2);
  EXPECT_EQ(world.local_size, 3);
}

TEST_F(LauncherEnvironment, TorchrunErrorsNameTheVariable) {
  set_torchrun("x", "8", "0", "1");
  EXPECT_EQ(error(), "RANK='x' is not an integer");
  set_torchrun("8", "8", "0", "1");
  EXPECT_NE(error().find("RANK=8 is out of range: expected 0 <= rank < WORLD_SIZE=8"), std::string::npos)
      << error();
  EXPECT_NE(error().find("HINT:"), std::string::npos) << error();
  set_torchrun("1", "8", "0", "1");
  unsetenv(launcher_env::kMasterAddr);  // torchrun always sets it: the world cannot meet without it
  EXPECT_NE(error().find("MASTER_ADDR is not set although other torchrun variables are"), std::string::npos)
      << error();
  unsetenv(launcher_env::kTorchRank);  // WORLD_SIZE alone still means torchrun
  EXPECT_NE(error().find("RANK is not set"), std::string::npos) << error();
}

TEST_F(LauncherEnvironment, ReadsSlurmsVariables) {
  set_slurm("6", "8", "2", "4");
  const WorldInfo world = world_from_environment();
  EXPECT_EQ(world.rank, 6);
  EXPECT_EQ(world.world_size, 8);
  EXPECT_EQ(world.local_rank, 2);
  EXPECT_EQ(world.local_size, 4);
  EXPECT_EQ(world.launcher, "slurm");
  EXPECT_EQ(world.host, this_host());
}

TEST_F(LauncherEnvironment, SlurmErrorsNameTheVariable) {
  set_slurm("8", "8", "0", "4");
  EXPECT_NE(error().find("SLURM_PROCID=8 is out of range: expected 0 <= rank < SLURM_NTASKS=8"),
            std::string::npos)
      << error();
  EXPECT_NE(error().find("HINT:"), std::string::npos) << error();
  set_slurm("1", "8", "5", "4");
  EXPECT_NE(error().find("SLURM_LOCALID=5 is out of range"), std::string::npos) << error();
  set_slurm("1", "8", "1", "4");
  unsetenv(launcher_env::kSlurmNtasks);
  EXPECT_NE(error().find("SLURM_NTASKS is not set although other Slurm variables are"), std::string::npos)
      << error();
}

// mpirun inside a Slurm allocation, or torchrun inside one: the innermost launcher describes this process
// (Note [Launcher precedence] in comm/launcher_env.cpp).
TEST_F(LauncherEnvironment, TheLauncherThatStartedThisProcessWins) {
  set_slurm("0", "2", "0", "1");  // the allocation's step: one task per node
  set_torchrun("3", "4", "1", "2");
  EXPECT_EQ(world_from_environment().launcher, "torchrun");
  EXPECT_EQ(world_from_environment().rank, 3);
  set_world("1", "2", "1", "2");
  EXPECT_EQ(world_from_environment().launcher, "openmpi");
  EXPECT_EQ(world_from_environment().rank, 1);
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
