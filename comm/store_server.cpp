// The TCP rendezvous store's server (StoreServer of comm/store.h): one Asio io thread that accepts
// connections, checks each peer's token and frames, and parks Get and Wait requests until their keys exist or
// their timeout ends. See Note [Rendezvous protocol] in store.h; the frames are comm/store_protocol.h's.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio.hpp>
#include <charconv>
#include <cstdlib>
#include <set>
#include <stdexcept>
#include <string_view>
#include <unordered_map>

#include "comm/store.h"
#include "comm/store_protocol.h"

namespace vimo::comm {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using std::chrono::milliseconds;
using store_detail::decode_header;
using store_detail::describe;
using store_detail::FrameReader;
using store_detail::FrameWriter;
using store_detail::Header;
using store_detail::kHeaderBytes;
using store_detail::kLongestServerWait;
using store_detail::MessageType;
using store_detail::ProtocolError;

namespace {

constexpr size_t kMaxPeerNameBytes = 256;
// Until a peer has presented the token it may send only a Hello, and a Hello this large at most: an
// unauthenticated peer cannot make the server allocate a value-sized buffer.
constexpr size_t kMaxHelloBytes = 8192;

// Compares without stopping at the first difference, so response time says nothing about the token.
bool same_token(std::string_view a, std::string_view b) {
  unsigned char difference = a.size() == b.size() ? 0 : 1;
  const size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? a[i] : 0;
    const unsigned char y = i < b.size() ? b[i] : 0;
    difference |= x ^ y;
  }
  return difference == 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Server. Everything below runs on the server's one io thread, so the key-value map needs no lock; only the
// statistics are atomics, read from other threads.

namespace {
class Session;

// A Get or Wait parked until its keys exist or its timer fires, whichever comes first.
struct Waiter {
  Waiter(std::shared_ptr<Session> s, MessageType t, std::vector<std::string> k, asio::io_context& io)
      : session(std::move(s)), type(t), keys(std::move(k)), timer(io) {}
  std::shared_ptr<Session> session;
  MessageType type;
  std::vector<std::string> keys;
  size_t missing = 0;  // distinct keys not yet set
  bool done = false;
  asio::steady_timer timer;
};
}  // namespace

struct StoreServer::State {
  explicit State(StoreServerOptions o) : options(std::move(o)) {}

  void accept();
  // Stores `value` and wakes the waiters whose last missing key this was.
  void put(const std::string& key, std::vector<uint8_t> value);
  void park(const std::shared_ptr<Session>& session, MessageType type, std::vector<std::string> keys,
            milliseconds timeout);
  void finish(const std::shared_ptr<Waiter>& waiter, bool timed_out);

  StoreServerOptions options;
  asio::io_context io;  // first member: destroyed last, after everything holding a socket or a timer
  tcp::acceptor acceptor{io};
  asio::steady_timer accept_retry{io};  // Note [A failed accept]
  size_t accept_failures = 0;           // in a row
  uint16_t port = 0;
  std::unordered_map<std::string, std::vector<uint8_t>> data;
  std::unordered_map<std::string, std::vector<std::shared_ptr<Waiter>>> waiters_by_key;
  std::atomic<size_t> rejected{0};
  std::atomic<size_t> waiting{0};
};

namespace {

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(StoreServer::State& server, tcp::socket socket)
      : server_(server), socket_(std::move(socket)), handshake_timer_(server.io) {
    boost::system::error_code ec;
    const tcp::endpoint remote = socket_.remote_endpoint(ec);
    peer_ = ec ? "an unknown peer" : fmt::format("{}:{}", remote.address().to_string(), remote.port());
  }

  void start() {
    handshake_timer_.expires_after(server_.options.handshake_timeout);
    handshake_timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
      if (ec || self->authenticated_) return;
      self->log_rejection(
          fmt::format("no handshake within {}", describe(self->server_.options.handshake_timeout)));
      self->close();
    });
    read_header();
  }

  // Sends a reply frame, then reads the next request (or closes, after an error that ends the connection).
  void send(std::vector<uint8_t> frame, bool close_after = false) {
    reply_ = std::move(frame);
    asio::async_write(socket_, asio::buffer(reply_),
                      [self = shared_from_this(), close_after](boost::system::error_code ec, size_t) {
                        if (ec || close_after) return self->close();
                        self->read_header();
                      });
  }

