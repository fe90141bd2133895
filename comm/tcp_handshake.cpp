// Defines how the TCP backend's mesh forms (declared in comm/tcp_internal.h): where a rank listens and how
// it says so, and the Mesh constructor, which connects to the lower ranks and accepts the higher ones, each
// connection opened by an authenticated hello.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <climits>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <utility>

#include "comm/tcp_internal.h"

namespace vimo::comm::tcp_detail {

// The hello that opens every connection: magic u32 "VHLO", version u32, mesh id u64, rank u32, token length
// u32, listener length u32, then the token and where the connecting rank listens (encode_listener). The
// accepting rank answers one byte (1) when it accepts, and closes otherwise. A rank learns where the higher
// ranks listen from their hellos, so forming needs only the lower ranks' addresses, which are published
// before anyone waits.
constexpr uint32_t kHelloMagic = 0x4f4c4856;  // "VHLO"
constexpr uint32_t kHelloVersion = 1;
constexpr size_t kHelloBytes = 28;
constexpr uint32_t kMaxTokenBytes = 4096;
constexpr uint32_t kMaxListenerBytes = 1024;

namespace {

bool is_loopback(const std::string& address) {
  boost::system::error_code ec;
  const auto parsed = asio::ip::make_address(address, ec);
  return ec || parsed.is_loopback();
}

}  // namespace

std::string encode_listener(const Listener& where) {
  return fmt::format("{}\n{}\n{}", where.host, where.address, where.port);
}

std::optional<Listener> decode_listener(std::string_view text) {
  const size_t first = text.find('\n');
  const size_t second = first == std::string_view::npos ? first : text.find('\n', first + 1);
  if (second == std::string_view::npos) return std::nullopt;
  Listener where{std::string(text.substr(0, first)), std::string(text.substr(first + 1, second - first - 1)),
                 0};
  const std::string_view port = text.substr(second + 1);
  unsigned value = 0;
  const auto [end, error] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (error != std::errc() || end != port.data() + port.size() || value == 0 || value > 65535)
    return std::nullopt;
  where.port = static_cast<uint16_t>(value);
  return where;
}

MeshSeed open_listener() {
  MeshSeed seed;
  seed.io = std::make_unique<asio::io_context>();
  try {
    seed.acceptor = std::make_unique<tcp::acceptor>(*seed.io, tcp::endpoint(tcp::v4(), 0));
  } catch (const boost::system::system_error& e) {
    throw std::runtime_error(
        fmt::format("TCP communicator: cannot listen on an ephemeral port: {}", e.what()));
  }
  seed.port = seed.acceptor->local_endpoint().port();
  return seed;
}

std::string this_host_name() {
  char name[HOST_NAME_MAX + 1] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "localhost";
  return name;
}

std::string address_towards(const std::string& host, uint16_t port) {
  try {
    asio::io_context io;
    asio::ip::udp::resolver resolver(io);
    const auto endpoints = resolver.resolve(asio::ip::udp::v4(), host, std::to_string(port));
    asio::ip::udp::socket socket(io);
    socket.connect(*endpoints.begin());
    return socket.local_endpoint().address().to_string();
  } catch (const boost::system::system_error&) {
    return this_host_name();
  }
}

Mesh::Mesh(MeshSeed seed, int size, std::vector<Listener> known, uint64_t mesh_id, std::string token,
           Clock::time_point deadline)
    : io_(std::move(seed.io)),
      listeners_(std::move(known)),
      rank_(static_cast<int>(listeners_.size()) - 1),
      id_(mesh_id),
      token_(std::move(token)),
      peers_(static_cast<size_t>(size)) {
  const int ranks = size;
  listeners_.resize(static_cast<size_t>(size));  // the higher ranks' come with their hellos
  const std::string introduction = encode_listener(listeners_[static_cast<size_t>(rank_)]);
  int missing = ranks - 1;
  const std::string me = this_host_name();
  std::map<int, std::string> last_error;  // rank -> why the last connection attempt failed
  // The handlers below run only while `forming`; at the end every socket still in a handshake is closed and
  // their handlers drained, so none outlives this constructor's locals.
  bool forming = true;
  std::vector<std::weak_ptr<tcp::socket>> handshakes;

  // Accepting the higher ranks: each connection must open with a valid hello within the deadline.
  tcp::acceptor& acceptor = *seed.acceptor;
  std::vector<bool> claimed(static_cast<size_t>(ranks), false);  // a higher rank's hello was acked
  // A failed accept (out of descriptors, say) leaves its connection queued: accepting again at once would
  // spin, and not again would leave every higher rank unconnected. So the next try waits 100 ms (Note [A
  // failed accept] in comm/store_server.cpp), and a rank missing at the deadline is named with the failure.
  asio::steady_timer accept_retry(*io_);
  std::string accept_failure;  // the last failed accept's error, or empty
  std::function<void()> accept_next = [&] {
    if (!forming) return;
    auto socket = std::make_shared<tcp::socket>(*io_);
    handshakes.push_back(socket);
    acceptor.async_accept(*socket, [&, socket](boost::system::error_code ec) {
      if (!forming || ec == asio::error::operation_aborted) return;
      if (ec) {
        if (accept_failure.empty()) {
          spdlog::warn(
              "[rank {}] TCP communicator: accepting a connection failed: {}; trying again every 100 ms",
              rank_, ec.message());
        }
        accept_failure = ec.message();
        accept_retry.expires_after(std::chrono::milliseconds(100));
        accept_retry.async_wait([&](boost::system::error_code waited) {
          if (!waited) accept_next();
        });
        return;
      }
      accept_next();
      auto hello = std::make_shared<std::array<uint8_t, kHelloBytes>>();
      asio::async_read(
          *socket, asio::buffer(*hello), [&, socket, hello](boost::system::error_code ec, size_t) {
            if (ec || !forming) return;
            const uint32_t length = get<uint32_t>(hello->data() + 20);
            const uint32_t listener_length = get<uint32_t>(hello->data() + 24);
            const int from = static_cast<int>(get<uint32_t>(hello->data() + 16));
            std::string peer_address = "?";
            boost::system::error_code ignored;
            if (auto remote = socket->remote_endpoint(ignored); !ignored)
              peer_address = remote.address().to_string();
            auto refuse = [this, socket, peer_address](const std::string& why) {
              spdlog::warn("[rank {}] TCP communicator refused a connection from {}: {}", rank_, peer_address,
                           why);
              boost::system::error_code ignore;
              socket->close(ignore);
            };
            if (get<uint32_t>(hello->data()) != kHelloMagic ||
                get<uint32_t>(hello->data() + 4) != kHelloVersion)
              return refuse("not a vimo TCP communicator hello of this version");
            if (get<uint64_t>(hello->data() + 8) != id_) return refuse("a hello for another communicator");
            if (length > kMaxTokenBytes || listener_length > kMaxListenerBytes)
              return refuse(fmt::format("a hello of {} + {} bytes", length, listener_length));
            if (from <= rank_ || from >= ranks) return refuse(fmt::format("a hello from rank {}", from));
            auto rest = std::make_shared<std::string>(length + listener_length, '\0');
            asio::async_read(
                *socket, asio::buffer(*rest),
                [&, socket, rest, length, from, refuse](boost::system::error_code ec, size_t) {
                  if (ec || !forming) return;
                  if (rest->compare(0, length, token_) != 0 || length != token_.size())
                    return refuse(fmt::format("rank {} presented a wrong token", from));
                  const std::optional<Listener> where =
                      decode_listener(std::string_view(*rest).substr(length));
                  if (!where) return refuse(fmt::format("rank {} sent a malformed address", from));
                  // A connection closed right after its hello is an attempt its rank gave up
                  // on: taking it would leave this rank a dead connection for that rank's.
                  uint8_t probe = 0;
                  if (::recv(socket->native_handle(), &probe, 1, MSG_PEEK | MSG_DONTWAIT) == 0)
                    return refuse(fmt::format("rank {} closed its connection after the hello", from));
                  // Claimed before the ack is written, so that a second hello of the same
                  // rank arriving meanwhile is not acked too.
                  if (claimed[static_cast<size_t>(from)])
                    return refuse(fmt::format("rank {} connected twice", from));
                  claimed[static_cast<size_t>(from)] = true;
                  auto ack = std::make_shared<uint8_t>(1);
                  asio::async_write(*socket, asio::buffer(ack.get(), 1),
                                    [&, socket, ack, from, where](boost::system::error_code ec, size_t) {
                                      if (ec) claimed[static_cast<size_t>(from)] = false;  // it may retry
                                      if (ec || !forming || peers_[static_cast<size_t>(from)]) return;
                                      peers_[static_cast<size_t>(from)] =
                                          std::make_unique<Peer>(std::move(*socket), from);
                                      listeners_[static_cast<size_t>(from)] = *where;
                                      --missing;
                                    });
                });
          });
    });
  };
  if (rank_ + 1 < ranks) accept_next();

  // Connecting to the lower ranks, retrying with backoff until the deadline.
  // Note [A time limit per connection attempt]: connecting gets a time limit of its own, a quarter of the
  // time to form (at least 0.1 s, at most 5 s). Without one, a connection whose SYNs nobody answers (dropped
  // by a firewall, or by a full backlog) would sit until the deadline, never retried, and the error would not
  // say why; when it runs out, the socket is closed and the next attempt starts after the backoff. Once
  // connected, the hello is written and its answer awaited until the deadline, with no limit: the peer's
  // kernel has accepted the connection and holds the hello, so closing it now would leave the peer a dead
  // connection to take for this rank's (and a stopped peer answers when it resumes). Only the reason is
  // kept, for the error if the answer never comes.
  const auto connect_limit = std::clamp<Clock::duration>(
      (deadline - Clock::now()) / 4, std::chrono::milliseconds(100), std::chrono::seconds(5));
  const double connect_limit_s = std::chrono::duration<double>(connect_limit).count();
  struct Attempt {
    Attempt(asio::io_context& io, Clock::duration limit) : socket(io), limit(io, limit) {}
    tcp::socket socket;
    asio::steady_timer limit;  // running while connecting
    bool connected = false;
    bool expired = false;  // the limit closed the socket before it connected
  };
  std::vector<std::weak_ptr<Attempt>> attempts;
  std::vector<std::unique_ptr<asio::steady_timer>> timers;
  std::function<void(int, std::chrono::milliseconds)> connect_to = [&](int to,
                                                                       std::chrono::milliseconds backoff) {
    const Listener& where = listeners_[static_cast<size_t>(to)];
    const std::string host = where.host == me              ? "127.0.0.1"
                             : !is_loopback(where.address) ? where.address
                                                           : where.host;
    auto retry = [&, to, backoff](const std::string& why) {
      if (!forming) return;
      last_error[to] = why;
      auto timer = std::make_unique<asio::steady_timer>(*io_, backoff);
      timer->async_wait([&, to, backoff](boost::system::error_code ec) {
        if (!ec && forming) connect_to(to, std::min(backoff * 2, std::chrono::milliseconds(1000)));
      });
      timers.push_back(std::move(timer));
    };
    boost::system::error_code ec;
    tcp::resolver resolver(*io_);
    const auto endpoints = resolver.resolve(tcp::v4(), host, std::to_string(where.port), ec);
    if (ec) return retry(fmt::format("cannot resolve {}: {}", host, ec.message()));
    auto attempt = std::make_shared<Attempt>(*io_, connect_limit);
    attempts.push_back(attempt);
    attempt->limit.async_wait([attempt](boost::system::error_code ec) {
      if (ec || attempt->connected) return;  // cancelled, or it connected first
      attempt->expired = true;
      boost::system::error_code ignored;
      attempt->socket.close(ignored);  // the connect's handler then runs with operation_aborted
    });
    asio::async_connect(
        attempt->socket, endpoints,
        [&, attempt, to, retry](boost::system::error_code ec, const tcp::endpoint&) {
          attempt->limit.cancel();
          if (ec || attempt->expired) {
            return retry(attempt->expired ? fmt::format("no answer to a connection attempt within {:.1f} s",
                                                        connect_limit_s)
                                          : ec.message());
          }
          attempt->connected = true;
          auto hello =
              std::make_shared<std::vector<uint8_t>>(kHelloBytes + token_.size() + introduction.size());
          put<uint32_t>(hello->data(), kHelloMagic);
          put<uint32_t>(hello->data() + 4, kHelloVersion);
          put<uint64_t>(hello->data() + 8, id_);
          put<uint32_t>(hello->data() + 16, static_cast<uint32_t>(rank_));
          put<uint32_t>(hello->data() + 20, static_cast<uint32_t>(token_.size()));
          put<uint32_t>(hello->data() + 24, static_cast<uint32_t>(introduction.size()));
          std::memcpy(hello->data() + kHelloBytes, token_.data(), token_.size());
          std::memcpy(hello->data() + kHelloBytes + token_.size(), introduction.data(), introduction.size());
          asio::async_write(
              attempt->socket, asio::buffer(*hello),
              [&, attempt, hello, to, retry](boost::system::error_code ec, size_t) {
                if (ec) return retry(ec.message());
                if (forming)
                  last_error[to] = "connected, but no answer to the hello (is the rank stopped or busy?)";
                auto ack = std::make_shared<uint8_t>(0);
                asio::async_read(
                    attempt->socket, asio::buffer(ack.get(), 1),
                    [&, attempt, ack, to](boost::system::error_code ec, size_t) {
                      if (!forming) return;
                      if (ec || *ack != 1) {
                        // Refused: a wrong token or another communicator's port. Not worth retrying.
                        last_error[to] =
                            "the rank refused the connection (a wrong token, or another job's port)";
                        return;
                      }
                      peers_[static_cast<size_t>(to)] =
                          std::make_unique<Peer>(std::move(attempt->socket), to);
                      --missing;
                    });
              });
        });
  };
  for (int to = 0; to < rank_; ++to) connect_to(to, std::chrono::milliseconds(10));

  while (missing > 0 && Clock::now() < deadline) {
    if (io_->run_one_until(deadline) == 0 && io_->stopped()) break;
  }
  forming = false;
  boost::system::error_code ignored;
  acceptor.close(ignored);
  accept_retry.cancel();
  for (auto& timer : timers) timer->cancel();
  for (auto& weak : handshakes) {
    if (auto socket = weak.lock()) socket->close(ignored);
  }
  for (auto& weak : attempts) {
    if (auto attempt = weak.lock()) {
      attempt->limit.cancel();
      attempt->socket.close(ignored);  // a socket moved into a Peer is closed already
    }
  }
  io_->restart();
  io_->run();
  io_->restart();

  if (missing > 0) {
    std::vector<std::string> absent;
    for (int r = 0; r < ranks; ++r) {
      if (r == rank_ || peers_[static_cast<size_t>(r)]) continue;
      std::string text = name(r);
      if (auto it = last_error.find(r); it != last_error.end()) {
        text += ": " + it->second;
      } else if (r > rank_ && !accept_failure.empty()) {
        text += ": this rank could not accept connections (" + accept_failure + ")";
      }
      absent.push_back(text);
    }
    throw std::runtime_error(fmt::format(
        "[rank {}] TCP communicator: no connection with {} of the {} other ranks before the timeout: {}. "
        "HINT: "
        "check that every rank started, that they reach each other's hosts on any TCP port, and that they "
        "share VIMO_RENDEZVOUS_TOKEN",
        rank_, absent.size(), ranks - 1, fmt::join(absent, "; ")));
  }
  for (auto& peer : peers_) {
    if (peer) peer->socket.set_option(tcp::no_delay(true), ignored);
  }
}

Mesh::~Mesh() = default;

}  // namespace vimo::comm::tcp_detail
