// Defines the framed exchanges of the TCP backend's mesh (declared in comm/tcp_internal.h; its connections
// are formed in tcp_handshake.cpp), each bound by a deadline. Built on Boost.Asio's asynchronous operations,
// run by the thread that calls until they finish or the deadline passes.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cstdio>
#include <cstdlib>
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
constexpr uint32_t kFrameMagic = 0x50435456;            // "VTCP"
constexpr uint64_t kMaxFrameBytes = uint64_t{1} << 40;  // a bound on what a header may claim
namespace {

// Note [A bound on unawaited frames]
// A frame that no receive awaits yet (a collective's chunk sent ahead, a point-to-point message sent early)
// must be held in memory until a receive takes it: the stream cannot be read past it otherwise. What one
// peer's frames may hold that way, in all, is bounded, by default at 16 GiB (far above any chunk vimo sends,
// below the memory of the hosts it runs on): a peer that sends much more than the receiver takes fails the
// receiver's call, naming the peer and the sizes, instead of growing this process until the kernel kills it.
// Like MPI's unexpected-message queue, but with a bound that says so. The sender is not slowed down instead:
// the frames a call awaits may come behind the unawaited ones, so a receiver that stopped reading could wait
// for them forever. VIMO_TCP_MAX_UNAWAITED_BYTES sets the bound (bytes, at least 1), for tests and for hosts
// with less memory.
uint64_t unawaited_limit() {
  static const uint64_t limit = [] {
    constexpr uint64_t kDefault = uint64_t{16} << 30;
    const char* text = std::getenv("VIMO_TCP_MAX_UNAWAITED_BYTES");
    if (text == nullptr || *text == '\0') return kDefault;
    char* end = nullptr;
    errno = 0;
    const unsigned long long value = std::strtoull(text, &end, 10);
    if (errno != 0 || *end != '\0' || value == 0 || text[0] == '-') {
      std::fprintf(stderr,
                   "vimo: VIMO_TCP_MAX_UNAWAITED_BYTES='%s' is not a positive number of bytes; using %llu\n",
                   text, static_cast<unsigned long long>(kDefault));
      return kDefault;
    }
    return static_cast<uint64_t>(value);
  }();
  return limit;
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

}  // namespace

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
  peer.mailbox_bytes -= message.size();
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
    if (peer.bytes > unawaited_limit() - std::min(peer.mailbox_bytes, unawaited_limit())) {
      return fail(fmt::format(
          "{} sent a frame of {} bytes ({}) that no receive awaits, while {} bytes of its earlier frames "
          "wait for receives: over the {} bytes this rank holds for a peer (Note [A bound on unawaited "
          "frames]). HINT: receive point-to-point messages before their sender gets that far ahead, or raise "
          "VIMO_TCP_MAX_UNAWAITED_BYTES",
          name(sender), peer.bytes, tag_text(peer.tag), peer.mailbox_bytes, unawaited_limit()));
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
    if (!taken && peer.tag < 0 && failure_.empty()) {
      for (const PendingRecv& pending : recvs_) {
        if (!pending.done && pending.recv.peer == peer.rank && pending.recv.tag < 0) {
          fail(fmt::format(
              "{} sent a message of {} while this rank waits in {}: the ranks made different calls "
              "(every rank must make the same collective calls in the same order)",
              name(peer.rank), tag_text(peer.tag), tag_text(pending.recv.tag)));
          break;
        }
      }
    }
    if (!taken) {
      peer.mailbox_bytes += peer.spill.size();
      peer.mailbox[peer.tag].push_back(std::move(peer.spill));
    }
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
// `draining_` set, under which no read starts, and it first runs the handlers that are ready: when they
// complete the exchange after all, it succeeds. Otherwise every socket closes when the stream is lost or the
// communicator will be: on a failure (also one found while draining), a send still pending (a peer is not
// reading), or a collective's exchange (a collective that timed out breaks the communicator). The peers then
// fail at once, naming this rank, instead of at their own timeouts. A point-to-point receive that timed out
// only cancels; a payload half read into its buffer, which the caller is about to get back, moves into the
// spill with what has arrived so far and goes on there at the next exchange, so it loses nothing of its
// stream. Returns whether the sockets were closed.
bool Mesh::stop_exchange(bool collective) {
  boost::system::error_code ignored;
  draining_ = true;
  const auto drain = [&](bool all) {
    io_->restart();
    try {
      if (all) {
        io_->run();
      } else {
        io_->poll();
      }
    } catch (const std::exception& e) {
      fail(fmt::format("an exchange failed while stopping: {}", e.what()));
    }
  };
  drain(false);
  if (recvs_left_ == 0 && writes_left_ == 0 && failure_.empty()) {
    draining_ = false;
    return false;
  }
  const auto close_all = [&] {
    for (auto& peer : peers_) {
      if (peer) peer->socket.close(ignored);
    }
  };
  bool closed = !failure_.empty() || writes_left_ > 0 || collective;
  if (closed) {
    close_all();
  } else {
    for (auto& peer : peers_) {
      if (peer && (peer->reading || peer->writing)) peer->socket.cancel(ignored);
    }
  }
  drain(true);
  if (!closed && !failure_.empty()) {
    close_all();
    closed = true;
  }
  draining_ = false;
  if (closed) return true;
  for (auto& peer : peers_) {
    if (!peer || !peer->in_payload || peer->into_recv < 0) continue;
    try {
      peer->spill.assign(peer->into, peer->into + peer->payload_have);
      peer->spill.resize(peer->bytes);
    } catch (const std::bad_alloc&) {
      fail(fmt::format("no memory to hold the rest of a frame of {} bytes from {}", peer->bytes,
                       name(peer->rank)));
      close_all();
      return true;
    }
    peer->into = peer->spill.data();
    peer->into_recv = -1;
  }
  return false;
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
  bool closed = false;
  if (recvs_left_ > 0 || writes_left_ > 0 || !failure_.empty()) {
    const bool collective =
        std::any_of(sends.begin(), sends.end(), [](const Send& x) { return x.tag < 0; }) ||
        std::any_of(recvs.begin(), recvs.end(), [](const Recv& x) { return x.tag < 0; });
    closed = stop_exchange(collective);
  }
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
    if (closed)
      broken_ = fmt::format("an earlier exchange timed out ({}) and this rank closed its connections", what);
    throw MeshTimeout(what, !closed);
  }
  for (const PendingRecv& pending : recvs_) {
    if (!pending.mismatch.empty()) throw MessageSizeMismatch(pending.mismatch);
  }
}

}  // namespace vimo::comm::tcp_detail