 private:
  void read_header() {
    asio::async_read(socket_, asio::buffer(header_),
                     [self = shared_from_this()](boost::system::error_code ec, size_t) {
                       if (ec) return self->on_disconnect(ec);
                       self->on_header();
                     });
  }

  void on_header() {
    const Header header = decode_header(header_.data());
    if (header.version != kStoreProtocolVersion) {
      return reject(fmt::format(
          "protocol version {} where {} was expected (not a vimo store client, or another version of vimo)",
          header.version, kStoreProtocolVersion));
    }
    const size_t limit = authenticated_ ? server_.options.limits.max_frame_bytes() : kMaxHelloBytes;
    if (header.length > limit) {
      return reject(fmt::format("a message of {} bytes, over the limit of {}", header.length, limit));
    }
    payload_.resize(header.length);  // bounded just above
    asio::async_read(socket_, asio::buffer(payload_),
                     [self = shared_from_this(), type = header.type](boost::system::error_code ec, size_t) {
                       if (ec) return self->on_disconnect(ec);
                       self->on_payload(type);
                     });
  }

  void on_payload(MessageType type) {
    try {
      FrameReader reader(payload_, server_.options.limits);
      if (!authenticated_) {
        if (type != MessageType::Hello) {
          throw ProtocolError(fmt::format("message type {} before the handshake", static_cast<int>(type)));
        }
        return on_hello(reader);
      }
      handle(type, reader);
    } catch (const ProtocolError& e) {
      reject(e.what());
    }
  }

  void on_hello(FrameReader& reader) {
    const std::string token = reader.text("token", kMaxHelloBytes);
    const std::string name = reader.text("peer name", kMaxPeerNameBytes);
    reader.finish();
    if (!same_token(token, server_.options.token)) {
      return reject(fmt::format("wrong token from a peer calling itself '{}'", name),
                    "authentication failed: the token does not match this job's");
    }
    authenticated_ = true;
    handshake_timer_.cancel();
    peer_ = fmt::format("{} ({})", peer_, name);
    spdlog::debug("rendezvous store: {} connected", peer_);
    send(FrameWriter(MessageType::Ok).finish());
  }

  void handle(MessageType type, FrameReader& reader) {
    auto& data = server_.data;
    switch (type) {
      case MessageType::Set: {
        std::string key = reader.key();
        const std::span<const uint8_t> value = reader.bytes("value", server_.options.limits.max_value_bytes);
        reader.finish();
        server_.put(key, std::vector<uint8_t>(value.begin(), value.end()));
        return send(FrameWriter(MessageType::Ok).finish());
      }
      case MessageType::Get:
      case MessageType::Wait: {
        std::vector<std::string> keys =
            type == MessageType::Get ? std::vector<std::string>{reader.key()} : reader.keys();
        const milliseconds timeout(std::min<uint64_t>(reader.u64("timeout"), kLongestServerWait.count()));
        reader.finish();
        const bool all_present =
            std::all_of(keys.begin(), keys.end(), [&](const std::string& k) { return data.count(k) != 0; });
        if (!all_present) return server_.park(shared_from_this(), type, std::move(keys), timeout);
        if (type == MessageType::Wait) return send(FrameWriter(MessageType::Ok).finish());
        return send(FrameWriter(MessageType::Value).bytes(data.at(keys.front())).finish());
      }
      case MessageType::Add: {
        const std::string key = reader.key();
        const auto delta = static_cast<int64_t>(reader.u64("delta"));
        reader.finish();
        int64_t value = 0;
        if (const auto found = data.find(key); found != data.end()) {
          const auto* begin = reinterpret_cast<const char*>(found->second.data());
          const auto* end = begin + found->second.size();
          const auto [stop, error] = std::from_chars(begin, end, value);
          if (error != std::errc() || stop != end || begin == end) {
            // The request was well formed: answer, and keep the connection.
            return send(FrameWriter(MessageType::Error)
                            .text(fmt::format("key '{}' holds a {}-byte value that is not an integer counter",
                                              key, found->second.size()))
                            .finish());
          }
        }
        if (__builtin_add_overflow(value, delta, &value)) {
          return send(FrameWriter(MessageType::Error)
                          .text(fmt::format("adding {} to counter '{}' overflows an int64", delta, key))
                          .finish());
        }
        const std::string text = std::to_string(value);
        server_.put(key, std::vector<uint8_t>(text.begin(), text.end()));
        return send(FrameWriter(MessageType::Integer).u64(static_cast<uint64_t>(value)).finish());
      }
      case MessageType::Check: {
        const std::vector<std::string> keys = reader.keys();
        reader.finish();
        const bool all_present =
            std::all_of(keys.begin(), keys.end(), [&](const std::string& k) { return data.count(k) != 0; });
        return send(FrameWriter(MessageType::Bool).u8(all_present ? 1 : 0).finish());
      }
      default:
        throw ProtocolError(fmt::format("unknown message type {}", static_cast<int>(type)));
    }
  }

