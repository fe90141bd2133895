// The job's world formed without MPI: three processes started the way torchrun starts its workers (this
// binary, exec'd again with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and VIMO_RENDEZVOUS_TOKEN,
// and no mpirun), each running start_job_store(launch_environment()) and exchange_unique_id, the very path
// make_nccl_communicator takes with a store (the NCCL part needs GPUs; tests/comm/test_comm_nccl.cpp). Plus a
// rank that fails to prepare, a rank that never arrives, and a missing token: every rank must fail, naming
// the cause, and none may hang.
#include <arpa/inet.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "comm/job_store.h"
#include "comm/launcher_env.h"
#include "tests/test_support.h"

extern char** environ;

namespace {
using namespace std::chrono_literals;
namespace launcher_env = vimo::comm::launcher_env;

constexpr int kRanks = 3;
constexpr std::size_t kIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES, the blob make_nccl_communicator exchanges
// What tells an exec'd copy of this binary that it is a rank, which scenario to play, and where to report.
constexpr const char* kScenarioVariable = "VIMO_TEST_JOB_STORE_SCENARIO";
constexpr const char* kReportVariable = "VIMO_TEST_JOB_STORE_REPORT";
constexpr int kRankFailedExit = 3;  // a rank whose exchange threw, as a trainer would exit

std::string hex(const std::vector<uint8_t>& bytes) {
  std::string text;
  for (uint8_t byte : bytes) text += fmt::format("{:02x}", byte);
  return text;
}

// Whether the bytes written by hex() include `byte` ("ee").
bool has_byte(const std::string& hex_text, std::string_view byte) {
  for (std::size_t i = 0; i + 1 < hex_text.size(); i += 2) {
    if (hex_text.compare(i, 2, byte) == 0) return true;
  }
  return false;
}

// ---- The rank: runs in the exec'd copy, before gtest's main (see run_rank_if_asked) ----

// Scenario "exchange": two communicators' ids under two keys, then a reuse of the first key, then
// leave_job_store. "fail:R": rank R reports a failure to prepare. "vanish:R": rank R exits before the
// exchange. Each rank writes "<label> <value>" lines to <report>/rank<R>.txt; an error ends the rank with
// kRankFailedExit after writing "error <message>".
int run_rank(const std::string& scenario, const std::string& report_dir) {
  const vimo::comm::LaunchEnvironment env = vimo::comm::launch_environment();
  std::ofstream report(fmt::format("{}/rank{}.txt", report_dir, env.rank));
  try {
    const std::unique_ptr<vimo::comm::JobStore> job = vimo::comm::start_job_store(env);
    const std::unique_ptr<vimo::comm::StoreClient> store = vimo::comm::connect_job_store(*job, env.rank, 10s);
    const auto exchange = [&](const std::string& key, const std::string& problem,
                              std::chrono::milliseconds timeout) {
      // Rank 0 draws the blob as ncclGetUniqueId would; the others start from bytes it will not contain.
      std::vector<uint8_t> id(kIdBytes, 0xEE);
      if (env.rank == 0) {
        std::random_device random;
        for (uint8_t& byte : id) byte = static_cast<uint8_t>(random() % 0xEE);
      }
      vimo::comm::exchange_unique_id(*store, key, env.rank, env.world_size, id, problem, timeout);
      return id;
    };

    if (scenario == "exchange") {
      report << "world " << hex(exchange("nccl/world", "", 10s)) << "\n";
      report << "group " << hex(exchange("nccl/group0", "", 10s)) << "\n";
      try {
        exchange("nccl/world", "", 10s);
        report << "reuse accepted\n";
      } catch (const std::runtime_error& e) {
        report << "reuse " << e.what() << "\n";
      }
      // Rank 0's server must outlive every rank's last request.
      vimo::comm::leave_job_store(*store, "test/done", env.rank, env.world_size, 10s);
    } else if (scenario.rfind("fail:", 0) == 0) {
      const int failing = std::stoi(scenario.substr(5));
      const std::string problem =
          env.rank == failing ? fmt::format("[rank {}] CUDA device 7 does not exist (simulated)", env.rank)
                              : "";
      exchange("nccl/world", problem, 10s);
      report << "exchanged\n";
    } else if (scenario.rfind("vanish:", 0) == 0) {
      // Meet first, so that the short timeout below measures the missing rank, not slow starts of the others.
      store->barrier("test/started", env.world_size, 30s);
      if (env.rank == std::stoi(scenario.substr(7))) return 0;  // as if it crashed before the exchange
      exchange("nccl/world", "", 2s);
      report << "exchanged\n";
    } else {
      throw std::runtime_error("unknown scenario '" + scenario + "'");
    }
  } catch (const std::exception& e) {
    report << "error " << e.what() << "\n";
    report.flush();
    std::fprintf(stderr, "rank %d: %s\n", env.rank, e.what());
    return kRankFailedExit;
  }
  return 0;
}

// A copy of this binary exec'd as a rank plays its scenario and exits here, before gtest runs any test: the
// ranks are what a launcher starts, not tests. Static initializers of the libraries (LibTorch's included)
// have run by now, and nothing here needs gtest.
int run_rank_if_asked() {
  const char* scenario = std::getenv(kScenarioVariable);
  const char* report = std::getenv(kReportVariable);
  if (scenario == nullptr || report == nullptr) return 0;
  alarm(60);  // a rank that hangs is killed, so the test waiting for it always ends
  int code = 91;
  try {
    code = run_rank(scenario, report);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank: %s\n", e.what());  // launch_environment failed: no rank to report as
    code = 90;
  }
  std::fflush(nullptr);
  std::_Exit(code);
}
[[maybe_unused]] const int kRankRun = run_rank_if_asked();

// ---- The launcher: the test process ----

// A TCP port that was free a moment ago on loopback (the kernel's choice), for MASTER_PORT.
uint16_t free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    if (fd >= 0) close(fd);
    return 0;
  }
  close(fd);
  return ntohs(address.sin_port);
}

