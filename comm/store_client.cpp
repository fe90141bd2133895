// The TCP rendezvous store's client (StoreClient of comm/store.h): blocking calls with deadlines over one
// connection, built from Asio's asynchronous ones, and the barrier of Note [Store barrier]. See Note
// [Rendezvous protocol] in store.h; the frames are comm/store_protocol.h's.
#include <fmt/format.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <boost/asio.hpp>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string_view>
#include <thread>

#include "comm/store.h"
#include "comm/store_protocol.h"

namespace vimo::comm {

namespace store_detail {

bool connected_to_itself(int fd) {
  sockaddr_storage mine{}, peer{};
  socklen_t mine_length = sizeof(mine), peer_length = sizeof(peer);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&mine), &mine_length) != 0 ||
      ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_length) != 0) {
    return false;  // not connected: nothing to say
  }
  if (mine.ss_family != peer.ss_family) return false;
  if (mine.ss_family == AF_INET) {
    const auto& a = reinterpret_cast<const sockaddr_in&>(mine);
    const auto& b = reinterpret_cast<const sockaddr_in&>(peer);
    return a.sin_port == b.sin_port && a.sin_addr.s_addr == b.sin_addr.s_addr;
  }
  if (mine.ss_family == AF_INET6) {
    const auto& a = reinterpret_cast<const sockaddr_in6&>(mine);
    const auto& b = reinterpret_cast<const sockaddr_in6&>(peer);
    return a.sin6_port == b.sin6_port && std::memcmp(&a.sin6_addr, &b.sin6_addr, sizeof(a.sin6_addr)) == 0;
  }
  return false;
}

}  // namespace store_detail

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
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

// The server answers a Get or Wait when its timeout ends; the client waits this much longer for that answer.
constexpr milliseconds kReplyGrace{2000};