  void on_disconnect(boost::system::error_code ec) {
    if (ec == asio::error::operation_aborted) return;  // closed by us
    if (!authenticated_) {
      spdlog::debug("rendezvous store: {} left before the handshake: {}", peer_, ec.message());
    } else if (ec != asio::error::eof) {
      spdlog::warn("rendezvous store: connection from {} failed: {}", peer_, ec.message());
    }
    close();
  }

  void log_rejection(const std::string& reason) {
    ++server_.rejected;
    spdlog::warn("rendezvous store: closing the connection from {}: {}", peer_, reason);
  }

  // Logs `reason`, tells the peer (`told`, or the reason itself), and closes the connection.
  void reject(const std::string& reason, const std::string& told = "") {
    log_rejection(reason);
    send(FrameWriter(MessageType::Error).text(told.empty() ? reason : told).finish(), /*close_after=*/true);
  }

  void close() {
    boost::system::error_code ignored;
    handshake_timer_.cancel();
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
  }

  StoreServer::State& server_;
  tcp::socket socket_;
  asio::steady_timer handshake_timer_;
  std::string peer_;
  bool authenticated_ = false;
  std::array<uint8_t, kHeaderBytes> header_{};
  std::vector<uint8_t> payload_;
  std::vector<uint8_t> reply_;
};

}  // namespace

// Note [A failed accept]
// An accept that fails for want of a descriptor or of memory (EMFILE, ENFILE, ENOBUFS, ENOMEM: rank 0 holds
// a store connection per rank and another per watchdog, so a few hundred ranks reach the usual limit of
// 1024) leaves the connection queued: accepting again at once fails again at once, forever, at the full speed
// of a core, with a warning each time, while the sessions already open wait for the io thread. So the next
// try waits 100 ms (the ranks' clients retry with backoff meanwhile), and the warning is given on the first
// failure of a run and on every 100th after it.
void StoreServer::State::accept() {
  acceptor.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted) return;
    if (!ec) {
      if (accept_failures > 0) {
        spdlog::info("rendezvous store on port {}: accepting again after {} failed accepts", port,
                     accept_failures);
      }
      accept_failures = 0;
      std::make_shared<Session>(*this, std::move(socket))->start();
      accept();
      return;
    }
    if (accept_failures++ % 100 == 0) {
      spdlog::warn(
          "rendezvous store on port {}: accept failed: {} ({} in a row); trying again every 100 ms. HINT: "
          "if descriptors ran out, raise the open-file limit (ulimit -n) of rank 0",
          port, ec.message(), accept_failures);
    }
    accept_retry.expires_after(std::chrono::milliseconds(100));
    accept_retry.async_wait([this](boost::system::error_code waited) {
      if (!waited) accept();
    });
  });
}

void StoreServer::State::put(const std::string& key, std::vector<uint8_t> value) {
  const bool created = data.insert_or_assign(key, std::move(value)).second;
  if (!created) return;
  const auto found = waiters_by_key.find(key);
  if (found == waiters_by_key.end()) return;
  const std::vector<std::shared_ptr<Waiter>> waiters = std::move(found->second);
  waiters_by_key.erase(found);
  for (const std::shared_ptr<Waiter>& waiter : waiters) {
    if (!waiter->done && --waiter->missing == 0) finish(waiter, /*timed_out=*/false);
  }
}

