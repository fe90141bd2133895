// Defines the TCP backend's mesh (declared in comm/tcp_internal.h): forming the authenticated connections
// between the ranks, and the framed exchanges over them, each bound by a deadline. Built on Boost.Asio's
// asynchronous operations, run by the thread that calls until they finish or the deadline passes.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <climits>
#include <cstring>
#include <optional>
#include <utility>

#include "comm/tcp_internal.h"

namespace vimo::comm::tcp_detail {

// Note [Frames, tags and mailboxes]
// Every message on a mesh connection is a frame: a 24-byte header (magic u32 "VTCP", reserved u32 = 0,
// tag i64, payload bytes u64; little-endian, as every host vimo runs on) and the payload. Point-to-point
// messages carry the caller's tag (>= 0). A collective's messages carry -(1 + its number), the number
// counting the communicator's collectives, which every rank runs in the same order: each connection then
// delivers them in order, and a frame of another collective where one is awaited means the ranks made
// different calls (a MeshFailure naming both numbers, rather than a hang). A frame that no receive of the
// current exchange awaits (a message sent ahead, or a point-to-point message of another tag) is read into a
// mailbox of its peer and tag, where a later receive finds it; so a connection never stalls behind a message
// nobody reads yet. Payloads that are awaited are read straight into the receiver's buffer.
// The reading state lives in the peer, not in the exchange: an exchange that times out while a header is
// half read loses nothing, and the next exchange goes on from there. Only a payload cut in the middle of a
// caller's buffer, or a send cut in the middle, leaves the stream unusable.
constexpr uint32_t kFrameMagic = 0x50435456;  // "VTCP"
constexpr size_t kFrameHeaderBytes = 24;
constexpr uint64_t kMaxFrameBytes = uint64_t{1} << 40;  // a bound on what a header may claim
// A bound on a frame that no receive awaits yet, which this rank must hold in memory until one does (a
// collective's chunk sent ahead, a point-to-point message sent early): far above any chunk vimo sends.
constexpr uint64_t kMaxUnawaitedBytes = uint64_t{16} << 30;
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

template <class T>
void put(uint8_t* at, T value) {
  std::memcpy(at, &value, sizeof(T));
}
template <class T>
T get(const uint8_t* at) {
  T value;
  std::memcpy(&value, at, sizeof(T));
  return value;
}

std::array<uint8_t, kFrameHeaderBytes> frame_header(int64_t tag, uint64_t bytes) {
  std::array<uint8_t, kFrameHeaderBytes> header{};
  put<uint32_t>(header.data(), kFrameMagic);
  put<int64_t>(header.data() + 8, tag);
  put<uint64_t>(header.data() + 16, bytes);
  return header;
}

// "collective #7" or "tag 3".
std::string tag_text(int64_t tag) {
  return tag < 0 ? fmt::format("collective #{}", -tag - 1) : fmt::format("tag {}", tag);
}

bool is_loopback(const std::string& address) {
  boost::system::error_code ec;
  const auto parsed = asio::ip::make_address(address, ec);
  return ec || parsed.is_loopback();
}

}  // namespace

