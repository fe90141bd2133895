// The TCP rendezvous store on loopback, without MPI: a StoreServer in the test process and clients in forked
// child processes (each a real peer with its own connection), plus raw sockets that break the protocol: peers
// that speak it wrongly to the server, and fake servers that answer a real client wrongly or come up late.
// What the server logs is captured from spdlog's default logger. Every server listens on an ephemeral port,
// so parallel test runs never collide.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "comm/store.h"
#include "comm/store_protocol.h"
#include "tests/test_support.h"

namespace {
using namespace std::chrono_literals;
using vimo::comm::StoreClient;
using vimo::comm::StoreClientOptions;
using vimo::comm::StoreLimits;
using vimo::comm::StoreServer;
using vimo::comm::StoreServerOptions;
using vimo::testing::expect_error;

const std::string kToken = "job-42-secret";

std::vector<uint8_t> bytes(std::string_view text) { return {text.begin(), text.end()}; }
std::string text(const std::vector<uint8_t>& data) { return {data.begin(), data.end()}; }

// 127.0.0.1:port (0: any port, for bind).
sockaddr_in loopback(uint16_t port = 0) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return address;
}

StoreServerOptions server_options() {
  StoreServerOptions options;
  options.host = "127.0.0.1";
  options.token = kToken;
  options.handshake_timeout = 500ms;
  return options;
}

StoreClientOptions client_options(uint16_t port, int rank, const std::string& token = kToken) {
  StoreClientOptions options;
  options.host = "127.0.0.1";
  options.port = port;
  options.token = token;
  options.rank = rank;
  options.connect_timeout = 5s;
  options.operation_timeout = 5s;
  return options;
}

// Runs `body` in a child process, which exits with its result (0 = success); an exception becomes 90 with the
// message on stderr, and alarm() kills a child that hangs, so waiting for it always ends.
pid_t spawn(const std::function<int()>& body) {
  const pid_t pid = fork();
  if (pid != 0) return pid;
  alarm(30);
  int code = 91;
  try {
    code = body();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "child %d: %s\n", getpid(), e.what());
    code = 90;
  }
  std::fflush(stderr);
  _exit(code);  // no destructors or atexit handlers of the parent's copy (its server, gtest)
}