void StoreServer::State::park(const std::shared_ptr<Session>& session, MessageType type,
                              std::vector<std::string> keys, milliseconds timeout) {
  auto waiter = std::make_shared<Waiter>(session, type, std::move(keys), io);
  const std::set<std::string> distinct(waiter->keys.begin(), waiter->keys.end());
  for (const std::string& key : distinct) {
    if (data.count(key) != 0) continue;
    ++waiter->missing;
    waiters_by_key[key].push_back(waiter);
  }
  ++waiting;
  waiter->timer.expires_after(timeout);
  waiter->timer.async_wait([this, waiter](boost::system::error_code ec) {
    if (!ec && !waiter->done) finish(waiter, /*timed_out=*/true);
  });
}

void StoreServer::State::finish(const std::shared_ptr<Waiter>& waiter, bool timed_out) {
  waiter->done = true;
  --waiting;
  waiter->timer.cancel();
  const std::shared_ptr<Session> session = std::move(waiter->session);
  if (!timed_out) {
    if (waiter->type == MessageType::Wait) return session->send(FrameWriter(MessageType::Ok).finish());
    return session->send(FrameWriter(MessageType::Value).bytes(data.at(waiter->keys.front())).finish());
  }
  std::vector<std::string> missing;
  for (const std::string& key : waiter->keys) {
    if (data.count(key) != 0) continue;
    missing.push_back(key);
    // Forget this waiter in the key's list, so keys that are never set do not collect dead waiters.
    if (auto found = waiters_by_key.find(key); found != waiters_by_key.end()) {
      std::erase(found->second, waiter);
      if (found->second.empty()) waiters_by_key.erase(found);
    }
  }
  session->send(FrameWriter(MessageType::Timeout).keys(missing).finish());
}

StoreServer::StoreServer(StoreServerOptions options) : state_(std::make_unique<State>(std::move(options))) {
  State& s = *state_;
  const std::string where = fmt::format("{}:{}", s.options.host, s.options.port);
  if (s.options.token.empty()) {
    throw std::runtime_error(
        fmt::format("rendezvous store at {}: the token is empty. HINT: set VIMO_RENDEZVOUS_TOKEN to the same "
                    "secret on every rank",
                    where));
  }
  try {
    const tcp::endpoint endpoint(asio::ip::make_address(s.options.host), s.options.port);
    s.acceptor.open(endpoint.protocol());
    s.acceptor.set_option(asio::socket_base::reuse_address(true));  // rebind after a crash (TIME_WAIT)
    s.acceptor.bind(endpoint);
    s.acceptor.listen(asio::socket_base::max_listen_connections);
    s.port = s.acceptor.local_endpoint().port();
  } catch (const boost::system::system_error& e) {
    throw std::runtime_error(
        fmt::format("rendezvous store at {}: cannot listen: {}. HINT: the host must be a local address; "
                    "another job may use the port (set VIMO_RENDEZVOUS_PORT){}",
                    where, e.code().message(),
                    std::getenv("TORCHELASTIC_USE_AGENT_STORE") != nullptr
                        ? "; under torchrun, its agent serves its own store on MASTER_PORT, so set "
                          "VIMO_RENDEZVOUS_PORT to another free port"
                        : ""));
  }
  s.accept();
  thread_ = std::thread([&s] {
    // A handler that throws (say, out of memory) loses its connection, not the whole store.
    while (true) {
      try {
        s.io.run();
        return;
      } catch (const std::exception& e) {
        spdlog::error("rendezvous store on port {}: {}", s.port, e.what());
      }
    }
  });
  spdlog::info("rendezvous store listening on {}:{}", s.options.host, s.port);
}

StoreServer::~StoreServer() {
  state_->io.stop();
  thread_.join();
}

uint16_t StoreServer::port() const { return state_->port; }
std::size_t StoreServer::rejected_connections() const { return state_->rejected.load(); }
std::size_t StoreServer::waiting_requests() const { return state_->waiting.load(); }

}  // namespace vimo::comm
