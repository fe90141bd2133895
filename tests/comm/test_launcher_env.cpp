// launch_environment() for each launcher (OpenMPI, torchrun, Slurm), their precedence, malformed values,
// srun_started_without_pmi, and the Slurm host-list parser. One process: the environment is a map handed to
// the function, never setenv.
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "comm/launcher_env.h"
#include "tests/test_support.h"

namespace {
using vimo::comm::expand_slurm_host_list;
using vimo::comm::first_slurm_host;
using vimo::comm::LaunchEnvironment;
using vimo::testing::expect_error;
using Environment = std::map<std::string, std::string>;

// Looks names up in `environment`, which must outlive the lookup.
vimo::comm::EnvironmentLookup lookup_in(const Environment& environment) {
  return [&environment](const char* name) -> const char* {
    const auto found = environment.find(name);
    return found == environment.end() ? nullptr : found->second.c_str();
  };
}
LaunchEnvironment launch(const Environment& environment) {
  return vimo::comm::launch_environment(lookup_in(environment));
}

const Environment kOpenMpi = {{"OMPI_COMM_WORLD_RANK", "5"},
                              {"OMPI_COMM_WORLD_SIZE", "8"},
                              {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                              {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}};
const Environment kTorchrun = {{"RANK", "3"},
                               {"WORLD_SIZE", "16"},
                               {"LOCAL_RANK", "3"},
                               {"LOCAL_WORLD_SIZE", "8"},
                               {"MASTER_ADDR", "head-node"},
                               {"MASTER_PORT", "29500"}};
const Environment kSlurm = {{"SLURM_PROCID", "6"},
                            {"SLURM_NTASKS", "8"},
                            {"SLURM_LOCALID", "2"},
                            {"SLURM_NODEID", "1"},
                            {"SLURM_TASKS_PER_NODE", "4(x2)"},
                            {"SLURM_JOB_NODELIST", "gpu[01-04,07],login1"},
                            {"SLURM_STEP_NODELIST", "gpu[03-04]"},
                            {"SLURM_STEP_NUM_TASKS", "8"},
                            {"SLURM_JOB_ID", "123456"}};

Environment merged(std::initializer_list<Environment> parts) {
  Environment all;
  for (const Environment& part : parts) all.insert(part.begin(), part.end());
  return all;
}
Environment with(Environment base, const std::string& name, const std::string& value) {
  base[name] = value;
  return base;
}
Environment without(Environment base, const std::string& name) {
  base.erase(name);
  return base;
}

TEST(LaunchEnvironment, NothingSetMeansOneProcess) {
  const LaunchEnvironment env = launch({});
  EXPECT_EQ(env.launcher, "none");
  EXPECT_EQ(env.rank, 0);
  EXPECT_EQ(env.world_size, 1);
  EXPECT_EQ(env.local_rank, 0);
  EXPECT_EQ(env.local_size, 1);
  EXPECT_FALSE(env.rendezvous);
  EXPECT_FALSE(env.rendezvous_token);
  // LOCAL_RANK alone is set by other tools and does not make a torchrun launch.
  EXPECT_EQ(launch({{"LOCAL_RANK", "1"}}).launcher, "none");
}

TEST(LaunchEnvironment, OpenMpi) {
  const LaunchEnvironment env = launch(kOpenMpi);
  EXPECT_EQ(env.launcher, "openmpi");
  EXPECT_EQ(env.rank, 5);
  EXPECT_EQ(env.world_size, 8);
  EXPECT_EQ(env.local_rank, 1);
  EXPECT_EQ(env.local_size, 4);
  EXPECT_FALSE(env.rendezvous) << "MPI forms the world itself";
}

TEST(LaunchEnvironment, Torchrun) {
  const LaunchEnvironment env = launch(with(kTorchrun, "VIMO_RENDEZVOUS_TOKEN", "s3cret"));
  EXPECT_EQ(env.launcher, "torchrun");
  EXPECT_EQ(env.rank, 3);
  EXPECT_EQ(env.world_size, 16);
  EXPECT_EQ(env.local_rank, 3);
  EXPECT_EQ(env.local_size, 8);
  ASSERT_TRUE(env.rendezvous);
  EXPECT_EQ(env.rendezvous->host, "head-node");
  EXPECT_EQ(env.rendezvous->port, 29500);
  EXPECT_EQ(env.rendezvous_token, "s3cret");
  EXPECT_FALSE(launch(without(kTorchrun, "LOCAL_WORLD_SIZE")).local_size);
  EXPECT_EQ(launch(with(kTorchrun, "VIMO_RENDEZVOUS_PORT", "4000")).rendezvous->port, 4000);
}

TEST(LaunchEnvironment, Slurm) {
  const LaunchEnvironment env = launch(kSlurm);
  EXPECT_EQ(env.launcher, "slurm");
  EXPECT_EQ(env.rank, 6);
  EXPECT_EQ(env.world_size, 8);
  EXPECT_EQ(env.local_rank, 2);
  EXPECT_EQ(env.local_size, 4);
  ASSERT_TRUE(env.rendezvous);
  EXPECT_EQ(env.rendezvous->host, "gpu03") << "the step's node list comes before the job's";
  EXPECT_EQ(env.rendezvous->port, 29600 + 456) << "the default port is derived from the job id";

  const Environment job_only = without(kSlurm, "SLURM_STEP_NODELIST");
  EXPECT_EQ(launch(job_only).rendezvous->host, "gpu01");
  EXPECT_EQ(launch(with(job_only, "MASTER_ADDR", "10.0.0.9")).rendezvous->host, "10.0.0.9");
  EXPECT_EQ(launch(with(kSlurm, "MASTER_PORT", "1234")).rendezvous->port, 1234);
  EXPECT_EQ(
      launch(with(with(kSlurm, "MASTER_PORT", "1234"), "VIMO_RENDEZVOUS_PORT", "4321")).rendezvous->port,
      4321);
  EXPECT_EQ(launch(without(kSlurm, "SLURM_JOB_ID")).rendezvous->port, 29600);
}

TEST(LaunchEnvironment, SlurmLocalSize) {
  EXPECT_EQ(launch(with(kSlurm, "SLURM_NTASKS_PER_NODE", "3")).local_size, 4)
      << "SLURM_TASKS_PER_NODE (the step's) comes before SLURM_NTASKS_PER_NODE (the allocation's)";
  EXPECT_EQ(launch(with(without(kSlurm, "SLURM_TASKS_PER_NODE"), "SLURM_NTASKS_PER_NODE", "3")).local_size,
            3);
  EXPECT_EQ(launch(with(kSlurm, "SLURM_STEP_TASKS_PER_NODE", "3(x4)")).local_size, 3)
      << "the step's own first";
  EXPECT_EQ(launch(with(kSlurm, "SLURM_TASKS_PER_NODE", "5,3(x2)")).local_size, 3) << "node 1's entry";
  const Environment no_node_id = without(kSlurm, "SLURM_NODEID");
  EXPECT_EQ(launch(with(no_node_id, "SLURM_TASKS_PER_NODE", "4(x3),4")).local_size, 4);
  EXPECT_FALSE(launch(with(with(no_node_id, "SLURM_TASKS_PER_NODE", "4,3"), "SLURM_LOCALID", "0")).local_size)
      << "uneven nodes and no node id: unknown";
  EXPECT_FALSE(launch(without(kSlurm, "SLURM_TASKS_PER_NODE")).local_size);
}

// Note [Launcher precedence]: OpenMPI > torchrun > Slurm.
TEST(LaunchEnvironment, Precedence) {
  EXPECT_EQ(launch(merged({kOpenMpi, kTorchrun, kSlurm})).launcher, "openmpi");
  EXPECT_EQ(launch(merged({kOpenMpi, kSlurm})).launcher, "openmpi");
  const LaunchEnvironment nested = launch(merged({kTorchrun, kSlurm}));  // srun torchrun ...
  EXPECT_EQ(nested.launcher, "torchrun");
  EXPECT_EQ(nested.rank, 3);
  EXPECT_EQ(nested.rendezvous->host, "head-node");
  // The chosen launcher's errors are reported even when a lower one would be valid.
  expect_error(
      [&] {
        launch(merged({with(kOpenMpi, "OMPI_COMM_WORLD_RANK", "x"), kSlurm}));
      },
      {"OMPI_COMM_WORLD_RANK='x' is not an integer"});
}

// Note [srun without PMI]: a task srun started, unless a PMI server (srun --mpi=pmix or pmi2, mpirun) runs.
TEST(SrunStartedWithoutPmi, NeedsAStepAndNoPmiServer) {
  const auto started_alone = [](const Environment& environment) {
    return vimo::comm::srun_started_without_pmi(lookup_in(environment));
  };
  const Environment task = with(kSlurm, "SLURM_STEP_ID", "0");
  EXPECT_TRUE(started_alone(task));
  EXPECT_TRUE(started_alone(merged({kTorchrun, task}))) << "srun torchrun ...: its workers inherit the step";
  EXPECT_FALSE(started_alone(kSlurm)) << "the batch script's own processes are in no step";
  EXPECT_FALSE(started_alone(with(task, "PMIX_RANK", "6"))) << "srun --mpi=pmix, or mpirun";
  EXPECT_FALSE(started_alone(with(task, "PMI_RANK", "6"))) << "srun --mpi=pmi2";
  EXPECT_FALSE(started_alone({}));
}

TEST(LaunchEnvironment, MissingVariablesAreNamed) {
  expect_error([] { launch(without(kOpenMpi, "OMPI_COMM_WORLD_LOCAL_SIZE")); },
               {"OMPI_COMM_WORLD_LOCAL_SIZE is not set", "HINT:"});
  for (const char* name : {"WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}) {
    expect_error([&] { launch(without(kTorchrun, name)); }, {std::string(name) + " is not set", "HINT:"});
  }
  for (const char* name : {"SLURM_NTASKS", "SLURM_LOCALID"}) {
    expect_error([&] { launch(without(kSlurm, name)); }, {std::string(name) + " is not set", "HINT:"});
  }
  expect_error([] { launch(without(without(kSlurm, "SLURM_STEP_NODELIST"), "SLURM_JOB_NODELIST")); },
               {"SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "MASTER_ADDR"});
}

TEST(LaunchEnvironment, MalformedAndOutOfRangeValuesAreNamed) {
  struct Case {
    Environment environment;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {with(kTorchrun, "RANK", "1.5"), "RANK='1.5' is not an integer"},
      {with(kTorchrun, "RANK", "16"), "RANK=16 is out of range: expected 0 <= rank < WORLD_SIZE=16"},
      {with(kTorchrun, "WORLD_SIZE", "0"), "WORLD_SIZE=0 is out of range: expected at least 1"},
      {with(kTorchrun, "LOCAL_RANK", "8"),
       "LOCAL_RANK=8 is out of range: expected 0 <= local rank < LOCAL_WORLD_SIZE=8"},
      {with(kTorchrun, "LOCAL_WORLD_SIZE", "17"), "LOCAL_WORLD_SIZE=17 is out of range"},
      {with(kTorchrun, "MASTER_PORT", "70000"), "MASTER_PORT=70000 is out of range: expected a TCP port"},
      {with(kTorchrun, "MASTER_PORT", "0"), "MASTER_PORT=0 is out of range"},
      {with(kTorchrun, "MASTER_PORT", "http"), "MASTER_PORT='http' is not an integer"},
      {with(kTorchrun, "MASTER_ADDR", ""), "MASTER_ADDR='' is not a host name"},
      {with(kTorchrun, "VIMO_RENDEZVOUS_PORT", "-1"), "VIMO_RENDEZVOUS_PORT=-1 is out of range"},
      {with(kOpenMpi, "OMPI_COMM_WORLD_SIZE", "99999999999"),
       "OMPI_COMM_WORLD_SIZE='99999999999' is out of the range of an int"},
      {with(kOpenMpi, "OMPI_COMM_WORLD_LOCAL_RANK", "4"), "OMPI_COMM_WORLD_LOCAL_RANK=4 is out of range"},
      {with(kSlurm, "SLURM_PROCID", "8"),
       "SLURM_PROCID=8 is out of range: expected 0 <= rank < SLURM_NTASKS=8"},
      {with(kSlurm, "SLURM_LOCALID", " 2"), "SLURM_LOCALID=' 2' is not an integer"},
      {with(without(kSlurm, "SLURM_TASKS_PER_NODE"), "SLURM_NTASKS_PER_NODE", "2"),
       "SLURM_LOCALID=2 is out of range: expected 0 <= local rank < SLURM_NTASKS_PER_NODE=2"},
      {with(kSlurm, "SLURM_TASKS_PER_NODE", "4(x)"), "SLURM_TASKS_PER_NODE='4(x)' is malformed"},
      {with(kSlurm, "SLURM_TASKS_PER_NODE", "4,,4"), "SLURM_TASKS_PER_NODE='4,,4' is malformed"},
      {with(kSlurm, "SLURM_TASKS_PER_NODE", "4(x1)"),
       "SLURM_NODEID=1 is out of range: expected 0 <= node < 1"},
      {with(kSlurm, "SLURM_JOB_ID", "abc"), "SLURM_JOB_ID='abc' is not an integer"},
      {with(kSlurm, "SLURM_STEP_NODELIST", "gpu[03-"),
       "SLURM_STEP_NODELIST='gpu[03-' is not a valid Slurm host list: unclosed '[' at position 3"},
  };
  for (const Case& c : cases) expect_error([&] { launch(c.environment); }, {c.expected});
}

TEST(SlurmHostList, Expands) {
  using Hosts = std::vector<std::string>;
  EXPECT_EQ(expand_slurm_host_list("login1"), Hosts({"login1"}));
  EXPECT_EQ(expand_slurm_host_list("gpu[01-04,07],login1"),
            Hosts({"gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "login1"}));
  EXPECT_EQ(expand_slurm_host_list("node[9-11]"), Hosts({"node9", "node10", "node11"}));
  EXPECT_EQ(expand_slurm_host_list("node[08-10]"), Hosts({"node08", "node09", "node10"}));
  EXPECT_EQ(expand_slurm_host_list("a-b[001-003]-ib"), Hosts({"a-b001-ib", "a-b002-ib", "a-b003-ib"}));
  EXPECT_EQ(expand_slurm_host_list("n[7],m.x_y"), Hosts({"n7", "m.x_y"}));
  EXPECT_EQ(expand_slurm_host_list("r[1-2]n[01-02]"), Hosts({"r1n01", "r1n02", "r2n01", "r2n02"}));
  EXPECT_EQ(expand_slurm_host_list("[1-2]x,y[5,3]"), Hosts({"1x", "2x", "y5", "y3"}));
  EXPECT_EQ(first_slurm_host("gpu[01-04,07],login1"), "gpu01");
  EXPECT_EQ(first_slurm_host("node[9-11]"), "node9");
  EXPECT_EQ(first_slurm_host("a-b[001-003]-ib"), "a-b001-ib");
  EXPECT_EQ(first_slurm_host("big[0000-999999999999]"), "big0000") << "the first host needs no expansion";
}

TEST(SlurmHostList, MalformedListsSayWhatAndWhere) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "the list is empty"},
      {"gpu[01-04", "unclosed '[' at position 3"},
      {"gpu[", "unclosed '[' at position 3"},
      {"gpu]", "']' without a matching '[' at position 3"},
      {"gpu[]", "expected a number, found ']' at position 4"},
      {"gpu[a-b]", "expected a number, found 'a' at position 4"},
      {"gpu[4-2]", "the range '4-2' decreases at position 4"},
      {"gpu[1-2[3]]", "unexpected character '[' in a range at position 7"},
      {"a,,b", "an empty host name at position 2"},
      {"a,", "an empty host name at position 2"},
      {"a b", "unexpected character ' ' at position 1"},
      {"n[1234567890123456789]", "a number of more than 18 digits at position 2"},
  };
  for (const auto& [list, expected] : cases) {
    try {
      first_slurm_host(list);
      ADD_FAILURE() << "'" << list << "' was accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos)
          << "list '" << list << "': expected '" << expected << "' in: " << e.what();
    }
  }
  EXPECT_THROW(expand_slurm_host_list("n[1-5]", 4), std::invalid_argument);
  EXPECT_EQ(expand_slurm_host_list("n[1-4]", 4).size(), 4u);
}

// Environments Slurm 22.05 gives (captured on the private cluster of tests/e2e/slurm_common.sh; the 2-node
// one follows the same rules): srun rewrites SLURM_NTASKS and SLURM_TASKS_PER_NODE and sets SLURM_STEP_* for
// its step but leaves the allocation's SLURM_NTASKS_PER_NODE; the batch shell has SLURM_PROCID=0 and the
// allocation's SLURM_NTASKS without being a task of any step. Found by an audit; each failed before the fix.
// `sbatch --nodes=1 --ntasks-per-node=2` and, in its script, `srun -n 1 vimo train ...`: the task's
// environment as captured.
const Environment kOneTaskStep = {{"SLURM_JOB_ID", "1"},
                                  {"SLURM_JOB_NODELIST", "vm"},
                                  {"SLURM_STEP_ID", "0"},
                                  {"SLURM_STEP_NODELIST", "vm"},
                                  {"SLURM_PROCID", "0"},
                                  {"SLURM_LOCALID", "0"},
                                  {"SLURM_NODEID", "0"},
                                  {"SLURM_NTASKS", "1"},
                                  {"SLURM_STEP_NUM_TASKS", "1"},
                                  {"SLURM_TASKS_PER_NODE", "1"},
                                  {"SLURM_STEP_TASKS_PER_NODE", "1"},
                                  {"SLURM_NTASKS_PER_NODE", "2"}};  // the allocation's, left by srun

TEST(LaunchEnvironment, OneTaskStepInAnAllocationOfTwoPerNode) {
  vimo::comm::LaunchEnvironment env;
  ASSERT_NO_THROW(env = launch(kOneTaskStep));
  EXPECT_EQ(env.world_size, 1);
  EXPECT_EQ(env.local_size, 1);
}

// `sbatch --nodes=2 --ntasks-per-node=8`, then `srun -N2 -n8 vimo train ...`: 4 tasks on each node. Task 7.
TEST(LaunchEnvironment, StepWithFewerTasksPerNodeThanTheAllocation) {
  const Environment env_vars = {{"SLURM_JOB_ID", "7"},
                                {"SLURM_JOB_NODELIST", "gpu[01-02]"},
                                {"SLURM_STEP_ID", "0"},
                                {"SLURM_STEP_NODELIST", "gpu[01-02]"},
                                {"SLURM_PROCID", "7"},
                                {"SLURM_LOCALID", "3"},
                                {"SLURM_NODEID", "1"},
                                {"SLURM_NTASKS", "8"},
                                {"SLURM_STEP_NUM_TASKS", "8"},
                                {"SLURM_TASKS_PER_NODE", "4(x2)"},
                                {"SLURM_STEP_TASKS_PER_NODE", "4(x2)"},
                                {"SLURM_NTASKS_PER_NODE", "8"}};  // the allocation's
  const vimo::comm::LaunchEnvironment env = launch(env_vars);
  EXPECT_EQ(env.local_size, 4)
      << "the step runs 4 tasks per node; 8 is the allocation's SLURM_NTASKS_PER_NODE";
}

// `vimo train` run in the batch script itself (not through srun or mpirun) of a job with
// `--nodes=1 --ntasks-per-node=2`, with a token exported as retriever_srun.sbatch does: the batch shell's
// environment as captured. It is one process, not rank 0 of 2: as rank 0 of 2 it serves the store and waits
// for a rank 1 that nothing will start.
TEST(LaunchEnvironment, TheBatchShellIsNotATaskOfAStep) {
  const Environment batch_shell = {
      {"SLURM_JOB_ID", "1"},          {"SLURM_JOB_NODELIST", "vm"},  {"SLURM_PROCID", "0"},
      {"SLURM_LOCALID", "0"},         {"SLURM_NODEID", "0"},         {"SLURM_NTASKS", "2"},
      {"SLURM_NTASKS_PER_NODE", "2"}, {"SLURM_TASKS_PER_NODE", "2"}, {"VIMO_RENDEZVOUS_TOKEN", "abc"}};
  const vimo::comm::LaunchEnvironment env = launch(batch_shell);
  EXPECT_EQ(env.world_size, 1) << "launcher " << env.launcher << " says rank " << env.rank << " of "
                               << env.world_size;
}

}  // namespace