// The child's exit code, or 128 + the signal that killed it.
int wait_for(pid_t pid) {
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// A child's check: prints what failed and returns 1, or returns 0.
int expect_in_child(bool ok, const std::string& what) {
  if (ok) return 0;
  std::fprintf(stderr, "child %d: %s\n", getpid(), what.c_str());
  return 1;
}

// Polls a condition owned by another thread or process until it holds or `timeout` passes.
bool eventually(const std::function<bool()>& condition, std::chrono::milliseconds timeout = 5s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!condition()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// A raw TCP connection to the store, for speaking the protocol wrongly on purpose.
class RawPeer {
 public:
  explicit RawPeer(uint16_t port) : fd_(socket(AF_INET, SOCK_STREAM, 0)) {
    sockaddr_in address = loopback(port);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
    const timeval limit{3, 0};  // a server that never answers fails the test instead of hanging it
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
  }
  ~RawPeer() { close(fd_); }
  bool connected() const { return connected_; }

  void send_bytes(const std::vector<uint8_t>& data) {
    ASSERT_EQ(send(fd_, data.data(), data.size(), MSG_NOSIGNAL), static_cast<ssize_t>(data.size()));
  }
  // Everything the server sends until it closes the connection; nullopt when it is still open after 3 s.
  std::optional<std::vector<uint8_t>> read_until_closed() {
    std::vector<uint8_t> received;
    uint8_t buffer[4096];
    while (true) {
      const ssize_t n = recv(fd_, buffer, sizeof(buffer), 0);
      if (n > 0) {
        received.insert(received.end(), buffer, buffer + n);
      } else if (n == 0 || errno == ECONNRESET) {
        return received;
      } else {
        return std::nullopt;  // EAGAIN: the limit passed with the connection open
      }
    }
  }

 private:
  int fd_;
  bool connected_ = false;
};

// A frame as Note [Rendezvous protocol] lays it out; `claimed` overrides the length in the header.
std::vector<uint8_t> frame(uint8_t type, const std::vector<std::string>& fields,
                           std::optional<uint32_t> claimed = std::nullopt) {
  std::vector<uint8_t> payload;
  for (const std::string& field : fields) {
    const auto size = static_cast<uint32_t>(field.size());
    for (int i = 0; i < 4; ++i) payload.push_back(static_cast<uint8_t>(size >> (8 * i)));
    payload.insert(payload.end(), field.begin(), field.end());
  }
  const uint32_t length = claimed.value_or(static_cast<uint32_t>(payload.size()));
  std::vector<uint8_t> result = {vimo::comm::kStoreProtocolVersion, type, 0, 0};
  for (int i = 0; i < 4; ++i) result.push_back(static_cast<uint8_t>(length >> (8 * i)));
  result.insert(result.end(), payload.begin(), payload.end());
  return result;
}
constexpr uint8_t kHello = 1;
constexpr uint8_t kSet = 2;
constexpr uint8_t kGet = 3;
constexpr uint8_t kOk = 64;
constexpr uint8_t kValue = 65;
constexpr uint8_t kError = 69;

// Every line spdlog's default logger writes while this lives ("warning <message>"), read under the sink's
// lock. The store server logs through the default logger from its io thread, so make the capture before the
// server and destroy it after: the thread never sees the logger change.
class LogCapture {
 public:
  LogCapture() : previous_(spdlog::default_logger()), sink_(std::make_shared<Sink>()) {
    auto logger = std::make_shared<spdlog::logger>("capture", sink_);
    logger->set_level(spdlog::level::debug);
    spdlog::set_default_logger(logger);
  }
  ~LogCapture() { spdlog::set_default_logger(previous_); }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;

  std::vector<std::string> lines() const { return sink_->lines(); }
  // The first line that contains every one of `parts`, or nullopt.
  std::optional<std::string> find(const std::vector<std::string>& parts) const {
    for (const std::string& line : lines()) {
      bool all = true;
      for (const std::string& part : parts) all = all && line.find(part) != std::string::npos;
      if (all) return line;
    }
    return std::nullopt;
  }

 private:
  class Sink : public spdlog::sinks::base_sink<std::mutex> {
   public:
    std::vector<std::string> lines() {
      std::lock_guard<std::mutex> lock(mutex_);
      return lines_;
    }

   protected:
    void sink_it_(const spdlog::details::log_msg& message) override {
      const auto level = spdlog::level::to_string_view(message.level);
      lines_.push_back(std::string(level.data(), level.size()) + " " +
                       std::string(message.payload.data(), message.payload.size()));
    }
    void flush_() override {}

   private:
    std::vector<std::string> lines_;
  };
  std::shared_ptr<spdlog::logger> previous_;
  std::shared_ptr<Sink> sink_;
};

// A listening TCP socket on a loopback port, for playing the store's part by hand. Bound at once (the port is
// this object's from then on); listens only when told, so that until then connects to it are refused.
class RawListener {
 public:
  explicit RawListener(bool listening = true) : fd_(socket(AF_INET, SOCK_STREAM, 0)) {
    // Inherited by the connections it accepts: one it closes before the peer does stays in TIME_WAIT for a
    // minute, and Linux lets a later server (which sets SO_REUSEADDR) bind the port over it only when both
    // sockets set the option.
    const int reuse = 1;
    setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &reuse, sizeof(reuse));
    sockaddr_in address = loopback();
    bound_ = bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
    socklen_t length = sizeof(address);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length);
    port_ = ntohs(address.sin_port);
    if (listening) listen();
  }
  ~RawListener() { stop(); }
  RawListener(const RawListener&) = delete;
  RawListener& operator=(const RawListener&) = delete;

  bool ok() const { return bound_ && fd_ >= 0; }
  uint16_t port() const { return port_; }
  bool listen() { return ::listen(fd_, 8) == 0; }
  // Closes the socket: connects are refused again and the port is free.
  void stop() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }
  // The next connection, or -1 when none came within 5 s. The caller closes it.
  int accept_one() {
    pollfd waiting{fd_, POLLIN, 0};
    if (poll(&waiting, 1, 5000) != 1) return -1;
    const int connection = accept(fd_, nullptr, nullptr);
    const timeval limit{5, 0};  // a client that never sends fails the test instead of hanging it
    setsockopt(connection, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit));
    return connection;
  }

 private:
  int fd_;
  bool bound_ = false;
  uint16_t port_ = 0;
};

