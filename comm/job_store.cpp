// Forms the job's rendezvous store (rank 0 serves it, the others learn where), connects ranks to it, and
// passes a communicator's unique id through it.
#include "comm/job_store.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <vector>

namespace vimo::comm {

namespace {

std::string host_name() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "localhost";
  return name;
}

std::string random_token() {
  std::random_device device;
  return fmt::format("{:08x}{:08x}{:08x}{:08x}", device(), device(), device(), device());
}

// Rank 0's server on `port` (0: ephemeral), listening on every interface.
std::unique_ptr<StoreServer> serve(uint16_t port, const std::string& token) {
  StoreServerOptions options;
  options.port = port;
  options.token = token;
  return std::make_unique<StoreServer>(std::move(options));
}

// Loopback when this rank runs on the store's host: the name may not resolve inside a container.
std::string reachable(const std::string& store_host) {
  return store_host == host_name() ? "127.0.0.1" : store_host;
}

}  // namespace

std::unique_ptr<JobStore> start_job_store(Communicator& world, const std::string& token) {
  auto store = std::make_unique<JobStore>();
  constexpr int64_t kMessageBytes = 1024;  // "host\nport\ntoken", zero-padded
  at::Tensor message = at::zeros({kMessageBytes}, at::kByte);
  if (world.rank() == 0) {
    store->token = token.empty() ? random_token() : token;
    store->server = serve(0, store->token);
    const std::string text = fmt::format("{}\n{}\n{}", host_name(), store->server->port(), store->token);
    if (static_cast<int64_t>(text.size()) >= kMessageBytes) {
      throw std::runtime_error(fmt::format("start_job_store: host name and token take {} bytes, over {}",
                                           text.size(), kMessageBytes - 1));
    }
    std::memcpy(message.data_ptr<uint8_t>(), text.data(), text.size());
  }
  world.broadcast(message, 0);
  std::istringstream in(std::string(reinterpret_cast<const char*>(message.data_ptr<uint8_t>())));
  std::string host;
  int port = 0;
  if (!(in >> host >> port >> store->token) || port <= 0 || port > 65535) {
    throw std::runtime_error(
        fmt::format("[rank {}] start_job_store: rank 0 sent a malformed store address", world.rank()));
  }
  store->host = reachable(host);
  store->port = static_cast<uint16_t>(port);
  return store;
}

std::unique_ptr<JobStore> start_job_store(const LaunchEnvironment& env) {
  if (!env.rendezvous || !env.rendezvous_token) {
    throw std::runtime_error(
        fmt::format("[rank {}] start_job_store: the {} launcher's environment names no rendezvous {}. HINT: "
                    "set {} and {}",
                    env.rank, env.launcher, env.rendezvous ? "token" : "address", launcher_env::kMasterAddr,
                    launcher_env::kRendezvousToken));
  }
  auto store = std::make_unique<JobStore>();
  store->token = *env.rendezvous_token;
  store->port = env.rendezvous->port;
  store->host = reachable(env.rendezvous->host);
  if (env.rank == 0) store->server = serve(store->port, store->token);
  return store;
}

std::unique_ptr<StoreClient> connect_job_store(const JobStore& store, int rank,
                                               std::chrono::milliseconds connect_timeout) {
  StoreClientOptions options;
  options.host = store.host;
  options.port = store.port;
  options.token = store.token;
  options.rank = rank;
  options.connect_timeout = connect_timeout;
  return std::make_unique<StoreClient>(std::move(options));
}

