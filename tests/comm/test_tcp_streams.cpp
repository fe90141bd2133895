// The TCP backend's streams across timeouts and against a misbehaving peer, with ranks forked from this
// process (tests/comm/tcp_test_harness.h), some played by hand through a raw socket that writes frames byte
// by byte: a receive that times out returns in time although its peer keeps sending other tags, and loses
// nothing (a message half read at the timeout reaches the next receive of its tag, in order); a frame that
// claims a huge size fails the communicator with a named error; and collectives on shapes at the edges
// (fewer elements than ranks, none, 0-dim, half types, views, split with reversed keys, a Work outliving its
// communicator) over 4 ranks. Found in review of the backend: each failed on its first version.
#include <ATen/CPUGeneratorImpl.h>
#include <arpa/inet.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "comm/store.h"
#include "comm/tcp_communicator.h"
#include "tests/comm/tcp_test_harness.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"

namespace {
using namespace std::chrono_literals;
using vimo::comm::ReduceOp;
using namespace vimo::testing::tcp;  // NOLINT(google-build-using-namespace): the harness

// A fake rank 1 of the 2-rank mesh `key`: connects to rank 0 with a valid hello and returns the socket once
// rank 0 has acknowledged it (-1 if not), so a test can write frames byte by byte.
int join_as_rank_one(vimo::comm::StoreClient& store, const std::string& key) {
  const int fd = connect_and_send(listening_port(store, key), hello(key, 1, kToken));
  if (fd < 0) return -1;
  char ack = 0;
  if (::read(fd, &ack, 1) != 1 || ack != 1) return -1;
  return fd;
}

// A frame header as tcp_mesh.cpp writes it: magic "VTCP", reserved 0, tag, payload bytes.
std::string frame_header(int64_t tag, uint64_t bytes) {
  std::string header(24, '\0');
  const uint32_t magic = 0x50435456;
  std::memcpy(&header[0], &magic, 4);
  std::memcpy(&header[8], &tag, 8);
  std::memcpy(&header[16], &bytes, 8);
  return header;
}

void write_all(int fd, const std::string& bytes) {
  ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
}

// A recv that times out while an unawaited message of another tag is half read into the spill leaves that
// message to be finished by the next exchange, which must hand it to a pending receive of its tag (the first
// version put it into the mailbox, so the next receive of the tag took the NEXT message: same-tag order
// broken).
TEST(TcpStreams, SameTagMessagesKeepTheirOrderAfterATimedOutRecv) {
  const auto dir = vimo::testing::fresh_test_dir("tcp_streams", "order");
  const Store store;
  constexpr int64_t kBytes = int64_t{256} << 20;
  const std::vector<int> statuses = run_ranks(2, dir, 120s, [&](int rank) -> std::string {
    auto client = store.connect(rank);
    auto comm = vimo::comm::make_tcp_communicator(*client, "tcp/order", rank, 2, kToken, 30s);
    const at::Tensor a = at::full({kBytes}, 1, at::kByte), b = at::full({kBytes}, 2, at::kByte);
    comm->barrier();
    if (rank == 1) {
      comm->send(a, 0, 5);
      comm->send(b, 0, 5);
      comm->barrier();
      return "sent";
    }
    std::string result;
    std::this_thread::sleep_for(50ms);  // rank 1 has begun sending A; rank 0 reads only inside a call
    comm->set_timeout(20ms);
    at::Tensor other = at::zeros({1}, at::kByte);
    try {
      comm->recv(other, 1, 7);  // nothing comes with tag 7: times out while A is being read
      result += "tag 7 arrived?\n";
    } catch (const std::runtime_error& e) {
      result += fmt::format("tag 7 timed out (usable: {})\n",
                            std::string(e.what()).find("stays usable") != std::string::npos);
    }
    comm->set_timeout(30s);
    at::Tensor got = at::zeros({kBytes}, at::kByte);
    comm->recv(got, 1, 5);
    const int first = got[0].item<int>();
    comm->recv(got, 1, 5);
    const int second = got[0].item<int>();
    comm->barrier();
    return result + fmt::format("first {} second {}", first, second);
  });
  EXPECT_EQ(statuses, (std::vector<int>{0, 0}))
      << read_file(dir / "rank0.txt") << read_file(dir / "rank1.txt");
  EXPECT_EQ(read_file(dir / "rank0.txt"), "tag 7 timed out (usable: true)\nfirst 1 second 2");
}

// The same cause, with one message: after the timed-out recv of tag 7, a recv of tag 5 must get the message
// of tag 5 (the first version waited out its whole timeout, the message lying in the mailbox).
TEST(TcpStreams, AMessageHalfReadAtATimeoutIsFoundByTheNextRecv) {
  const auto dir = vimo::testing::fresh_test_dir("tcp_streams", "spill");
  const Store store;
  constexpr int64_t kBytes = int64_t{256} << 20;
  const std::vector<int> statuses = run_ranks(2, dir, 120s, [&](int rank) -> std::string {
    auto client = store.connect(rank);
    auto comm = vimo::comm::make_tcp_communicator(*client, "tcp/spill", rank, 2, kToken, 30s);
    const at::Tensor a = at::full({kBytes}, 1, at::kByte);
    comm->barrier();
    if (rank == 1) {
      comm->send(a, 0, 5);
      comm->barrier();
      return "sent";
    }
    std::string result;
    std::this_thread::sleep_for(50ms);
    comm->set_timeout(20ms);
    at::Tensor other = at::zeros({1}, at::kByte);
    try {
      comm->recv(other, 1, 7);
      result += "tag 7 arrived?\n";
    } catch (const std::runtime_error& e) {
      result += "tag 7 timed out\n";
    }
    comm->set_timeout(5s);
    at::Tensor got = at::zeros({kBytes}, at::kByte);
    const auto start = std::chrono::steady_clock::now();
    try {
      comm->recv(got, 1, 5);
      result += fmt::format("tag 5 received {}", got[0].item<int>());
    } catch (const std::runtime_error& e) {
      result += fmt::format("tag 5 failed after {:.1f} s: {}\n", seconds_since(start), e.what());
      comm->recv(got, 1, 5);
      result += fmt::format("the next recv of tag 5 got {} at once", got[0].item<int>());
    }
    comm->barrier();
    return result;
  });
  EXPECT_EQ(statuses, (std::vector<int>{0, 0}))
      << read_file(dir / "rank0.txt") << read_file(dir / "rank1.txt");
  EXPECT_EQ(read_file(dir / "rank0.txt"), "tag 7 timed out\ntag 5 received 1");
}

// A recv of a 20 ms timeout must return in time while its peer keeps sending other tags. (The first version's
// drain ran a read that had completed but not yet been handled, whose handler started a new read that
// nothing cancelled: it kept reading as long as the peer sent, 18 s.)
TEST(TcpStreams, ARecvTimesOutInTimeWhileThePeerSendsOtherTags) {
  const auto dir = vimo::testing::fresh_test_dir("tcp_streams", "overrun");
  const Store store;
  const std::vector<int> statuses = run_ranks(2, dir, 120s, [&](int rank) -> std::string {
    auto client = store.connect(rank);
    auto comm = vimo::comm::make_tcp_communicator(*client, "tcp/overrun", rank, 2, kToken, 30s);
    comm->barrier();
    if (rank == 1) {
      const at::Tensor message = at::ones({256}, at::kFloat);  // 1 KiB
      const auto start = std::chrono::steady_clock::now();
      int sent = 0;
      while (seconds_since(start) < 1.5) {
        comm->send(message, 0, 5);
        ++sent;
      }
      std::this_thread::sleep_for(2s);  // stops sending, keeps the connection open
      return fmt::format("sent {}", sent);
    }
    comm->set_timeout(20ms);
    at::Tensor other = at::zeros({1}, at::kByte);
    const auto start = std::chrono::steady_clock::now();
    double longest = 0;
    int calls = 0;
    std::string last;
    while (seconds_since(start) < 2.0) {
      const auto call = std::chrono::steady_clock::now();
      try {
        comm->recv(other, 1, 7);
      } catch (const std::runtime_error& e) {
        last = e.what();
      }
      ++calls;
      longest = std::max(longest, seconds_since(call));
      if (last.find("timed out") == std::string::npos) break;
    }
    return fmt::format("longest recv with a 20 ms timeout: {:.3f} s over {} calls; last error: {}", longest,
                       calls, last);
  });
  EXPECT_EQ(statuses, (std::vector<int>{0, 0}))
      << read_file(dir / "rank0.txt") << read_file(dir / "rank1.txt");
  const std::string result = read_file(dir / "rank0.txt");
  const double longest = std::stod(result.substr(std::string("longest recv with a 20 ms timeout: ").size()));
  EXPECT_LT(longest, 1.0) << result;
}

// Deterministic version of the first two cases, with a fake rank 1 that writes frames byte by byte: message A
// (tag 5) is half written when rank 0's recv of tag 7 times out; then the rest of A and a message B (tag 5)
// follow. Rank 0's next recv of tag 5 must get A, the one after it B.
TEST(TcpStreams, FakePeerSameTagOrderAfterATimedOutRecv) {
  const auto dir = vimo::testing::fresh_test_dir("tcp_streams", "fake_order");
  const Store store;
  const std::string key = "tcp/fake_order";
  const std::vector<int> statuses = run_ranks(2, dir, 60s, [&](int rank) -> std::string {
    auto client = store.connect(rank);
    if (rank == 1) {
      const int fd = join_as_rank_one(*client, key);
      if (fd < 0) return "could not join";
      write_all(fd, frame_header(5, 16) + std::string(8, '\1'));   // A, half of its payload
      std::this_thread::sleep_for(1500ms);                         // rank 0's recv of tag 7 times out
      write_all(fd, std::string(8, '\1'));                         // the rest of A
      write_all(fd, frame_header(5, 16) + std::string(16, '\2'));  // B
      client->get("done", 30s);
      ::close(fd);
      return "wrote";
    }
    auto comm = vimo::comm::make_tcp_communicator(*client, key, 0, 2, kToken, 30s);
    std::string result;
    std::this_thread::sleep_for(300ms);
    comm->set_timeout(500ms);
    at::Tensor other = at::zeros({1}, at::kByte);
    try {
      comm->recv(other, 1, 7);
    } catch (const std::runtime_error& e) {
      result += fmt::format("tag 7 timed out (usable: {})\n",
                            std::string(e.what()).find("stays usable") != std::string::npos);
    }
    comm->set_timeout(5s);
    at::Tensor got = at::zeros({16}, at::kByte);
    comm->recv(got, 1, 5);
    const int first = got[0].item<int>();
    comm->recv(got, 1, 5);
    const int second = got[0].item<int>();
    client->set("done", {});
    return result + fmt::format("first {} second {}", first, second);
  });
  EXPECT_EQ(statuses, (std::vector<int>{0, 0}))
      << read_file(dir / "rank0.txt") << read_file(dir / "rank1.txt");
  EXPECT_EQ(read_file(dir / "rank0.txt"), "tag 7 timed out (usable: true)\nfirst 1 second 2");
}

// The same with A alone: the recv of tag 5 times out although A has arrived.
TEST(TcpStreams, FakePeerMessageHalfReadAtATimeoutIsFoundByTheNextRecv) {
  const auto dir = vimo::testing::fresh_test_dir("tcp_streams", "fake_spill");
  const Store store;
  const std::string key = "tcp/fake_spill";
  const std::vector<int> statuses = run_ranks(2, dir, 60s, [&](int rank) -> std::string {
    auto client = store.connect(rank);
    if (rank == 1) {
      const int fd = join_as_rank_one(*client, key);
      if (fd < 0) return "could not join";
      write_all(fd, frame_header(5, 16) + std::string(8, '\1'));
      std::this_thread::sleep_for(1500ms);
      write_all(fd, std::string(8, '\1'));
      client->get("done", 30s);
      ::close(fd);
      return "wrote";
    }
    auto comm = vimo::comm::make_tcp_communicator(*client, key, 0, 2, kToken, 30s);
    std::string result;
    std::this_thread::sleep_for(300ms);
    comm->set_timeout(500ms);
    at::Tensor other = at::zeros({1}, at::kByte);
    try {
      comm->recv(other, 1, 7);
    } catch (const std::runtime_error& e) {
      result += "tag 7 timed out\n";
    }
    comm->set_timeout(3s);
    at::Tensor got = at::zeros({16}, at::kByte);
    const auto start = std::chrono::steady_clock::now();
    try {
      comm->recv(got, 1, 5);
      result += fmt::format("tag 5 received {}", got[0].item<int>());
    } catch (const std::runtime_error& e) {
      result += fmt::format("tag 5 failed after {:.1f} s: {}\n", seconds_since(start), e.what());
      comm->recv(got, 1, 5);
      result += fmt::format("the next recv of tag 5 got {} at once", got[0].item<int>());
    }
    client->set("done", {});
    return result;
  });
  EXPECT_EQ(statuses, (std::vector<int>{0, 0}))
      << read_file(dir / "rank0.txt") << read_file(dir / "rank1.txt");
  EXPECT_EQ(read_file(dir / "rank0.txt"), "tag 7 timed out\ntag 5 received 1");
}

// A frame that no receive awaits, claiming 512 GiB (over the 16 GiB such a frame may hold): the call fails
// with a std::runtime_error naming the claim, and the communicator is unusable. (The first version tried to
// allocate it, and std::bad_alloc escaped the exchange.)
TEST(TcpStreams, FakePeerClaimingAHugeFrame) {
  const auto dir = vimo::testing::fresh_test_dir("tcp_streams", "fake_huge");
  const Store store;
  const std::string key = "tcp/fake_huge";
  const std::vector<int> statuses = run_ranks(2, dir, 60s, [&](int rank) -> std::string {
    auto client = store.connect(rank);
    if (rank == 1) {
      const int fd = join_as_rank_one(*client, key);
      if (fd < 0) return "could not join";
      write_all(fd, frame_header(5, uint64_t{1} << 39));  // 512 GiB: under what a header may claim
      client->get("done", 30s);
      ::close(fd);
      return "wrote";
    }
    auto comm = vimo::comm::make_tcp_communicator(*client, key, 0, 2, kToken, 30s);
    comm->set_timeout(2s);
    std::string result;
    at::Tensor other = at::zeros({1}, at::kByte);
    for (int call = 0; call < 2; ++call) {
      try {
        comm->recv(other, 1, 7);
        result += "received?\n";
      } catch (const std::runtime_error& e) {
        result += fmt::format("runtime_error: {}\n", e.what());
      } catch (const std::exception& e) {
        result += fmt::format("other exception: {}\n", e.what());
      }
    }
    client->set("done", {});
    return result;
  });
  EXPECT_EQ(statuses, (std::vector<int>{0, 0}))
      << read_file(dir / "rank0.txt") << read_file(dir / "rank1.txt");
  const std::string result = read_file(dir / "rank0.txt");
  EXPECT_EQ(result.find("other exception"), std::string::npos) << result;
  EXPECT_NE(result.find("sent a frame of 549755813888 bytes (tag 5) that no receive awaits"),
            std::string::npos)
      << result;
  EXPECT_NE(result.find("refused: this communicator is unusable"), std::string::npos) << result;
}

// Edge shapes over 4 ranks: fewer elements than ranks, no elements, 0-dim, half types, non-contiguous views,
// a split in reversed key order, and a Work that outlives its communicator.
TEST(TcpStreams, EdgeShapesOverFourRanks) {
  const auto dir = vimo::testing::fresh_test_dir("tcp_streams", "edges");
  const Store store;
  const std::vector<int> statuses = run_ranks(4, dir, 120s, [&](int rank) -> std::string {
    auto client = store.connect(rank);
    auto comm = vimo::comm::make_tcp_communicator(*client, "tcp/edges", rank, 4, kToken, 30s);
    std::string bad;
    for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16, at::kLong}) {
      for (int64_t n : {0, 1, 3, 5}) {
        at::Tensor x = at::full({n}, rank + 1, at::TensorOptions().dtype(dtype));
        comm->allreduce(x, ReduceOp::Sum);
        if (n > 0 && !at::equal(x, at::full({n}, 10, x.options())))
          bad += fmt::format("allreduce {} {}; ", n, (int)dtype);
        at::Tensor m = at::full({n}, rank + 1, at::TensorOptions().dtype(dtype));
        comm->allreduce(m, ReduceOp::Max);
        if (n > 0 && !at::equal(m, at::full({n}, 4, m.options()))) bad += fmt::format("max {}; ", n);
      }
    }
    at::Tensor scalar = at::scalar_tensor(rank + 1.0, at::kDouble);
    comm->allreduce(scalar, ReduceOp::Avg);
    if (scalar.item<double>() != 2.5) bad += "0-dim avg; ";
    at::Tensor b = at::scalar_tensor(rank == 3 ? 7.0 : 0.0);
    comm->broadcast(b, 3);
    if (b.item<double>() != 7.0) bad += "0-dim broadcast; ";
    at::Tensor storage = at::full({3, 2}, rank + 1.0);
    at::Tensor view = storage.t();
    comm->allreduce(view, ReduceOp::Sum);
    if (!at::equal(storage, at::full({3, 2}, 10.0))) bad += "view; ";
    const at::Tensor gathered = comm->allgather(at::zeros({0, 3}));
    if (gathered.size(0) != 0) bad += "allgather 0 rows; ";
    const at::Tensor rs = comm->reduce_scatter(at::full({4}, rank + 1, at::kHalf), ReduceOp::Sum);
    if (rs.numel() != 1 || rs.item<float>() != 10) bad += "reduce_scatter 4; ";
    auto half = comm->split(rank % 2, -rank);
    at::Tensor hx = at::full({2}, rank);
    half->allreduce(hx, ReduceOp::Sum);
    if (hx[0].item<float>() != (rank % 2 == 0 ? 2 : 4)) bad += "split; ";
    if (half->rank() != (rank < 2 ? 1 : 0)) bad += fmt::format("split rank {}; ", half->rank());
    at::Tensor later = at::ones({1000});
    auto work = comm->allreduce_async(later, ReduceOp::Sum);
    comm.reset();
    work->wait();
    if (later[0].item<float>() != 4) bad += "work after reset; ";
    return bad.empty() ? "ok" : bad;
  });
  EXPECT_EQ(statuses, (std::vector<int>(4, 0)));
  for (int r = 0; r < 4; ++r) EXPECT_EQ(read_file(dir / fmt::format("rank{}.txt", r)), "ok") << r;
}

}  // namespace
