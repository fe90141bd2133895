// The harness of the TCP backend's tests (test_tcp_communicator.cpp, test_tcp_streams.cpp): ranks forked
// from the test process, meeting through a store it serves, with their results and logs in files; and the
// hello a rank sends, for tests that play a rank by hand.
#pragma once

#include <ATen/ATen.h>
#include <arpa/inet.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "comm/store.h"

namespace vimo::testing::tcp {

using namespace std::chrono_literals;

inline constexpr const char* kToken = "the-job-token";

// A store served by this process on an ephemeral port; the forked ranks connect to it.
struct Store {
  Store() {
    vimo::comm::StoreServerOptions options;
    options.host = "127.0.0.1";
    options.token = kToken;
    server = std::make_unique<vimo::comm::StoreServer>(options);
  }
  std::unique_ptr<vimo::comm::StoreClient> connect(int rank) const {
    vimo::comm::StoreClientOptions options;
    options.host = "127.0.0.1";
    options.port = server->port();
    options.token = kToken;
    options.rank = rank;
    return std::make_unique<vimo::comm::StoreClient>(options);
  }
  std::unique_ptr<vimo::comm::StoreServer> server;
};

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Forks `ranks` processes, each running body(rank) with its stdout and stderr in <dir>/rank<r>.err; what body
// returns (or the error it throws, prefixed "error: ") goes to <dir>/rank<r>.txt. Waits for all of them,
// killing any still running after `limit`; returns each one's exit status (0: body returned, 1: it threw, -1:
// killed).
inline std::vector<int> run_ranks(int ranks, const std::filesystem::path& dir, std::chrono::seconds limit,
                                  const std::function<std::string(int)>& body) {
  std::vector<pid_t> pids;
  for (int rank = 0; rank < ranks; ++rank) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      const std::string err = (dir / fmt::format("rank{}.err", rank)).string();
      // The log (spdlog's, on stdout) and errors both go to the file.
      if (std::freopen(err.c_str(), "w", stderr) == nullptr || ::dup2(::fileno(stderr), STDOUT_FILENO) < 0)
        ::_exit(3);
      at::set_num_threads(1);
      int status = 0;
      std::string result;
      try {
        result = body(rank);
      } catch (const std::exception& e) {
        result = std::string("error: ") + e.what();
        status = 1;
      }
      std::ofstream(dir / fmt::format("rank{}.txt", rank)) << result;
      std::fflush(stderr);
      ::_exit(status);
    }
    pids.push_back(pid);
  }
  std::vector<int> statuses(static_cast<size_t>(ranks), -1);
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (int left = ranks; left > 0;) {
    for (int rank = 0; rank < ranks; ++rank) {
      int status = 0;
      if (pids[rank] > 0 && ::waitpid(pids[rank], &status, WNOHANG) == pids[rank]) {
        statuses[rank] = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        pids[rank] = 0;
        --left;
      }
    }
    if (std::chrono::steady_clock::now() > deadline) {
      for (pid_t pid : pids) {
        if (pid > 0) {
          ::kill(pid, SIGKILL);
          ::waitpid(pid, nullptr, 0);
        }
      }
      break;
    }
    std::this_thread::sleep_for(5ms);
  }
  return statuses;
}

// A hello as tcp_mesh.cpp frames it, for the mesh of key `key`, from `rank`, with `token`.
// Connects to 127.0.0.1:port and writes `bytes` (a hello, say); returns the socket, or -1.
inline int connect_and_send(uint16_t port, const std::string& bytes) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  ::inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::write(fd, bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size())) {
    ::close(fd);
    return -1;
  }
  return fd;
}

inline std::string hello(const std::string& key, uint32_t rank, const std::string& token) {
  uint64_t id = 1469598103934665603ull;  // the mesh id: FNV-1a of the key, as make_tcp_communicator takes it
  for (unsigned char c : key) id = (id ^ c) * 1099511628211ull;
  const std::string where = "127.0.0.1\n127.0.0.1\n9";
  std::string bytes(28, '\0');
  const uint32_t magic = 0x4f4c4856, version = 1, length = static_cast<uint32_t>(token.size()),
                 where_length = static_cast<uint32_t>(where.size());
  std::memcpy(&bytes[0], &magic, 4);
  std::memcpy(&bytes[4], &version, 4);
  std::memcpy(&bytes[8], &id, 8);
  std::memcpy(&bytes[16], &rank, 4);
  std::memcpy(&bytes[20], &length, 4);
  std::memcpy(&bytes[24], &where_length, 4);
  return bytes + token + where;
}

// The port rank 0 of the mesh `key` listens on, read from the store.
inline uint16_t listening_port(vimo::comm::StoreClient& store, const std::string& key) {
  const std::vector<uint8_t> value = store.get(key + "/0", 30s);
  const std::string text(value.begin(), value.end());
  return static_cast<uint16_t>(std::stoi(text.substr(text.rfind('\n') + 1)));
}

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace vimo::testing::tcp
