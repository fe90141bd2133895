// The TCP backend's own cases, with ranks forked from this process and no MPI at all (the shared suites of
// test_comm_mpi / test_comm_collectives / test_process_grid run over TCP under mpirun too): connections with
// a wrong token or garbage are refused, logged, and do not stop the mesh from forming; a large all-reduce
// split unevenly over 3 ranks equals its float64 reference; a rank that dies makes the others fail at once,
// naming it, instead of waiting for the timeout; and a rank that never comes is named when forming times out.
#include <ATen/CPUGeneratorImpl.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "comm/store.h"
#include "comm/tcp_communicator.h"
#include "comm/tcp_internal.h"
#include "tests/comm/tcp_test_harness.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"

namespace {
using namespace std::chrono_literals;
using vimo::comm::ReduceOp;
using namespace vimo::testing::tcp;  // NOLINT(google-build-using-namespace): the harness

// Connects to 127.0.0.1:port, sends `bytes`, and returns whether the other end closed the connection within
// 10 s without answering (a read returned 0, or failed with a reset: a close with bytes unread).
bool sent_and_closed_unanswered(uint16_t port, const std::string& bytes) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  ::inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) return false;
  if (::write(fd, bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size())) return false;
  timeval wait{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof(wait));
  char answer = 0;
  const ssize_t got = ::read(fd, &answer, 1);
  const bool reset = got < 0 && errno == ECONNRESET;  // closed with some of our bytes unread
  ::close(fd);
  return got == 0 || reset;
}