// Reads one whole frame from `fd`; returns its type, or nullopt when the peer closed or said nothing.
std::optional<uint8_t> read_frame(int fd) {
  const auto read_exactly = [fd](uint8_t* data, size_t size) {
    for (size_t done = 0; done < size;) {
      const ssize_t n = recv(fd, data + done, size - done, 0);
      if (n <= 0) return false;
      done += static_cast<size_t>(n);
    }
    return true;
  };
  uint8_t header[8];
  if (!read_exactly(header, sizeof(header))) return std::nullopt;
  uint32_t length = 0;
  for (int i = 0; i < 4; ++i) length |= static_cast<uint32_t>(header[4 + i]) << (8 * i);
  std::vector<uint8_t> payload(length);  // the client's own frames: small
  if (!read_exactly(payload.data(), payload.size())) return std::nullopt;
  return header[1];
}

bool send_all(int fd, const std::vector<uint8_t>& data) {
  return send(fd, data.data(), data.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(data.size());
}

TEST(Store, SetGetAddCheckAndErrorsInOneProcess) {
  StoreServer server(server_options());
  ASSERT_NE(server.port(), 0);
  StoreClient client(client_options(server.port(), 0));
  const std::string where = "rendezvous store at 127.0.0.1:" + std::to_string(server.port());
  EXPECT_EQ(client.endpoint(), "127.0.0.1:" + std::to_string(server.port()));

  client.set("a", bytes("first"));
  client.set("a", bytes("second"));
  EXPECT_EQ(text(client.get("a")), "second");
  client.set("empty", {});
  EXPECT_TRUE(client.get("empty").empty());
  EXPECT_TRUE(client.check({"a", "empty"}));
  EXPECT_FALSE(client.check({"a", "nothing"}));
  EXPECT_EQ(client.add("counter", 5), 5);
  EXPECT_EQ(client.add("counter", -7), -2);
  EXPECT_EQ(text(client.get("counter")), "-2");
  client.wait({"a", "counter"}, 100ms);

  // Errors the server reports keep the connection usable.
  expect_error([&] { client.add("a", 1); }, {where, "add to counter 'a'", "not an integer counter"});
  expect_error([&] { client.get("nothing", 200ms); },
               {where, "get of key 'nothing' timed out after 200 ms: no rank set it"});
  expect_error(
      [&] {
        client.wait({"a", "x", "y"}, 100ms);
      },
      {where, "wait for 3 keys timed out after 100 ms: 2 of 3 keys missing: 'x', 'y'"});
  expect_error([&] { client.set(std::string(5000, 'k'), bytes("v")); },
               {where, "has 5000 bytes, over the limit"});
  expect_error([&] { client.barrier("b", 2, 100ms); }, {"barrier 'b' timed out", "missing ranks: 1"});
  EXPECT_EQ(text(client.get("a")), "second");
  EXPECT_EQ(server.rejected_connections(), 0u);
  EXPECT_EQ(server.waiting_requests(), 0u);
}

TEST(Store, ConcurrentAddsFromManyProcessesSumExactly) {
  StoreServer server(server_options());
  constexpr int kProcesses = 6;
  constexpr int kAddsEach = 100;
  std::vector<pid_t> children;
  for (int rank = 0; rank < kProcesses; ++rank) {
    children.push_back(spawn([&, rank] {
      StoreClient client(client_options(server.port(), rank));
      int64_t previous = 0;
      for (int i = 0; i < kAddsEach; ++i) {
        const int64_t now = client.add("sum", rank + 1);
        if (now <= previous) return expect_in_child(false, "the counter went back");
        previous = now;
      }
      return 0;
    }));
  }
  for (pid_t child : children) EXPECT_EQ(wait_for(child), 0);
  StoreClient client(client_options(server.port(), -1));
  EXPECT_EQ(client.add("sum", 0), int64_t{kAddsEach} * kProcesses * (kProcesses + 1) / 2);
}

TEST(Store, GetBlocksUntilAnotherProcessSets) {
  StoreServer server(server_options());
  const pid_t reader = spawn([&] {
    StoreClient client(client_options(server.port(), 0));
    const std::string value = text(client.get("payload", 10s));
    return expect_in_child(value == "from the writer", "get returned '" + value + "'");
  });
  // The key does not exist until the reader is parked on the server; only then does the writer start.
  ASSERT_TRUE(eventually([&] { return server.waiting_requests() == 1; })) << "the reader never waited";
  const pid_t writer = spawn([&] {
    StoreClient client(client_options(server.port(), 1));
    client.set("payload", bytes("from the writer"));
    return 0;
  });
  EXPECT_EQ(wait_for(writer), 0);
  EXPECT_EQ(wait_for(reader), 0);
  EXPECT_EQ(server.waiting_requests(), 0u);
}

TEST(Store, BarrierReleasesRanksOnlyWhenAllArriveAndCanBeReused) {
  StoreServer server(server_options());
  constexpr int kWorld = 4;
  std::vector<pid_t> children;
  for (int rank = 0; rank < kWorld; ++rank) {
    children.push_back(spawn([&, rank] {
      StoreClient client(client_options(server.port(), rank));
      for (const char* round : {"arrived-1", "arrived-2"}) {
        // In the second round the last rank comes only when the test says so (below).
        if (rank == kWorld - 1 && round == std::string("arrived-2")) client.get("go", 10s);
        client.add(round, 1);
        client.barrier("step", kWorld, 10s);
        // Nobody leaves before everybody has counted itself in.
        const std::string arrived = text(client.get(round));
        if (arrived != std::to_string(kWorld))
          return expect_in_child(false, "passed with " + arrived + " arrived");
      }
      return 0;
    }));
  }
  // The second round of the reused name holds the other ranks (their barrier waits) until the last one comes,
  // which is itself waiting for "go".
  EXPECT_TRUE(eventually([&] { return server.waiting_requests() == kWorld; }))
      << "ranks passed the second round without the last rank";
  StoreClient(client_options(server.port(), -1)).set("go", {});
  for (pid_t child : children) EXPECT_EQ(wait_for(child), 0);
}

TEST(Store, BarrierTimeoutNamesTheMissingRank) {
  StoreServer server(server_options());
  const std::string where = "rendezvous store at 127.0.0.1:" + std::to_string(server.port());
  std::vector<pid_t> children;
  for (int rank : {0, 1, 3}) {  // rank 2 never comes
    children.push_back(spawn([&, rank] {
      StoreClient client(client_options(server.port(), rank));
      try {
        client.barrier("init", 4, 1s);
      } catch (const std::runtime_error& e) {
        const std::string message = e.what();
        return expect_in_child(
            message.find(where +
                         ": barrier 'init' timed out after 1 s: 3 of 4 ranks arrived; missing ranks: 2") !=
                std::string::npos,
            "unexpected message: " + message);
      }
      return expect_in_child(false, "the barrier passed without rank 2");
    }));
  }
  for (pid_t child : children) EXPECT_EQ(wait_for(child), 0);
}

// The server logs each refusal (and the peer's address and name), never either token.
TEST(Store, WrongTokenIsRefusedLoggedAndOthersKeepWorking) {
  const LogCapture log;
  StoreServer server(server_options());
  StoreClient good(client_options(server.port(), 0));
  good.set("before", bytes("1"));
  const pid_t intruder = spawn([&] {
    const auto start = std::chrono::steady_clock::now();
    try {
      StoreClient client(client_options(server.port(), 1, "not-the-token"));
    } catch (const std::runtime_error& e) {
      const std::string message = e.what();
      const bool fast = std::chrono::steady_clock::now() - start < 2s;  // refused, not retried until 5 s
      return expect_in_child(
          message.find("refused this peer: authentication failed") != std::string::npos && fast,
          "unexpected message or delay: " + message);
    }
    return expect_in_child(false, "a wrong token was accepted");
  });
  EXPECT_EQ(wait_for(intruder), 0);
  EXPECT_EQ(server.rejected_connections(), 1u);
  EXPECT_EQ(text(good.get("before")), "1");
  // The count goes up just before the line is written, on the server's thread: wait for the line.
  const std::vector<std::string> refusal = {
      "warning rendezvous store: closing the connection from 127.0.0.1:",
      ": wrong token from a peer calling itself 'rank 1'"};
  EXPECT_TRUE(eventually([&] { return log.find(refusal).has_value(); }))
      << "the refusal was not logged; the log has " << log.lines().size() << " lines";
  for (const std::string& line : log.lines()) {
    EXPECT_EQ(line.find(kToken), std::string::npos) << "the log shows the job's token: " << line;
    EXPECT_EQ(line.find("not-the-token"), std::string::npos) << "the log shows the peer's token: " << line;
  }
  StoreServerOptions no_token = server_options();
  no_token.token.clear();
  expect_error([&] { StoreServer refused(no_token); }, {"the token is empty", "HINT:"});
}

TEST(Store, MalformedMessagesCloseOnlyTheirConnection) {
  StoreServer server(server_options());
  StoreClient good(client_options(server.port(), 0));
  size_t expected_rejections = 0;
  // Sends `data` (after a valid handshake when `authenticate`), then expects an Error reply and a close.
  auto expect_rejected = [&](const std::string& what, const std::vector<uint8_t>& data, bool authenticate) {
    SCOPED_TRACE(what);
    RawPeer peer(server.port());
    ASSERT_TRUE(peer.connected());
    if (authenticate) {
      peer.send_bytes(frame(kHello, {kToken, "raw peer"}));
    }
    peer.send_bytes(data);
    const std::optional<std::vector<uint8_t>> received = peer.read_until_closed();
    ASSERT_TRUE(received) << "the server left the connection open";
    const size_t error_at = authenticate ? 8 : 0;  // after the handshake's Ok, which has no payload
    if (authenticate) {
      ASSERT_GE(received->size(), 8u);
      EXPECT_EQ((*received)[1], kOk);
    }
    if (received->size() > error_at + 1) {  // a reset may drop the Error frame; the close is what matters
      EXPECT_EQ((*received)[error_at + 1], kError);
    }
    EXPECT_EQ(server.rejected_connections(), ++expected_rejections);
    // The server keeps serving everybody else.
    good.set("alive", bytes(what));
    EXPECT_EQ(text(good.get("alive")), what);
  };
  expect_rejected("garbage instead of a header", bytes("GARBAGE!"), false);
  expect_rejected("a request before the handshake", frame(kSet, {"k", "v"}), false);
  expect_rejected("a huge hello", frame(kHello, {}, 0xFFFFFFF0u), false);
  expect_rejected("a huge set", frame(kSet, {}, 0xFFFFFFF0u), true);
  expect_rejected("a value just over the limit", frame(kSet, {}, 64u * 1024 * 1024 + 4096 + 65), true);
  std::vector<uint8_t> overrun = frame(kSet, {"key", "value"});
  overrun[8] = 200;  // the key claims 200 bytes of a 16-byte payload
  expect_rejected("a field running past its frame", overrun, true);
  expect_rejected("trailing bytes", frame(kSet, {"key", "value", "extra"}), true);
  expect_rejected("an unknown type", frame(42, {}), true);
  std::vector<uint8_t> wrong_version = frame(kSet, {"k", "v"});
  wrong_version[0] = 7;
  expect_rejected("another protocol version", wrong_version, true);

  // A peer that connects and says nothing is closed after the handshake timeout.
  RawPeer silent(server.port());
  ASSERT_TRUE(silent.connected());
  EXPECT_TRUE(silent.read_until_closed()) << "a silent peer was kept past the handshake timeout";
  EXPECT_EQ(server.rejected_connections(), ++expected_rejections);
}

TEST(Store, ServerGoingAwayFailsAWaitingClient) {
  auto server = std::make_unique<StoreServer>(server_options());
  const uint16_t port = server->port();
  const pid_t reader = spawn([&] {
    StoreClient client(client_options(port, 0));
    try {
      client.get("never", 20s);
    } catch (const std::runtime_error& e) {
      const std::string message = e.what();
      return expect_in_child(message.find("get of key 'never'") != std::string::npos &&
                                 message.find("timed out") == std::string::npos,
                             "unexpected message: " + message);
    }
    return expect_in_child(false, "get returned");
  });
  ASSERT_TRUE(eventually([&] { return server->waiting_requests() == 1; }));
  server.reset();
  EXPECT_EQ(wait_for(reader), 0);
}

TEST(Store, ConnectingToNothingRetriesUntilTheDeadline) {
  // A port that was free a moment ago: bind an ephemeral one and release it.
  const int probe = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address = loopback();
  ASSERT_EQ(bind(probe, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  socklen_t length = sizeof(address);
  ASSERT_EQ(getsockname(probe, reinterpret_cast<sockaddr*>(&address), &length), 0);
  const uint16_t port = ntohs(address.sin_port);
  close(probe);

  StoreClientOptions options = client_options(port, 0);
  options.connect_timeout = 1s;
  const auto start = std::chrono::steady_clock::now();
  std::string message;
  try {
    StoreClient client(options);
  } catch (const std::runtime_error& e) {
    message = e.what();
  }
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_NE(message.find("rendezvous store at 127.0.0.1:" + std::to_string(port) +
                         ": could not connect within 1 s"),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("attempts); last error: Connection refused. HINT:"), std::string::npos) << message;
  // Backoff 10, 20, 40, ... ms: about 7 attempts fit in 1 s; one attempt would mean no retrying.
  const size_t count_at = message.find(" (") + 2;
  EXPECT_GE(std::stoi(message.substr(count_at)), 4) << message;
  EXPECT_GE(elapsed, 900ms) << "gave up before the deadline";
  EXPECT_LE(elapsed, 2500ms) << "overran the deadline";
}

// Note [Rendezvous protocol]: a reply's header is checked against the client's limit before its payload is
// allocated or read. A fake store answers the handshake, then a Get with a header that claims more than the
// limit and sends no payload: the client must fail at once, naming the size and the limit (a client that
// allocated and read would wait for bytes that never come and report a timeout instead).
TEST(Store, AReplyOverTheClientsLimitFailsBeforeItIsRead) {
  StoreLimits small;  // a frame of at most 1024 + 64 + 64 = 1152 bytes
  small.max_key_bytes = 64;
  small.max_value_bytes = 1024;
  // Just over a small limit first (a client without the check would only wait), then 4 GiB - 1 against the
  // default limit (one with it would try to allocate that).
  for (const auto& [limits, claimed] :
       std::vector<std::pair<StoreLimits, uint32_t>>{{small, 1153u}, {StoreLimits{}, 0xFFFFFFFFu}}) {
    SCOPED_TRACE(::testing::Message() << claimed << " bytes claimed");
    RawListener fake;
    ASSERT_TRUE(fake.ok());
    StoreClientOptions options = client_options(fake.port(), 0);
    options.limits = limits;
    options.operation_timeout = 2s;
    std::string first_error, second_error;
    std::jthread client_thread([&] {  // joined on every way out, also a failed ASSERT
      try {
        StoreClient client(options);
        try {
          client.get("k", 1s);
        } catch (const std::runtime_error& e) {
          first_error = e.what();
        }
        client.set("after", bytes("x"));
      } catch (const std::runtime_error& e) {
        second_error = e.what();
      }
    });
    const int connection = fake.accept_one();
    ASSERT_GE(connection, 0) << "the client never connected";
    EXPECT_EQ(read_frame(connection), kHello);
    EXPECT_TRUE(send_all(connection, frame(kOk, {})));
    EXPECT_EQ(read_frame(connection), kGet);
    EXPECT_TRUE(send_all(connection, frame(kValue, {}, claimed)));  // a header, and no payload
    client_thread.join();  // the connection stays open until the client is done
    close(connection);
    const std::string where = "rendezvous store at 127.0.0.1:" + std::to_string(fake.port());
    ASSERT_NE(first_error.find(where + ": get of key 'k': a reply of " + std::to_string(claimed) +
                               " bytes, over the limit of " + std::to_string(limits.max_frame_bytes())),
              std::string::npos)
        << first_error;
    // The connection is closed after that, and says so.
    EXPECT_NE(second_error.find("closed after an earlier error (a reply of"), std::string::npos)
        << second_error;
    EXPECT_NE(second_error.find("create a new client"), std::string::npos) << second_error;
  }
}

// The client retries its connect with backoff, so rank 0 may start its store after the others. Here the port
// first refuses connects (bound, not listening), then accepts and drops two (the client must have retried
// after a failure to make the second), and only then does the real server come up on it, while the client
// is backing off: the client connects and works.
TEST(Store, AServerComingUpDuringTheBackoffIsReached) {
  RawListener early(/*listening=*/false);
  ASSERT_TRUE(early.ok());
  const uint16_t port = early.port();
  StoreClientOptions options = client_options(port, 0);
  options.connect_timeout = 30s;  // long enough for a loaded machine: the test ends with the connect
  std::string error;
  bool connected = false;
  std::jthread client_thread([&] {  // joined on every way out, also a failed ASSERT
    try {
      StoreClient client(options);
      client.set("late", bytes("but there"));
      connected = true;
    } catch (const std::runtime_error& e) {
      error = e.what();
    }
  });
  std::this_thread::sleep_for(100ms);  // some refused attempts (not checked: they leave no trace)
  ASSERT_TRUE(early.listen());
  for (int attempt = 1; attempt <= 2; ++attempt) {
    const int connection = early.accept_one();
    EXPECT_GE(connection, 0) << "attempt " << attempt << " never came: the client stopped retrying";
    if (connection >= 0) close(connection);  // the handshake fails: the client backs off and tries again
  }
  early.stop();
  StoreServerOptions late = server_options();
  late.port = port;
  StoreServer server(late);
  client_thread.join();
  ASSERT_TRUE(connected) << error;
  StoreClient reader(client_options(port, 1));
  EXPECT_EQ(text(reader.get("late", 1s)), "but there");
  EXPECT_EQ(server.rejected_connections(), 0u);
}

// Note [A connection to itself]: a socket bound to a port and connected to that same port is its own peer
// (TCP's simultaneous open, which a connect retried through the ephemeral range can also reach). The client's
// check must see it, and must not see it in an ordinary connection's ends or in a socket never connected.
TEST(Store, AConnectionToItselfIsRecognized) {
  const int self = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address = loopback();
  ASSERT_EQ(bind(self, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  socklen_t length = sizeof(address);
  getsockname(self, reinterpret_cast<sockaddr*>(&address), &length);
  ASSERT_EQ(connect(self, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0) << std::strerror(errno);
  EXPECT_TRUE(vimo::comm::store_detail::connected_to_itself(self));
  close(self);

  RawListener listener;
  ASSERT_TRUE(listener.ok());
  const int client = socket(AF_INET, SOCK_STREAM, 0);
  EXPECT_FALSE(vimo::comm::store_detail::connected_to_itself(client)) << "not connected yet";
  address.sin_port = htons(listener.port());
  ASSERT_EQ(connect(client, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0)
      << std::strerror(errno);
  const int accepted = listener.accept_one();
  EXPECT_FALSE(vimo::comm::store_detail::connected_to_itself(client));
  EXPECT_FALSE(vimo::comm::store_detail::connected_to_itself(accepted));
  close(accepted);
  close(client);
}

// Note [A failed accept]: with rank 0 out of descriptors, an accept fails while its connection stays queued.
// The server must neither spin on it (before: a warning per failure, about a million lines in 3 s at a full
// core) nor give up: once descriptors are free again, a client is served. The server runs in a child whose
// open-file limit leaves room for 24 more descriptors; the parent holds 80 connections to it for a second.
TEST(Store, AcceptFailingForWantOfDescriptorsNeitherSpinsNorStops) {
  int to_parent[2], to_child[2];
  ASSERT_EQ(pipe(to_parent), 0);
  ASSERT_EQ(pipe(to_child), 0);
  const pid_t child = fork();
  if (child == 0) {
    int64_t warnings = -1;
    {
      LogCapture log;
      const auto open_now = static_cast<rlim_t>(std::distance(
          std::filesystem::directory_iterator("/proc/self/fd"), std::filesystem::directory_iterator{}));
      const rlimit limit{open_now + 24, open_now + 24};
      if (setrlimit(RLIMIT_NOFILE, &limit) != 0) _exit(2);
      StoreServer server(server_options());
      const uint16_t port = server.port();
      if (write(to_parent[1], &port, sizeof(port)) != sizeof(port)) _exit(3);
      char go = 0;
      if (read(to_child[0], &go, 1) != 1) _exit(4);  // the parent is done
      warnings = 0;
      for (const std::string& line : log.lines()) warnings += line.find("accept failed") != std::string::npos;
    }
    if (write(to_parent[1], &warnings, sizeof(warnings)) != sizeof(warnings)) _exit(5);
    _exit(0);
  }
  uint16_t port = 0;
  ASSERT_EQ(read(to_parent[0], &port, sizeof(port)), static_cast<ssize_t>(sizeof(port)));
  std::vector<int> held;
  for (int i = 0; i < 80; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address = loopback(port);
    EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0) << std::strerror(errno);
    held.push_back(fd);
  }
  std::this_thread::sleep_for(1s);  // the server runs out of descriptors, again and again
  for (const int fd : held) close(fd);
  {
    StoreClient client(client_options(port, 0));
    client.set("after", bytes("descriptors"));
    EXPECT_EQ(text(client.get("after", 1s)), "descriptors");
  }
  EXPECT_EQ(write(to_child[1], "x", 1), 1);
  int64_t warnings = -1;
  EXPECT_EQ(read(to_parent[0], &warnings, sizeof(warnings)), static_cast<ssize_t>(sizeof(warnings)));
  int status = 0;
  waitpid(child, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
  EXPECT_GE(warnings, 1) << "the failed accepts must be reported";
  EXPECT_LE(warnings, 3) << "one warning, then one per 100 failures (10 a second)";
  for (const int fd : {to_parent[0], to_parent[1], to_child[0], to_child[1]}) close(fd);
}

}  // namespace