// Note [Unique id through the store]
// NCCL's unique id is 128 bytes that rank 0 draws and every rank needs before it can join. Over the store:
//   1. rank 0 claims `key` (the counter <key>/uses must go from 0 to 1) and sets <key>/id;
//   2. a rank that failed to prepare (no such GPU, a CUDA error, the claim failed) adds 1 to <key>/failures
//      and records its rank and error under <key>/failure/<n>, n being the count that add returned;
//   3. every rank, failed or not, enters the store barrier <key>/prepared; rank 0 waits a little longer
//      than the others (lingering()), so that when a rank never comes the others get the barrier's error
//      naming it before rank 0 gives up, and exits with the store;
//   4. after it, every rank reads <key>/failures: nonzero means every rank throws (the failed ones their own
//      error, the others naming the first failed rank and quoting its error); zero means <key>/id is set, and
//      the other ranks get it;
//   5. rank 0 waits until every other rank has read what it needed (leave_job_store), since rank 0 serves
//      the store and a throwing rank 0 may exit at once, cutting off the others' replies.
// Failed ranks still enter the barrier, so the others learn of the failure at once instead of waiting in
// NCCL's init for a rank that will never come; a rank that crashed or hangs never enters it, and the barrier
// times out naming it. Writes come before the barrier, so after it they are visible to every rank (the store
// serves one connection's requests in order), and each rank makes a constant number of requests whatever the
// world size: no rank reads every other rank's status. A key is good for one communicator: ids must not be
// reused, and a second use would find the first one's keys, so rank 0's claim turns reuse into an error on
// every rank (step 5 then passes on the first use's keys, so a rank that reads late may see the store close
// instead: reuse is a bug to fix, not a path to make graceful).
namespace {

// The error of a failed rank as others quote it: bounded, so that a huge message cannot fill every log.
constexpr std::size_t kQuotedErrorBytes = 2000;

std::string quoted(std::string_view error) {
  if (error.size() <= kQuotedErrorBytes) return std::string(error);
  return fmt::format("{}... ({} bytes in all)", error.substr(0, kQuotedErrorBytes), error.size());
}

std::vector<uint8_t> to_bytes(std::string_view text) { return {text.begin(), text.end()}; }

// How much longer rank 0 waits in the barrier than the others (step 3 of the Note): a tenth of the timeout,
// at least 2 s and at most a minute.
std::chrono::milliseconds lingering(std::chrono::milliseconds timeout) {
  return std::clamp<std::chrono::milliseconds>(timeout / 10, std::chrono::seconds(2),
                                               std::chrono::minutes(1));
}

// After the barrier of Note [Unique id through the store]: the error naming the first rank that failed to
// prepare, or empty when none did.
std::string read_failures(StoreClient& store, const std::string& key, const std::string& what,
                          std::chrono::milliseconds timeout) {
  const int64_t failures = store.add(key + "/failures", 0);
  if (failures == 0) return "";
  const std::vector<uint8_t> record = store.get(key + "/failure/1", timeout);
  const std::string_view text(reinterpret_cast<const char*>(record.data()), record.size());
  const std::size_t newline = std::min(text.find('\n'), text.size());
  const std::string failed_rank(text.substr(0, newline));
  const std::string others =
      failures > 1 ? fmt::format(" (and {} other rank{})", failures - 1, failures > 2 ? "s" : "") : "";
  return fmt::format(
      "{}: rank {}{} failed to prepare, so no rank goes on: {}. HINT: the error of rank {} is the cause",
      what, failed_rank, others, quoted(text.substr(std::min(newline + 1, text.size()))), failed_rank);
}

}  // namespace

void exchange_unique_id(StoreClient& store, const std::string& key, int rank, int world_size,
                        std::span<uint8_t> id, const std::string& problem,
                        std::chrono::milliseconds timeout) {
  const std::string what = fmt::format("[rank {}] exchange of the unique id under store key '{}'", rank, key);
  if (world_size < 1 || rank < 0 || rank >= world_size || key.empty() || id.empty()) {
    throw std::runtime_error(fmt::format(
        "{}: needs 0 <= rank < world size, a key and an id, got rank {}, world size {}, a {}-byte key and a "
        "{}-byte id",
        what, rank, world_size, key.size(), id.size()));
  }
  std::string own_problem = problem;
  if (rank == 0 && own_problem.empty()) {
    if (const int64_t uses = store.add(key + "/uses", 1); uses != 1) {
      own_problem = fmt::format(
          "{}: the key was already used by {} earlier communicator(s) of this job. HINT: give every "
          "communicator a key of its own (e.g. \"nccl/world\", \"nccl/tp0\")",
          what, uses - 1);
    } else {
      store.set(key + "/id", id);
    }
  }
  if (!own_problem.empty()) {
    const int64_t failure = store.add(key + "/failures", 1);
    store.set(fmt::format("{}/failure/{}", key, failure), to_bytes(fmt::format("{}\n{}", rank, own_problem)));
  }
  try {
    store.barrier(key + "/prepared", world_size, rank == 0 ? timeout + lingering(timeout) : timeout);
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(fmt::format(
        "{}: not every rank arrived: {}. HINT: a missing rank crashed, hangs before this point, or was never "
        "started; its own log says why",
        what, e.what()));
  }

  // What this rank learned, or why it cannot go on; rank 0 already holds the id.
  std::string error = own_problem;
  std::vector<uint8_t> published;
  if (error.empty()) {
    try {
      error = read_failures(store, key, what, timeout);
      if (error.empty() && rank != 0) {
        published = store.get(key + "/id", timeout);
        if (published.size() != id.size()) {
          error = fmt::format(
              "{}: rank 0 published {} bytes, but this rank expects {}. HINT: every rank must run the same "
              "build of vimo and NCCL",
              what, published.size(), id.size());
        }
      }
    } catch (const std::runtime_error& e) {
      error = fmt::format("{}: {}", what, e.what());
    }
  }
  // Rank 0 serves the store and may exit as soon as this returns or throws: it first waits for the others.
  try {
    leave_job_store(store, key + "/fetched", rank, world_size, timeout);
  } catch (const std::runtime_error& e) {
    if (error.empty()) throw std::runtime_error(fmt::format("{}: {}", what, e.what()));
  }
  if (!error.empty()) throw std::runtime_error(error);
  if (rank != 0) std::copy(published.begin(), published.end(), id.begin());
}

void leave_job_store(StoreClient& store, const std::string& name, int rank, int world_size,
                     std::chrono::milliseconds timeout) {
  const std::string prefix = name + "/left/";
  if (rank != 0) {
    try {
      store.set(prefix + std::to_string(rank), {});
    } catch (const std::runtime_error&) {
      // Rank 0 may have seen the key and gone before its reply reached us; this rank needs nothing more.
    }
    return;
  }
  std::vector<std::string> others;
  for (int other = 1; other < world_size; ++other) others.push_back(prefix + std::to_string(other));
  if (!others.empty()) store.wait(others, timeout);
}

}  // namespace vimo::comm