TEST(TcpCommunicator, RefusesWrongTokensAndGarbageAndStillForms) {
  const auto dir = vimo::testing::fresh_test_dir("tcp", "refuses");
  const Store store;
  const std::string key = "tcp/refuses";
  // Rank 2 is no rank: before rank 1 may start, it knocks on rank 0's port with a wrong token, then with
  // garbage, then with the right token but claiming rank 7, and sees each connection closed unanswered
  // (rank 0 accepts while it waits for rank 1: it needs no address of a higher rank).
  const std::vector<int> statuses = run_ranks(3, dir, 60s, [&](int rank) -> std::string {
    auto client = store.connect(rank);
    if (rank == 2) {
      const uint16_t port = listening_port(*client, key);
      std::string result =
          fmt::format("wrong token closed: {}\n", sent_and_closed_unanswered(port, hello(key, 1, "guess")));
      result += fmt::format("garbage closed: {}\n", sent_and_closed_unanswered(port, std::string(64, 'x')));
      result += fmt::format("rank 7 closed: {}\n", sent_and_closed_unanswered(port, hello(key, 7, kToken)));
      client->set("go", {});
      return result;
    }
    if (rank == 1) client->get("go", 30s);
    auto comm = vimo::comm::make_tcp_communicator(*client, key, rank, 2, kToken, 30s);
    at::Tensor x = at::full({3}, rank + 1.0);
    comm->allreduce(x, ReduceOp::Sum);
    return fmt::format("sum {}", x[0].item<double>());
  });
  EXPECT_EQ(statuses, (std::vector<int>{0, 0, 0}))
      << read_file(dir / "rank0.txt") << read_file(dir / "rank1.txt");
  EXPECT_EQ(read_file(dir / "rank2.txt"),
            "wrong token closed: true\ngarbage closed: true\nrank 7 closed: true\n");
  EXPECT_EQ(read_file(dir / "rank0.txt"), "sum 3");
  EXPECT_EQ(read_file(dir / "rank1.txt"), "sum 3");
  const std::string log = read_file(dir / "rank0.err");
  EXPECT_NE(log.find("refused a connection from 127.0.0.1: rank 1 presented a wrong token"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("not a vimo TCP communicator hello"), std::string::npos) << log;
  EXPECT_NE(log.find("a hello from rank 7"), std::string::npos) << log;
  EXPECT_EQ(log.find("the-job-token"), std::string::npos) << "the log shows the token: " << log;
}

TEST(TcpCommunicator, LargeUnevenAllreduceAndReduceScatterMatchFloat64) {
  const auto dir = vimo::testing::fresh_test_dir("tcp", "large");
  const Store store;
  const uint64_t seed = vimo::testing::fresh_seed();
  RecordProperty("seed", std::to_string(seed));
  constexpr int kRanks = 3;
  constexpr int64_t kElements = 3'000'001;  // 12 MB of float32, not a multiple of 3: chunks of unequal size
  const auto input_of = [&](int rank) {
    at::Generator generator = at::detail::createCPUGenerator(seed + static_cast<uint64_t>(rank));
    return at::randn({kElements}, generator, at::kFloat);
  };
  const std::vector<int> statuses = run_ranks(kRanks, dir, 120s, [&](int rank) -> std::string {
    auto client = store.connect(rank);
    auto comm = vimo::comm::make_tcp_communicator(*client, "tcp/large", rank, kRanks, kToken, 60s);
    at::Tensor sum = input_of(rank);
    comm->allreduce(sum, ReduceOp::Sum);
    at::Tensor rows = input_of(rank).narrow(0, 0, kElements - 1).view({kRanks * 1000, -1});
    const at::Tensor scattered = comm->reduce_scatter(rows, ReduceOp::Max);
    // The float64 truth, from every rank's input rebuilt here.
    at::Tensor truth = at::zeros({kElements}, at::kDouble);
    at::Tensor max_truth;
    for (int r = 0; r < kRanks; ++r) {
      const at::Tensor x = input_of(r);
      truth += x.to(at::kDouble);
      const at::Tensor part =
          x.narrow(0, 0, kElements - 1).view({kRanks * 1000, -1}).narrow(0, rank * 1000, 1000);
      max_truth = r == 0 ? part.clone() : at::maximum(max_truth, part);
    }
    // Three float32 terms: each addition rounds once, so |error| <= 2 ulp-sized steps of the running sum.
    const double worst = (sum.to(at::kDouble) - truth).abs().max().item<double>();
    const double bound = 2 * 6e-8 * truth.abs().max().item<double>() + 1e-6;
    return fmt::format("sum within bound: {} (worst {}, bound {})\nmax equal: {}", worst <= bound, worst,
                       bound, at::equal(scattered, max_truth));
  });
  EXPECT_EQ(statuses, (std::vector<int>(kRanks, 0)));
  for (int rank = 0; rank < kRanks; ++rank) {
    const std::string result = read_file(dir / fmt::format("rank{}.txt", rank));
    EXPECT_NE(result.find("sum within bound: true"), std::string::npos) << "rank " << rank << ": " << result;
    EXPECT_NE(result.find("max equal: true"), std::string::npos) << "rank " << rank << ": " << result;
  }
}

TEST(TcpCommunicator, ADeadRankFailsTheOthersAtOnceNamingIt) {
  const auto dir = vimo::testing::fresh_test_dir("tcp", "dead");
  const Store store;
  const std::vector<int> statuses = run_ranks(3, dir, 60s, [&](int rank) -> std::string {
    auto client = store.connect(rank);
    auto comm = vimo::comm::make_tcp_communicator(*client, "tcp/dead", rank, 3, kToken, 30s);
    comm->barrier();
    if (rank == 2) ::_exit(0);  // dies without a word, its sockets closed by the kernel
    comm->set_timeout(120s);
    at::Tensor x = at::ones({1 << 20});
    const auto start = std::chrono::steady_clock::now();
    try {
      comm->allreduce(x, ReduceOp::Sum);
    } catch (const std::runtime_error& e) {
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      // A later call is refused, naming the failure.
      std::string later;
      try {
        comm->barrier();
      } catch (const std::runtime_error& again) {
        later = again.what();
      }
      return fmt::format("failed after {:.1f} s: {}\nlater: {}", waited, e.what(), later);
    }
    return "no error";
  });
  EXPECT_EQ(statuses, (std::vector<int>{0, 0, 0}));
  for (int rank = 0; rank < 2; ++rank) {
    const std::string result = read_file(dir / fmt::format("rank{}.txt", rank));
    EXPECT_NE(result.find("failed after"), std::string::npos) << result;
    // Rank 1 receives from rank 0 first in the ring, so either may be the one that sees rank 2 go first; the
    // other then sees that one's failure. Both must name a peer that closed its connection, well before 120
    // s.
    EXPECT_NE(result.find("closed its connection"), std::string::npos) << result;
    EXPECT_NE(result.find("refused: this communicator is unusable"), std::string::npos) << result;
    const double waited = std::stod(result.substr(std::string("failed after ").size()));
    EXPECT_LT(waited, 30.0) << result;
  }
  const bool named = read_file(dir / "rank0.txt").find("rank 2 (") != std::string::npos ||
                     read_file(dir / "rank1.txt").find("rank 2 (") != std::string::npos;
  EXPECT_TRUE(named) << "neither surviving rank names rank 2";
}

TEST(TcpCommunicator, ARankThatNeverComesIsNamed) {
  const auto dir = vimo::testing::fresh_test_dir("tcp", "absent");
  const Store store;
  // Ranks 0 and 1 of 3 come; rank 2 never does.
  const std::vector<int> statuses = run_ranks(2, dir, 60s, [&](int rank) -> std::string {
    auto client = store.connect(rank);
    auto comm = vimo::comm::make_tcp_communicator(*client, "tcp/absent", rank, 3, kToken, 2s);
    return "formed";
  });
  EXPECT_EQ(statuses, (std::vector<int>{1, 1}));
  for (int rank = 0; rank < 2; ++rank) {
    const std::string result = read_file(dir / fmt::format("rank{}.txt", rank));
    EXPECT_NE(
        result.find("no connection with 1 of the 2 other ranks before the timeout: rank 2 (never connected)"),
        std::string::npos)
        << result;
  }
}

// A lower rank whose port accepts connections (the kernel's backlog does) but whose process never answers, as
// a stopped rank's would: when forming times out, the error says that the hello got no answer (Note [A time
// limit per connection attempt]).
TEST(TcpCommunicator, ALowerRankThatNeverAnswersIsNamedWithWhy) {
  const auto dir = vimo::testing::fresh_test_dir("tcp", "mute");
  const Store store;
  const int mute = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  ::inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
  ASSERT_EQ(::bind(mute, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  ASSERT_EQ(::listen(mute, 16), 0);  // never accepted: the kernel completes the connections, nobody reads
  socklen_t length = sizeof(address);
  ::getsockname(mute, reinterpret_cast<sockaddr*>(&address), &length);
  const std::string where =
      vimo::comm::tcp_detail::encode_listener({vimo::comm::tcp_detail::this_host_name(), "127.0.0.1",
                                               static_cast<uint16_t>(ntohs(address.sin_port))});
  store.connect(0)->set("tcp/mute/0", {reinterpret_cast<const uint8_t*>(where.data()), where.size()});

  const auto started = std::chrono::steady_clock::now();
  const std::vector<int> statuses = run_ranks(1, dir, 60s, [&](int) -> std::string {
    auto client = store.connect(1);
    auto comm = vimo::comm::make_tcp_communicator(*client, "tcp/mute", 1, 2, kToken, 2s);
    return "formed";
  });
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  ::close(mute);
  EXPECT_EQ(statuses, (std::vector<int>{1}));
  const std::string result = read_file(dir / "rank0.txt");
  EXPECT_NE(result.find("no connection with 1 of the 1 other ranks before the timeout: rank 0 ("),
            std::string::npos)
      << result;
  EXPECT_NE(result.find("connected, but no answer to the hello (is the rank stopped or busy?)"),
            std::string::npos)
      << result;
  EXPECT_LT(took, 20) << "forming was to give up after its 2 s timeout";
}

// Rank 0 sends three 4000-byte messages (tags 1..3) that rank 1 has not asked for yet, then the one (tag 9)
// it waits for: rank 1 must hold the three in memory to read past them (Note [A bound on unawaited frames]).
// With a bound of 12000 bytes they fit, every message arrives intact, and the bytes taken by receives are
// counted off (a second round of the same fits again). With 10000 the third fails rank 1's receive, naming
// rank 0 and the sizes.
TEST(TcpCommunicator, MessagesSentAheadAreHeldUpToABoundPerPeer) {
  const Store store;
  for (const char* limit : {"12000", "10000"}) {
    SCOPED_TRACE(std::string("VIMO_TCP_MAX_UNAWAITED_BYTES=") + limit);
    const auto dir = vimo::testing::fresh_test_dir("tcp", std::string("ahead_") + limit);
    ::setenv("VIMO_TCP_MAX_UNAWAITED_BYTES", limit, 1);  // read by each forked rank
    const std::string key = std::string("tcp/ahead/") + limit;
    const std::vector<int> statuses = run_ranks(2, dir, 60s, [&](int rank) -> std::string {
      auto client = store.connect(rank);
      auto comm = vimo::comm::make_tcp_communicator(*client, key, rank, 2, kToken, 30s);
      const auto message = [](int round, int tag) { return at::full({1000}, 100.0 * round + tag); };
      std::string result;
      for (int round = 0; round < 2; ++round) {
        if (rank == 0) {
          for (int tag = 1; tag <= 3; ++tag) comm->send(message(round, tag), 1, tag);
          comm->send(at::full({2}, 9.0), 1, 9);
          client->get(fmt::format("{}/round{}", key, round), 30s);  // rank 1 is done with the round
          continue;
        }
        at::Tensor nine = at::zeros({2});
        try {
          comm->recv(nine, 0, 9);  // reads past tags 1..3
        } catch (const std::runtime_error&) {
          for (int r = 0; r < 2; ++r) client->set(fmt::format("{}/round{}", key, r), {});  // rank 0 goes on
          throw;
        }
        bool intact = at::equal(nine, at::full({2}, 9.0));
        for (int tag : {3, 1, 2}) {
          at::Tensor got = at::zeros({1000});
          comm->recv(got, 0, tag);
          intact = intact && at::equal(got, message(round, tag));
        }
        result += fmt::format("round {} intact: {}\n", round, intact);
        client->set(fmt::format("{}/round{}", key, round), {});
      }
      return result;
    });
    ::unsetenv("VIMO_TCP_MAX_UNAWAITED_BYTES");
    const std::string receiver = read_file(dir / "rank1.txt");
    if (std::string(limit) == "12000") {
      EXPECT_EQ(statuses, (std::vector<int>{0, 0})) << receiver << read_file(dir / "rank0.txt");
      EXPECT_EQ(receiver, "round 0 intact: true\nround 1 intact: true\n");
    } else {
      EXPECT_EQ(statuses[1], 1) << receiver;
      EXPECT_NE(receiver.find("rank 0 ("), std::string::npos) << receiver;
      EXPECT_NE(receiver.find("sent a frame of 4000 bytes (tag 3) that no receive awaits, while 8000 bytes "
                              "of its earlier frames wait for receives: over the 10000 bytes"),
                std::string::npos)
          << receiver;
    }
  }
}

// Rank 0 runs out of descriptors just as the others connect to it: its accepts fail, with the connections
// left queued. It must try again (every 100 ms) rather than stop accepting, which left the mesh unformed
// until the deadline, or spin: once descriptors are free again the mesh forms, and the failure is logged.
TEST(TcpCommunicator, AnAcceptThatFailsForWantOfDescriptorsIsTriedAgain) {
  const auto dir = vimo::testing::fresh_test_dir("tcp", "descriptors");
  const Store store;
  const std::string key = "tcp/descriptors";
  const std::vector<int> statuses = run_ranks(3, dir, 60s, [&](int rank) -> std::string {
    auto client = store.connect(rank);
    std::vector<int> dummies;
    std::thread filler;
    if (rank == 0) {
      const auto open_now = static_cast<rlim_t>(std::distance(
          std::filesystem::directory_iterator("/proc/self/fd"), std::filesystem::directory_iterator{}));
      const rlimit limit{open_now + 64, open_now + 64};
      if (setrlimit(RLIMIT_NOFILE, &limit) != 0) return "setrlimit failed";
      filler = std::thread([&] {
        auto own = store.connect(0);
        (void)listening_port(*own, key);  // rank 0 listens: from here on it only accepts
        for (int fd = ::open("/dev/null", O_RDONLY); fd >= 0; fd = ::open("/dev/null", O_RDONLY)) {
          dummies.push_back(fd);
        }
        own->set(key + "/filled", {});
        std::this_thread::sleep_for(1s);  // the others' connections wait in the queue meanwhile
        for (const int fd : dummies) ::close(fd);
      });
    } else {
      client->get(key + "/filled", 30s);
    }
    auto comm = vimo::comm::make_tcp_communicator(*client, key, rank, 3, kToken, 10s);
    if (filler.joinable()) filler.join();
    at::Tensor x = at::full({3}, rank + 1.0);
    comm->allreduce(x, ReduceOp::Sum);
    return fmt::format("held {} descriptors; sum {}", dummies.size(), x[0].item<double>());
  });
  EXPECT_EQ(statuses, (std::vector<int>{0, 0, 0}))
      << read_file(dir / "rank0.txt") << read_file(dir / "rank1.txt");
  EXPECT_NE(read_file(dir / "rank0.txt").find("sum 6"), std::string::npos) << read_file(dir / "rank0.txt");
  EXPECT_EQ(read_file(dir / "rank0.txt").find("held 0 "), std::string::npos) << "no descriptor was taken";
  const std::string log = read_file(dir / "rank0.err");
  EXPECT_NE(log.find("accepting a connection failed: Too many open files"), std::string::npos) << log;
}

}  // namespace