std::string join_quoted(const std::vector<std::string>& items, size_t shown) {
  std::string result;
  for (size_t i = 0; i < items.size() && i < shown; ++i)
    result += fmt::format("{}'{}'", i ? ", " : "", items[i]);
  if (items.size() > shown) result += fmt::format(" and {} more", items.size() - shown);
  return result;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Client. Blocking calls built from Asio's asynchronous ones, each run on the client's own io_context until
// it completes or its deadline passes (then the socket is closed, which ends the operation).

namespace {

struct Reply {
  MessageType type{};
  std::vector<uint8_t> payload;
};

// Whether `reply` is an answer Note [Rendezvous protocol] allows to `request` (Error aside).
bool reply_fits(MessageType request, MessageType reply) {
  switch (request) {
    case MessageType::Set:
      return reply == MessageType::Ok;
    case MessageType::Get:
      return reply == MessageType::Value || reply == MessageType::Timeout;
    case MessageType::Add:
      return reply == MessageType::Integer;
    case MessageType::Check:
      return reply == MessageType::Bool;
    case MessageType::Wait:
      return reply == MessageType::Ok || reply == MessageType::Timeout;
    default:
      return false;
  }
}

// A failure of the connection itself; its text is the reason only, and the caller names the store and call.
struct TransportFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace

struct StoreClient::Connection {
  Connection(std::string where, StoreLimits l) : endpoint(std::move(where)), limits(l) {}

  // Runs the operation that `start(handler)` begins until it completes or `deadline` passes, when `cancel`
  // ends it. Returns the operation's error, or timed_out.
  template <class Start, class Cancel>
  boost::system::error_code run(Clock::time_point deadline, Start&& start, Cancel&& cancel) {
    std::optional<boost::system::error_code> result;
    start([&result](boost::system::error_code ec, auto&&...) { result = ec; });
    io.restart();
    io.run_until(deadline);
    if (result) return *result;
    cancel();
    io.restart();
    io.run();  // lets the cancelled operation's handler run before `result` goes out of scope
    return asio::error::timed_out;
  }
  template <class Start>
  boost::system::error_code run(Clock::time_point deadline, Start&& start) {
    return run(deadline, std::forward<Start>(start), [this] { close(); });
  }

  void close() {
    boost::system::error_code ignored;
    socket.close(ignored);
  }

  [[noreturn]] void fail(const std::string& reason) {
    closed_because = reason;
    close();
    throw TransportFailure(reason);
  }

  // Sends `frame` and reads the reply, all before `deadline` (`budget` only names it in errors).
  Reply exchange(const std::vector<uint8_t>& frame, Clock::time_point deadline, milliseconds budget) {
    if (!closed_because.empty()) {
      throw TransportFailure(fmt::format(
          "the connection was closed after an earlier error ({}); create a new client", closed_because));
    }
    auto check = [&](boost::system::error_code ec) {
      if (ec == asio::error::timed_out) fail(fmt::format("no reply within {}", describe(budget)));
      if (ec) fail(ec.message());
    };
    check(run(deadline, [&](auto handler) { asio::async_write(socket, asio::buffer(frame), handler); }));
    std::array<uint8_t, kHeaderBytes> header_bytes{};
    check(
        run(deadline, [&](auto handler) { asio::async_read(socket, asio::buffer(header_bytes), handler); }));
    const Header header = decode_header(header_bytes.data());
    if (header.version != kStoreProtocolVersion) {
      fail(fmt::format("a reply of protocol version {} where {} was expected (is this a vimo store?)",
                       header.version, kStoreProtocolVersion));
    }
    if (header.length > limits.max_frame_bytes()) {
      fail(fmt::format("a reply of {} bytes, over the limit of {}", header.length, limits.max_frame_bytes()));
    }
    Reply reply{header.type, std::vector<uint8_t>(header.length)};
    check(
        run(deadline, [&](auto handler) { asio::async_read(socket, asio::buffer(reply.payload), handler); }));
    return reply;
  }

  // One request: `parse(type, reader)` turns the reply into a result. An Error reply, a transport failure or
  // a malformed reply becomes a std::runtime_error naming the store and `what`.
  template <class Parse>
  auto request(const std::string& what, const std::vector<uint8_t>& frame, milliseconds budget,
               Parse&& parse) {
    const std::string prefix = fmt::format("rendezvous store at {}: {}", endpoint, what);
    try {
      const Reply reply = exchange(frame, Clock::now() + budget, budget);
      FrameReader reader(reply.payload, limits);
      if (reply.type == MessageType::Error) {
        throw std::runtime_error(fmt::format("{}: the store answered: {}", prefix,
                                             reader.text("error", limits.max_frame_bytes())));
      }
      const auto request_type = static_cast<MessageType>(frame[1]);
      if (!reply_fits(request_type, reply.type)) {
        throw ProtocolError(fmt::format("a reply of type {} to a request of type {}",
                                        static_cast<int>(reply.type), static_cast<int>(request_type)));
      }
      return parse(reply.type, reader);
    } catch (const TransportFailure& e) {
      throw std::runtime_error(fmt::format("{}: {}", prefix, e.what()));
    } catch (const ProtocolError& e) {
      closed_because = e.what();
      close();
      throw std::runtime_error(fmt::format("{}: malformed reply: {}", prefix, e.what()));
    }
  }

  // Connects and authenticates before `deadline`. Returns the reason of a failure worth retrying (nothing
  // listening yet, a reset); throws std::runtime_error for one that is not (a wrong token).
  std::optional<std::string> open(const StoreClientOptions& options, Clock::time_point deadline) {
    tcp::resolver resolver(io);
    tcp::resolver::results_type endpoints;
    auto ec = run(
        deadline,
        [&](auto handler) {
          resolver.async_resolve(options.host, std::to_string(options.port),
                                 [&endpoints, handler](boost::system::error_code e, auto results) mutable {
                                   endpoints = std::move(results);
                                   handler(e);
                                 });
        },
        [&] { resolver.cancel(); });
    if (ec) return fmt::format("cannot resolve '{}': {}", options.host, ec.message());
    ec = run(deadline, [&](auto handler) { asio::async_connect(socket, endpoints, handler); });
    if (ec) {
      close();
      return ec.message();
    }
    if (store_detail::connected_to_itself(socket.native_handle())) {  // Note [A connection to itself]
      close();
      return "connected to itself (nothing listens there yet)";
    }
    socket.set_option(tcp::no_delay(true), ec);  // small request/reply pairs: do not wait to coalesce
    const std::string name = options.rank >= 0 ? fmt::format("rank {}", options.rank) : "a peer without rank";
    Reply reply;
    try {
      const auto budget = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
      reply =
          exchange(FrameWriter(MessageType::Hello).text(options.token).text(name).finish(), deadline, budget);
    } catch (const TransportFailure& e) {
      closed_because.clear();
      return fmt::format("handshake: {}", e.what());
    }
    if (reply.type == MessageType::Ok) return std::nullopt;
    std::string message = "an unexpected reply";
    if (reply.type == MessageType::Error) {
      try {
        FrameReader reader(reply.payload, limits);
        message = reader.text("error", limits.max_frame_bytes());
      } catch (const ProtocolError&) {
      }
    }
    close();
    throw std::runtime_error(
        fmt::format("rendezvous store at {} refused this peer: {}. HINT: every rank must be started with the "
                    "same VIMO_RENDEZVOUS_TOKEN",
                    endpoint, message));
  }

  asio::io_context io;  // first member: destroyed after the socket
  tcp::socket socket{io};
  std::string endpoint;  // "host:port"
  StoreLimits limits;
  std::string closed_because;  // why the connection is unusable; empty while it is fine
};

StoreClient::StoreClient(StoreClientOptions options)
    : options_(std::move(options)), endpoint_(fmt::format("{}:{}", options_.host, options_.port)) {
  if (options_.token.empty()) {
    throw std::runtime_error(
        fmt::format("rendezvous store at {}: the token is empty. HINT: set VIMO_RENDEZVOUS_TOKEN to the same "
                    "secret on every rank",
                    endpoint_));
  }
  const auto deadline = Clock::now() + options_.connect_timeout;
  milliseconds backoff{10};
  int attempts = 0;
  std::string last_error;
  while (true) {
    ++attempts;
    auto connection = std::make_unique<Connection>(endpoint_, options_.limits);
    const std::optional<std::string> error = connection->open(options_, deadline);
    if (!error) {
      connection_ = std::move(connection);
      return;
    }
    const auto now = Clock::now();
    // An attempt cut short by the deadline says less than the failure before it (say, "Connection refused").
    if (now < deadline || last_error.empty()) last_error = *error;
    if (now >= deadline) break;
    // Rank 0 may not be listening yet: back off exponentially (not a synchronization: we retry a failure).
    std::this_thread::sleep_for(std::min<Clock::duration>(backoff, deadline - now));
    backoff = std::min(backoff * 2, milliseconds(1000));
    if (Clock::now() >= deadline) break;  // no time left for another attempt
  }
  throw std::runtime_error(
      fmt::format("rendezvous store at {}: could not connect within {} ({} attempts); last error: {}. HINT: "
                  "check that rank 0 is running and that this host can reach that address and port",
                  endpoint_, describe(options_.connect_timeout), attempts, last_error));
}

StoreClient::~StoreClient() = default;

namespace {
uint64_t to_wire(milliseconds timeout) {
  return static_cast<uint64_t>(std::max<int64_t>(timeout.count(), 0));
}
}  // namespace

// Checks sizes before sending, so that an oversized request fails here with a clear message instead of
// closing the connection at the server.
static void check_request(const std::string& endpoint, const StoreLimits& limits,
                          const std::vector<std::string>& keys, size_t value_bytes) {
  const auto prefix = fmt::format("rendezvous store at {}", endpoint);
  if (keys.size() > limits.max_keys_per_request) {
    throw std::runtime_error(fmt::format("{}: {} keys in one request, over the limit of {}", prefix,
                                         keys.size(), limits.max_keys_per_request));
  }
  for (const std::string& key : keys) {
    if (key.size() > limits.max_key_bytes) {
      throw std::runtime_error(fmt::format("{}: key '{}...' has {} bytes, over the limit of {}", prefix,
                                           key.substr(0, 40), key.size(), limits.max_key_bytes));
    }
  }
  if (value_bytes > limits.max_value_bytes) {
    throw std::runtime_error(fmt::format("{}: a value of {} bytes for key '{}', over the limit of {}", prefix,
                                         value_bytes, keys.front(), limits.max_value_bytes));
  }
}

void StoreClient::set(const std::string& key, std::span<const uint8_t> value) {
  std::lock_guard lock(mutex_);
  check_request(endpoint_, options_.limits, {key}, value.size());
  connection_->request(fmt::format("set of key '{}'", key),
                       FrameWriter(MessageType::Set).text(key).bytes(value).finish(),
                       options_.operation_timeout, [](MessageType, FrameReader& reader) { reader.finish(); });
}

std::vector<uint8_t> StoreClient::get(const std::string& key) { return get(key, options_.operation_timeout); }

std::vector<uint8_t> StoreClient::get(const std::string& key, milliseconds timeout) {
  timeout = std::min(timeout, kLongestServerWait);  // the server waits no longer
  std::lock_guard lock(mutex_);
  check_request(endpoint_, options_.limits, {key}, 0);
  const std::string what = fmt::format("get of key '{}'", key);
  return connection_->request(what, FrameWriter(MessageType::Get).text(key).u64(to_wire(timeout)).finish(),
                              timeout + kReplyGrace, [&](MessageType type, FrameReader& reader) {
                                if (type == MessageType::Timeout) {
                                  throw std::runtime_error(fmt::format(
                                      "rendezvous store at {}: {} timed out after {}: no rank set it",
                                      endpoint_, what, describe(timeout)));
                                }
                                const std::span<const uint8_t> value =
                                    reader.bytes("value", options_.limits.max_value_bytes);
                                reader.finish();
                                return std::vector<uint8_t>(value.begin(), value.end());
                              });
}

// The keys still missing when `timeout` ended, or none.
static std::vector<std::string> wait_for_keys(StoreClient::Connection& connection, const std::string& what,
                                              const std::vector<std::string>& keys, milliseconds timeout) {
  return connection.request(what, FrameWriter(MessageType::Wait).keys(keys).u64(to_wire(timeout)).finish(),
                            timeout + kReplyGrace, [](MessageType type, FrameReader& reader) {
                              std::vector<std::string> missing;
                              if (type == MessageType::Timeout) missing = reader.keys();
                              reader.finish();
                              return missing;
                            });
}

void StoreClient::wait(const std::vector<std::string>& keys, milliseconds timeout) {
  timeout = std::min(timeout, kLongestServerWait);  // the server waits no longer
  std::lock_guard lock(mutex_);
  check_request(endpoint_, options_.limits, keys, 0);
  const std::string what = fmt::format("wait for {} keys", keys.size());
  const std::vector<std::string> missing = wait_for_keys(*connection_, what, keys, timeout);
  if (missing.empty()) return;
  throw std::runtime_error(
      fmt::format("rendezvous store at {}: {} timed out after {}: {} of {} keys missing: {}", endpoint_, what,
                  describe(timeout), missing.size(), keys.size(), join_quoted(missing, 16)));
}

int64_t StoreClient::add(const std::string& key, int64_t delta) {
  std::lock_guard lock(mutex_);
  check_request(endpoint_, options_.limits, {key}, 0);
  return connection_->request(
      fmt::format("add to counter '{}'", key),
      FrameWriter(MessageType::Add).text(key).u64(static_cast<uint64_t>(delta)).finish(),
      options_.operation_timeout, [](MessageType, FrameReader& reader) {
        const auto value = static_cast<int64_t>(reader.u64("counter"));
        reader.finish();
        return value;
      });
}

bool StoreClient::check(const std::vector<std::string>& keys) {
  std::lock_guard lock(mutex_);
  check_request(endpoint_, options_.limits, keys, 0);
  return connection_->request(fmt::format("check of {} keys", keys.size()),
                              FrameWriter(MessageType::Check).keys(keys).finish(), options_.operation_timeout,
                              [](MessageType, FrameReader& reader) {
                                const bool present = reader.u8("answer") != 0;
                                reader.finish();
                                return present;
                              });
}

// Note [Store barrier]
// Rank r enters round n of barrier "name" by setting the key "vimo/barrier/<name>/<n>/<r>", then waits for
// the keys of all ranks of that round. A key per rank, rather than one shared counter, lets the timeout say
// which ranks never came: the server answers with the keys still missing. Rounds keep a reused name from
// passing at once on the previous round's keys; every rank counts them itself, which agrees because all
// ranks pass the same barriers in the same order.
void StoreClient::barrier(const std::string& name, int world_size, milliseconds timeout) {
  timeout = std::min(timeout, kLongestServerWait);  // the server waits no longer
  std::lock_guard lock(mutex_);
  const int rank = options_.rank;
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw std::runtime_error(
        fmt::format("rendezvous store at {}: barrier '{}' needs 0 <= rank < world size, got rank {} and "
                    "world size {}. HINT: set StoreClientOptions::rank",
                    endpoint_, name, rank, world_size));
  }
  const int round = barrier_rounds_[name]++;
  const std::string prefix = fmt::format("vimo/barrier/{}/{}/", name, round);
  std::vector<std::string> keys;
  for (int r = 0; r < world_size; ++r) keys.push_back(prefix + std::to_string(r));
  check_request(endpoint_, options_.limits, keys, 0);
  const std::string what = fmt::format("barrier '{}'", name);
  connection_->request(what, FrameWriter(MessageType::Set).text(keys[rank]).bytes({}).finish(),
                       options_.operation_timeout, [](MessageType, FrameReader& reader) { reader.finish(); });
  const std::vector<std::string> missing = wait_for_keys(*connection_, what, keys, timeout);
  if (missing.empty()) return;
  std::vector<std::string> ranks;
  for (const std::string& key : missing) ranks.push_back(key.substr(prefix.size()));
  std::string listed;
  for (size_t i = 0; i < ranks.size() && i < 32; ++i) listed += (i ? ", " : "") + ranks[i];
  if (ranks.size() > 32) listed += fmt::format(" and {} more", ranks.size() - 32);
  throw std::runtime_error(fmt::format(
      "rendezvous store at {}: barrier '{}' timed out after {}: {} of {} ranks arrived; missing ranks: {}",
      endpoint_, name, describe(timeout), world_size - static_cast<int>(missing.size()), world_size, listed));
}

}  // namespace vimo::comm
