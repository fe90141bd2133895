// Forms the job's rendezvous store: rank 0 serves it, the others learn where.
#include "comm/job_store.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cstring>
#include <random>
#include <sstream>
#include <stdexcept>

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

}  // namespace vimo::comm