struct Peer {
  Peer(tcp::socket s, int r) : socket(std::move(s)), rank(r) {}
  tcp::socket socket;
  int rank;
  // Receiving (Note [Frames, tags and mailboxes]).
  std::array<uint8_t, kFrameHeaderBytes> header{};
  size_t header_have = 0;
  bool in_payload = false;
  int64_t tag = 0;
  uint64_t bytes = 0;
  uint64_t payload_have = 0;
  uint8_t* into = nullptr;  // where the payload goes: a receive's buffer or `spill`
  int into_recv = -1;       // the receive it fills, or -1 for the mailbox
  std::vector<uint8_t> spill;
  std::map<int64_t, std::deque<std::vector<uint8_t>>> mailbox;
  bool reading = false;
  bool writing = false;
};

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
  std::function<void()> accept_next = [&] {
    if (!forming) return;
    auto socket = std::make_shared<tcp::socket>(*io_);
    handshakes.push_back(socket);
    acceptor.async_accept(*socket, [&, socket](boost::system::error_code ec) {
      if (ec || !forming) return;
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
            asio::async_read(*socket, asio::buffer(*rest),
                             [&, socket, rest, length, from, refuse](boost::system::error_code ec, size_t) {
                               if (ec || !forming) return;
                               if (rest->compare(0, length, token_) != 0 || length != token_.size())
                                 return refuse(fmt::format("rank {} presented a wrong token", from));
                               const std::optional<Listener> where =
                                   decode_listener(std::string_view(*rest).substr(length));
                               if (!where)
                                 return refuse(fmt::format("rank {} sent a malformed address", from));
                               if (peers_[static_cast<size_t>(from)])
                                 return refuse(fmt::format("rank {} connected twice", from));
                               auto ack = std::make_shared<uint8_t>(1);
                               asio::async_write(
                                   *socket, asio::buffer(ack.get(), 1),
                                   [&, socket, ack, from, where](boost::system::error_code ec, size_t) {
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
    auto socket = std::make_shared<tcp::socket>(*io_);
    handshakes.push_back(socket);
    asio::async_connect(
        *socket, endpoints, [&, socket, to, retry](boost::system::error_code ec, const tcp::endpoint&) {
          if (ec) return retry(ec.message());
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
              *socket, asio::buffer(*hello),
              [&, socket, hello, to, retry](boost::system::error_code ec, size_t) {
                if (ec) return retry(ec.message());
                auto ack = std::make_shared<uint8_t>(0);
                asio::async_read(
                    *socket, asio::buffer(ack.get(), 1),
                    [&, socket, ack, to](boost::system::error_code ec, size_t) {
                      if (!forming) return;
                      if (ec || *ack != 1) {
                        // Refused: a wrong token or another communicator's port. Not worth retrying.
                        last_error[to] =
                            "the rank refused the connection (a wrong token, or another job's port)";
                        return;
                      }
                      peers_[static_cast<size_t>(to)] = std::make_unique<Peer>(std::move(*socket), to);
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
  for (auto& timer : timers) timer->cancel();
  for (auto& weak : handshakes) {
    if (auto socket = weak.lock()) socket->close(ignored);  // a socket moved into a Peer is closed already
  }
  io_->restart();
  io_->run();
  io_->restart();

  if (missing > 0) {
    std::vector<std::string> absent;
    for (int r = 0; r < ranks; ++r) {
      if (r == rank_ || peers_[static_cast<size_t>(r)]) continue;
      std::string text = name(r);
      if (auto it = last_error.find(r); it != last_error.end()) text += ": " + it->second;
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

std::string Mesh::name(int rank) const {
  const Listener& where = listeners_[static_cast<size_t>(rank)];
  if (where.port == 0) return fmt::format("rank {} (never connected)", rank);
  return fmt::format("rank {} ({}:{})", rank, where.host, where.port);
}

void Mesh::fail(const std::string& reason) {
  if (failure_.empty()) failure_ = reason;
}

bool Mesh::take_from_mailbox(Peer& peer, PendingRecv& pending) {
  auto it = peer.mailbox.find(pending.recv.tag);
  if (it == peer.mailbox.end() || it->second.empty()) return false;
  std::vector<uint8_t>& message = it->second.front();
  if (message.size() != pending.recv.bytes) {
    if (pending.recv.tag < 0) {
      fail(fmt::format("{} sent {} bytes for {}, but this rank expected {}: the ranks made different calls",
                       name(pending.recv.peer), message.size(), tag_text(pending.recv.tag),
                       pending.recv.bytes));
    } else {
      pending.mismatch = fmt::format("the message held {} bytes", message.size());
    }
  } else if (!message.empty()) {
    std::memcpy(pending.recv.data, message.data(), message.size());
  }
  it->second.pop_front();
  if (it->second.empty()) peer.mailbox.erase(it);
  pending.done = true;
  return true;
}

bool Mesh::wants_more(const Peer& peer) const {
  if (!failure_.empty()) return false;
  for (const PendingRecv& pending : recvs_) {
    if (!pending.done && peers_[static_cast<size_t>(pending.recv.peer)].get() == &peer) return true;
  }
  return false;
}

void Mesh::begin_payload(Peer& peer) {
  const uint8_t* h = peer.header.data();
  const int sender = peer.rank;
  if (get<uint32_t>(h) != kFrameMagic) {
    return fail(fmt::format("{} sent a frame without the magic number: the stream is corrupt", name(sender)));
  }
  peer.tag = get<int64_t>(h + 8);
  peer.bytes = get<uint64_t>(h + 16);
  if (peer.bytes > kMaxFrameBytes) {
    return fail(
        fmt::format("{} sent a frame claiming {} bytes: the stream is corrupt", name(sender), peer.bytes));
  }
  peer.in_payload = true;
  peer.payload_have = 0;
  peer.into_recv = -1;
  bool awaiting_collective = false;
  for (size_t i = 0; i < recvs_.size(); ++i) {
    PendingRecv& pending = recvs_[i];
    if (pending.done || pending.recv.peer != sender) continue;
    if (pending.recv.tag < 0) awaiting_collective = true;
    if (pending.recv.tag != peer.tag) continue;
    if (pending.recv.bytes != peer.bytes) {
      if (peer.tag < 0) {
        return fail(
            fmt::format("{} sent {} bytes for {}, but this rank expected {}: the ranks made different calls",
                        name(sender), peer.bytes, tag_text(peer.tag), pending.recv.bytes));
      }
      pending.mismatch = fmt::format("the message held {} bytes", peer.bytes);
      break;  // read into the mailbox's spill, then dropped
    }
    peer.into_recv = static_cast<int>(i);
    peer.into = static_cast<uint8_t*>(pending.recv.data);
    break;
  }
  if (peer.into_recv < 0) {
    if (peer.tag < 0 && awaiting_collective) {
      return fail(
          fmt::format("{} sent a message of {} while this rank waits in another collective: the ranks made "
                      "different calls "
                      "(every rank must make the same collective calls in the same order)",
                      name(sender), tag_text(peer.tag)));
    }
    if (peer.bytes > kMaxUnawaitedBytes) {
      return fail(
          fmt::format("{} sent a frame of {} bytes ({}) that no receive awaits, over the {} bytes such a "
                      "frame may hold",
                      name(sender), peer.bytes, tag_text(peer.tag), kMaxUnawaitedBytes));
    }
    try {
      peer.spill.resize(peer.bytes);
    } catch (const std::bad_alloc&) {
      return fail(fmt::format("no memory to hold a frame of {} bytes from {} ({}) until it is received",
                              peer.bytes, name(sender), tag_text(peer.tag)));
    }
    peer.into = peer.spill.data();
  }
  if (peer.bytes == 0) finish_payload(peer);
}

void Mesh::finish_payload(Peer& peer) {
  if (peer.into_recv >= 0) {
    recvs_[static_cast<size_t>(peer.into_recv)].done = true;
    --recvs_left_;
  } else {
    // A message read into the spill belongs to a pending receive of its tag when there is one: one whose size
    // did not match takes it as its error; one begun after the frame was routed (an exchange that timed out
    // while this frame was half read) takes it as its message, ahead of anything later. Otherwise it waits in
    // the mailbox, behind the earlier messages of its tag.
    bool taken = false;
    for (PendingRecv& pending : recvs_) {
      if (pending.done || pending.recv.tag != peer.tag || pending.recv.peer != peer.rank) continue;
      if (pending.mismatch.empty() && pending.recv.bytes != peer.bytes) {
        if (peer.tag < 0) {
          fail(fmt::format(
              "{} sent {} bytes for {}, but this rank expected {}: the ranks made different calls",
              name(peer.rank), peer.bytes, tag_text(peer.tag), pending.recv.bytes));
          break;
        }
        pending.mismatch = fmt::format("the message held {} bytes", peer.bytes);
      } else if (pending.mismatch.empty() && !peer.spill.empty()) {
        std::memcpy(pending.recv.data, peer.spill.data(), peer.spill.size());
      }
      pending.done = true;
      --recvs_left_;
      taken = true;
      break;
    }
    if (!taken) peer.mailbox[peer.tag].push_back(std::move(peer.spill));
    peer.spill = {};
  }
  peer.in_payload = false;
  peer.header_have = 0;
  peer.into = nullptr;
  peer.into_recv = -1;
}

// How a peer's connection ended, as errors say it: "closed its connection (it exited or failed)" for the
// ways a dead process's socket ends, else the error itself.
std::string connection_lost(const boost::system::error_code& ec) {
  if (ec == asio::error::eof || ec == asio::error::connection_reset || ec == asio::error::broken_pipe)
    return "closed its connection (it exited or failed)";
  return "broke its connection: " + ec.message();
}

void Mesh::read_more(Peer& peer) {
  if (peer.reading || draining_ || !wants_more(peer)) return;
  peer.reading = true;
  auto on_read = [this, &peer](boost::system::error_code ec, size_t n) {
    peer.reading = false;
    if (peer.in_payload) {
      peer.payload_have += n;
    } else {
      peer.header_have += n;
    }
    if (ec) {
      if (ec != asio::error::operation_aborted && !draining_) {  // closing while draining is ours
        fail(fmt::format("{} {}", name(peer.rank), connection_lost(ec)));
      }
      return;
    }
    if (!peer.in_payload && peer.header_have == kFrameHeaderBytes) begin_payload(peer);
    if (peer.in_payload && peer.payload_have == peer.bytes && failure_.empty()) finish_payload(peer);
    read_more(peer);
  };
  if (peer.in_payload) {
    peer.socket.async_read_some(asio::buffer(peer.into + peer.payload_have, peer.bytes - peer.payload_have),
                                on_read);
  } else {
    peer.socket.async_read_some(
        asio::buffer(peer.header.data() + peer.header_have, kFrameHeaderBytes - peer.header_have), on_read);
  }
}

// Note [Ending an exchange that did not finish]
// A cancel ends only the operations still waiting in the reactor: a read that has completed but whose handler
// is queued is past cancelling, and its handler would start the next read, which nothing cancels (a recv of
// a 20 ms timeout then waited as long as the peer kept sending other tags). So the drain runs with
// `draining_` set, under which no read starts. A write still pending means a peer is not reading: the stream
// is lost anyway, so on failure or an unfinished send every socket closes (the peers then fail at once,
// naming this rank, instead of at their own timeouts). Afterwards, a payload half read into a receive's
// buffer, which the caller is about to get back, moves into the spill with what has arrived so far, and goes
// on there at the next exchange: a receive that timed out loses nothing of its stream.
void Mesh::stop_exchange() {
  boost::system::error_code ignored;
  const bool close = !failure_.empty() || writes_left_ > 0;
  draining_ = true;
  for (auto& peer : peers_) {
    if (!peer) continue;
    if (close) {
      peer->socket.close(ignored);
    } else if (peer->reading || peer->writing) {
      peer->socket.cancel(ignored);
    }
  }
  io_->restart();
  try {
    io_->run();
  } catch (const std::exception& e) {
    fail(fmt::format("an exchange failed while stopping: {}", e.what()));
  }
  draining_ = false;
  for (auto& peer : peers_) {
    if (!peer || !peer->in_payload || peer->into_recv < 0) continue;
    peer->spill.assign(peer->into, peer->into + peer->payload_have);
    peer->spill.resize(peer->bytes);
    peer->into = peer->spill.data();
    peer->into_recv = -1;
  }
}

void Mesh::exchange(std::span<const Send> sends, std::span<const Recv> recvs, Clock::time_point deadline) {
  if (!broken_.empty()) throw MeshFailure(broken_);
  failure_.clear();
  recvs_.clear();
  for (const Recv& recv : recvs) recvs_.push_back(PendingRecv{recv, false, ""});
  recvs_left_ = recvs_.size();
  for (PendingRecv& pending : recvs_) {
    if (take_from_mailbox(*peers_[static_cast<size_t>(pending.recv.peer)], pending)) --recvs_left_;
  }
  send_headers_.resize(sends.size());
  writes_left_ = sends.size();
  for (size_t i = 0; i < sends.size(); ++i) {
    const Send& send = sends[i];
    Peer& peer = *peers_[static_cast<size_t>(send.peer)];
    send_headers_[i] = frame_header(send.tag, send.bytes);
    const std::array<asio::const_buffer, 2> buffers{asio::buffer(send_headers_[i]),
                                                    asio::buffer(send.data, send.bytes)};
    peer.writing = true;
    asio::async_write(peer.socket, buffers,
                      [this, &peer, to = send.peer](boost::system::error_code ec, size_t) {
                        peer.writing = false;
                        if (ec) {
                          if (ec != asio::error::operation_aborted && !draining_)
                            fail(fmt::format("sending to {} failed: it {}", name(to), connection_lost(ec)));
                          return;
                        }
                        --writes_left_;
                      });
  }
  for (auto& peer : peers_) {
    if (peer) read_more(*peer);
  }

  io_->restart();
  try {
    while ((recvs_left_ > 0 || writes_left_ > 0) && failure_.empty() && Clock::now() < deadline) {
      if (io_->run_one_until(deadline) == 0 && io_->stopped()) break;
    }
  } catch (const std::exception& e) {  // a handler threw: nothing of this exchange can be trusted
    fail(fmt::format("an exchange failed: {}", e.what()));
  }
  if (recvs_left_ > 0 || writes_left_ > 0 || !failure_.empty()) stop_exchange();
  if (!failure_.empty()) {
    broken_ = failure_;
    throw MeshFailure(broken_);
  }
  if (recvs_left_ > 0 || writes_left_ > 0) {
    std::vector<std::string> waiting;
    for (const PendingRecv& pending : recvs_) {
      if (!pending.done) waiting.push_back(name(pending.recv.peer));
    }
    const std::string what = waiting.empty() ? std::string("the sends had not finished")
                                             : fmt::format("still waiting for {}", fmt::join(waiting, ", "));
    const bool usable = writes_left_ == 0;  // a send cut in the middle has left its stream unusable
    if (!usable) broken_ = "an earlier exchange timed out with a send cut in the middle (" + what + ")";
    throw MeshTimeout(what, usable);
  }
  for (const PendingRecv& pending : recvs_) {
    if (!pending.mismatch.empty()) throw MessageSizeMismatch(pending.mismatch);
  }
}

}  // namespace vimo::comm::tcp_detail
