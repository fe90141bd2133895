// The TCP rendezvous store: frame encoding, the Asio server (one io thread, parked waiters) and the blocking
// client with deadlines. See Note [Rendezvous protocol] in store.h.
#include "comm/store.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio.hpp>
#include <charconv>
#include <optional>
#include <set>
#include <stdexcept>
#include <string_view>
#include <unordered_map>

namespace vimo::comm {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

enum class MessageType : uint8_t {
  Hello = 1,
  Set = 2,
  Get = 3,
  Add = 4,
  Check = 5,
  Wait = 6,
  Ok = 64,
  Value = 65,
  Integer = 66,
  Bool = 67,
  Timeout = 68,
  Error = 69,
};
constexpr size_t kHeaderBytes = 8;
constexpr size_t kMaxPeerNameBytes = 256;
// Until a peer has presented the token it may send only a Hello, and a Hello this large at most: an
// unauthenticated peer cannot make the server allocate a value-sized buffer.
constexpr size_t kMaxHelloBytes = 8192;
// The server answers a Get or Wait when its timeout ends; the client waits this much longer for that answer.
constexpr milliseconds kReplyGrace{2000};
constexpr milliseconds kLongestServerWait = std::chrono::hours(24);

// A protocol violation by the peer: the connection is closed with this reason.
struct ProtocolError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string describe(milliseconds duration) {
  if (duration.count() < 1000) return fmt::format("{} ms", duration.count());
  return fmt::format("{:g} s", static_cast<double>(duration.count()) / 1000.0);
}

// Builds one frame: header, then fields appended in order.
class FrameWriter {
 public:
  explicit FrameWriter(MessageType type) : bytes_(kHeaderBytes, 0) {
    bytes_[0] = kStoreProtocolVersion;
    bytes_[1] = static_cast<uint8_t>(type);
  }
  FrameWriter& u8(uint8_t value) {
    bytes_.push_back(value);
    return *this;
  }
  FrameWriter& u64(uint64_t value) {
    for (int i = 0; i < 8; ++i) bytes_.push_back(static_cast<uint8_t>(value >> (8 * i)));
    return *this;
  }
  FrameWriter& bytes(std::span<const uint8_t> data) {
    put_u32(static_cast<uint32_t>(data.size()));
    bytes_.insert(bytes_.end(), data.begin(), data.end());
    return *this;
  }
  FrameWriter& text(std::string_view data) {
    return bytes({reinterpret_cast<const uint8_t*>(data.data()), data.size()});
  }
  FrameWriter& keys(const std::vector<std::string>& keys) {
    put_u32(static_cast<uint32_t>(keys.size()));
    for (const std::string& key : keys) text(key);
    return *this;
  }
  std::vector<uint8_t> finish() {
    const auto length = static_cast<uint32_t>(bytes_.size() - kHeaderBytes);
    for (int i = 0; i < 4; ++i) bytes_[4 + i] = static_cast<uint8_t>(length >> (8 * i));
    return std::move(bytes_);
  }

 private:
  void put_u32(uint32_t value) {
    for (int i = 0; i < 4; ++i) bytes_.push_back(static_cast<uint8_t>(value >> (8 * i)));
  }
  std::vector<uint8_t> bytes_;
};

struct Header {
  uint8_t version = 0;
  MessageType type{};
  uint32_t length = 0;
};

Header decode_header(const uint8_t* bytes) {
  Header header;
  header.version = bytes[0];
  header.type = static_cast<MessageType>(bytes[1]);
  for (int i = 0; i < 4; ++i) header.length |= static_cast<uint32_t>(bytes[4 + i]) << (8 * i);
  return header;
}

// Reads the fields of one payload, checking every length against what remains and against the limits.
class FrameReader {
 public:
  FrameReader(std::span<const uint8_t> payload, const StoreLimits& limits)
      : data_(payload), limits_(limits) {}

  uint8_t u8(const char* field) {
    need(1, field);
    return data_[position_++];
  }
  uint64_t u64(const char* field) {
    need(8, field);
    uint64_t value = 0;
    for (int i = 0; i < 8; ++i) value |= static_cast<uint64_t>(data_[position_ + i]) << (8 * i);
    position_ += 8;
    return value;
  }
  uint32_t u32(const char* field) {
    need(4, field);
    uint32_t value = 0;
    for (int i = 0; i < 4; ++i) value |= static_cast<uint32_t>(data_[position_ + i]) << (8 * i);
    position_ += 4;
    return value;
  }
  std::span<const uint8_t> bytes(const char* field, size_t limit) {
    const uint32_t size = u32(field);
    if (size > limit) {
      throw ProtocolError(fmt::format("the {} has {} bytes, over the limit of {}", field, size, limit));
    }
    need(size, field);
    const std::span<const uint8_t> result = data_.subspan(position_, size);
    position_ += size;
    return result;
  }
  std::string text(const char* field, size_t limit) {
    const std::span<const uint8_t> data = bytes(field, limit);
    return std::string(data.begin(), data.end());
  }
  std::string key() { return text("key", limits_.max_key_bytes); }
  std::vector<std::string> keys() {
    const uint32_t count = u32("key count");
    if (count > limits_.max_keys_per_request) {
      throw ProtocolError(
          fmt::format("{} keys in one request, over the limit of {}", count, limits_.max_keys_per_request));
    }
    std::vector<std::string> result;
    for (uint32_t i = 0; i < count; ++i) result.push_back(key());  // each key checks the remaining size
    return result;
  }
  void finish() const {
    if (position_ != data_.size()) {
      throw ProtocolError(fmt::format("{} unexpected bytes after the last field", data_.size() - position_));
    }
  }

 private:
  void need(size_t size, const char* field) const {
    if (size > data_.size() - position_) {
      throw ProtocolError(fmt::format("the {} needs {} bytes but the message has {} left", field, size,
                                      data_.size() - position_));
    }
  }
  std::span<const uint8_t> data_;
  const StoreLimits& limits_;
  size_t position_ = 0;
};

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

std::string join_quoted(const std::vector<std::string>& items, size_t shown) {
  std::string result;
  for (size_t i = 0; i < items.size() && i < shown; ++i)
    result += fmt::format("{}'{}'", i ? ", " : "", items[i]);
  if (items.size() > shown) result += fmt::format(" and {} more", items.size() - shown);
  return result;
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

void StoreServer::State::accept() {
  acceptor.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted) return;
    if (ec) {
      spdlog::warn("rendezvous store on port {}: accept failed: {}", port, ec.message());
    } else {
      std::make_shared<Session>(*this, std::move(socket))->start();
    }
    accept();
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
                    "another job may use the port (set VIMO_RENDEZVOUS_PORT)",
                    where, e.code().message()));
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