// Whether `entry` ("NAME=value") sets a variable some launcher sets: the ranks must see only ours.
bool is_launcher_variable(std::string_view entry) {
  const std::string_view name = entry.substr(0, entry.find('='));
  for (const std::string_view prefix :
       {"OMPI_", "PMIX_", "SLURM_", "VIMO_RENDEZVOUS_", "VIMO_TEST_JOB_STORE_"}) {
    if (name.substr(0, prefix.size()) == prefix) return true;
  }
  for (const char* own :
       {launcher_env::kTorchRank, launcher_env::kTorchWorldSize, launcher_env::kTorchLocalRank,
        launcher_env::kTorchLocalWorldSize, launcher_env::kMasterAddr, launcher_env::kMasterPort}) {
    if (name == own) return true;
  }
  return false;
}

struct RankOutcome {
  int exit_code = -1;                        // or 128 + the signal that killed it
  std::map<std::string, std::string> lines;  // label -> the rest of its line in the rank's report
};

// Starts kRanks copies of this binary as torchrun would (one host, loopback rendezvous), waits for them all,
// and returns what each reported. `with_token` leaves VIMO_RENDEZVOUS_TOKEN out when false.
std::vector<RankOutcome> launch(const std::string& scenario, const std::string& test_name,
                                bool with_token = true) {
  const std::filesystem::path report = vimo::testing::fresh_test_dir("job_store", test_name);
  const uint16_t port = free_port();
  EXPECT_NE(port, 0) << "no free port on loopback";
  std::vector<std::string> common;
  for (char** entry = environ; *entry != nullptr; ++entry) {
    if (!is_launcher_variable(*entry)) common.emplace_back(*entry);
  }
  common.push_back(fmt::format("{}={}", launcher_env::kTorchWorldSize, kRanks));
  common.push_back(fmt::format("{}={}", launcher_env::kTorchLocalWorldSize, kRanks));
  common.push_back(fmt::format("{}=127.0.0.1", launcher_env::kMasterAddr));
  common.push_back(fmt::format("{}={}", launcher_env::kMasterPort, port));
  if (with_token) common.push_back(fmt::format("{}=job-{}-secret", launcher_env::kRendezvousToken, getpid()));
  common.push_back(fmt::format("{}={}", kScenarioVariable, scenario));
  common.push_back(fmt::format("{}={}", kReportVariable, report.string()));

  std::vector<pid_t> ranks;
  for (int rank = 0; rank < kRanks; ++rank) {
    std::vector<std::string> variables = common;
    variables.push_back(fmt::format("{}={}", launcher_env::kTorchRank, rank));
    variables.push_back(fmt::format("{}={}", launcher_env::kTorchLocalRank, rank));
    std::vector<char*> envp;
    envp.reserve(variables.size() + 1);
    for (std::string& variable : variables) envp.push_back(variable.data());
    envp.push_back(nullptr);
    char self[] = "/proc/self/exe";
    char* argv[] = {self, nullptr};
    const pid_t pid = fork();
    if (pid == 0) {
      execve(self, argv, envp.data());
      std::_Exit(127);
    }
    ranks.push_back(pid);
  }
  std::vector<RankOutcome> outcomes(kRanks);
  for (int rank = 0; rank < kRanks; ++rank) {
    int status = 0;
    if (waitpid(ranks[rank], &status, 0) == ranks[rank]) {
      outcomes[rank].exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    std::ifstream in(report / fmt::format("rank{}.txt", rank));
    for (std::string line; std::getline(in, line);) {
      const std::size_t space = line.find(' ');
      outcomes[rank].lines[line.substr(0, space)] = space == std::string::npos ? "" : line.substr(space + 1);
    }
  }
  return outcomes;
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::string error_of(const RankOutcome& outcome) {
  const auto found = outcome.lines.find("error");
  return found == outcome.lines.end() ? "(no error reported)" : found->second;
}

TEST(JobStoreWithoutMpi, EveryRankGetsRankZerosIdThroughTheStore) {
  const std::vector<RankOutcome> ranks = launch("exchange", "exchange");
  for (int rank = 0; rank < kRanks; ++rank) {
    ASSERT_EQ(ranks[rank].exit_code, 0) << "rank " << rank << ": " << error_of(ranks[rank]);
    EXPECT_EQ(ranks[rank].lines.at("world").size(), 2 * kIdBytes) << "rank " << rank;
    // Identical bytes on every rank, and rank 0's (none of its bytes is 0xee, every other rank's start
    // value).
    EXPECT_EQ(ranks[rank].lines.at("world"), ranks[0].lines.at("world")) << "rank " << rank;
    EXPECT_EQ(ranks[rank].lines.at("group"), ranks[0].lines.at("group")) << "rank " << rank;
    EXPECT_FALSE(has_byte(ranks[rank].lines.at("world"), "ee")) << "rank " << rank;
    // A second communicator under the same key would get the first one's id: refused on every rank.
    const std::string& reuse = ranks[rank].lines.at("reuse");
    EXPECT_TRUE(contains(reuse, "'nccl/world'") && contains(reuse, "already used"))
        << "rank " << rank << ": " << reuse;
    if (rank != 0) {
      EXPECT_TRUE(contains(reuse, "rank 0 failed to prepare")) << reuse;
    }
  }
  EXPECT_NE(ranks[0].lines.at("world"), ranks[0].lines.at("group")) << "two communicators, one id";
}

TEST(JobStoreWithoutMpi, ARankThatFailsToPrepareStopsEveryRankNamingIt) {
  for (const int failing : {2, 0}) {  // rank 0 failing also means no id is ever published
    const std::vector<RankOutcome> ranks =
        launch(fmt::format("fail:{}", failing), fmt::format("fail{}", failing));
    for (int rank = 0; rank < kRanks; ++rank) {
      ASSERT_EQ(ranks[rank].exit_code, kRankFailedExit) << "rank " << rank << " of failing rank " << failing;
      const std::string error = error_of(ranks[rank]);
      EXPECT_TRUE(contains(error, "CUDA device 7 does not exist (simulated)")) << error;
      if (rank == failing) {
        EXPECT_EQ(error, fmt::format("[rank {}] CUDA device 7 does not exist (simulated)", rank));
      } else {
        EXPECT_TRUE(contains(error, fmt::format("[rank {}] ", rank))) << error;
        EXPECT_TRUE(contains(error, fmt::format("rank {} failed to prepare", failing))) << error;
        EXPECT_TRUE(contains(error, "HINT:")) << error;
      }
    }
  }
}

TEST(JobStoreWithoutMpi, ARankThatNeverArrivesIsNamedAfterTheTimeout) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<RankOutcome> ranks = launch("vanish:2", "vanish");
  EXPECT_LT(std::chrono::steady_clock::now() - start, 30s) << "the 2 s timeout was not kept";
  EXPECT_EQ(ranks[2].exit_code, 0);
  for (int rank = 0; rank < 2; ++rank) {
    ASSERT_EQ(ranks[rank].exit_code, kRankFailedExit) << "rank " << rank;
    const std::string error = error_of(ranks[rank]);
    EXPECT_TRUE(contains(error, "not every rank arrived")) << error;
    EXPECT_TRUE(contains(error, "missing ranks: 2")) << error;
  }
}

TEST(JobStoreWithoutMpi, AMissingTokenIsAClearErrorOnEveryRank) {
  const std::vector<RankOutcome> ranks = launch("exchange", "no_token", /*with_token=*/false);
  for (int rank = 0; rank < kRanks; ++rank) {
    ASSERT_EQ(ranks[rank].exit_code, kRankFailedExit) << "rank " << rank;
    const std::string error = error_of(ranks[rank]);
    EXPECT_TRUE(contains(error, fmt::format("[rank {}] start_job_store", rank))) << error;
    EXPECT_TRUE(contains(error, "names no rendezvous token")) << error;
    EXPECT_TRUE(contains(error, "HINT: set MASTER_ADDR and VIMO_RENDEZVOUS_TOKEN")) << error;
  }
}

}  // namespace
