// Defines what the files of the TCP backend (comm/tcp_*.cpp) share, none of it part of vimo's API: Mesh, the
// authenticated TCP connections between the ranks of one communicator and the framed, deadline-bound
// exchanges the collectives are built from, and where a rank listens (Listener).
#pragma once

#include <array>
#include <boost/asio.hpp>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace vimo::comm::tcp_detail {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

// Where a rank listens for its mesh's connections.
struct Listener {
  std::string host;     // its host name: ranks with the same one connect over loopback
  std::string address;  // its address on the route to the store, for ranks on other hosts
  uint16_t port = 0;
};

// A failure after which the mesh is unusable: a peer closed its connection or broke the protocol, or a
// timeout cut a message in the middle. Every later exchange throws it again.
struct MeshFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An exchange that did not finish before its deadline. `usable`: only point-to-point receives were given up
// and the connections stay open; otherwise this rank closed them (Note [Ending an exchange that did not
// finish] in tcp_mesh.cpp) and the mesh is unusable.
struct MeshTimeout : std::runtime_error {
  MeshTimeout(const std::string& what, bool still_usable) : std::runtime_error(what), usable(still_usable) {}
  bool usable;
};

// A receive that got a message of another size than it expected (point-to-point only: in a collective that
// is a MeshFailure). The message was read and dropped, so the mesh goes on.
struct MessageSizeMismatch : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// One message to send or receive in an exchange. Tags >= 0 are point-to-point; collectives use negative ones
// (Note [Frames, tags and mailboxes] in tcp_mesh.cpp).
struct Send {
  int peer;
  int64_t tag;
  const void* data;
  size_t bytes;
};
struct Recv {
  int peer;
  int64_t tag;
  void* data;
  size_t bytes;
};

// The listening socket of a mesh being formed, with the io_context the mesh will run on.
struct MeshSeed {
  std::unique_ptr<asio::io_context> io;
  std::unique_ptr<tcp::acceptor> acceptor;
  uint16_t port = 0;
};
// "host\naddress\nport", as ranks publish it; decode_listener returns nullopt for a malformed one.
std::string encode_listener(const Listener& where);
std::optional<Listener> decode_listener(std::string_view text);

// Listens on an ephemeral port of every IPv4 interface. Throws std::runtime_error when it cannot.
MeshSeed open_listener();

// This host's name (gethostname).
std::string this_host_name();
// This host's address on the route to host:port (the store's), by connecting a UDP socket there, which
// sends nothing; the host name when that fails.
std::string address_towards(const std::string& host, uint16_t port);

// Every frame's header: Note [Frames, tags and mailboxes] in tcp_mesh.cpp.
inline constexpr size_t kFrameHeaderBytes = 24;

// Little-endian fields of the wire formats (every host vimo runs on is little-endian).
template <class T>
inline void put(uint8_t* at, T value) {
  std::memcpy(at, &value, sizeof(T));
}
template <class T>
inline T get(const uint8_t* at) {
  T value;
  std::memcpy(&value, at, sizeof(T));
  return value;
}

// One connection of the mesh and its receiving state.
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
  uint64_t mailbox_bytes = 0;  // held in `mailbox`, bounded by unawaited_limit() (tcp_mesh.cpp)
  bool reading = false;
  bool writing = false;
};

// The connections of one rank to every other rank of a communicator, used by one thread at a time.
class Mesh {
 public:
  // Connects rank known.size() - 1 of `size` ranks, `known` being where ranks 0..rank listen (this one on
  // `seed`): it connects to every lower rank and accepts every higher one. Each connection opens with a hello
  // carrying `mesh_id`, the connecting rank, `token` and where it listens; a connection with a wrong one is
  // logged and closed, and the mesh keeps waiting for the right one. Throws std::runtime_error at `deadline`
  // naming the ranks missing.
  Mesh(MeshSeed seed, int size, std::vector<Listener> known, uint64_t mesh_id, std::string token,
       Clock::time_point deadline);
  ~Mesh();
  Mesh(const Mesh&) = delete;
  Mesh& operator=(const Mesh&) = delete;

  int rank() const { return rank_; }
  int size() const { return static_cast<int>(listeners_.size()); }
  const Listener& listener(int rank) const { return listeners_[static_cast<size_t>(rank)]; }
  const std::string& token() const { return token_; }
  uint64_t id() const { return id_; }

  // Moves every send and receive at once and returns when all are done. At most one send per peer. Throws
  // MeshTimeout at `deadline`, MessageSizeMismatch (after the other messages finished) and MeshFailure.
  void exchange(std::span<const Send> sends, std::span<const Recv> recvs, Clock::time_point deadline);

  // Why the mesh is unusable, or "".
  const std::string& broken() const { return broken_; }

 private:
  struct PendingRecv {
    Recv recv;
    bool done = false;
    std::string mismatch;  // a point-to-point message of another size: what to report
  };

  void read_more(Peer& peer);
  void begin_payload(Peer& peer);
  void finish_payload(Peer& peer);
  bool wants_more(const Peer& peer) const;
  bool take_from_mailbox(Peer& peer, PendingRecv& pending);
  void fail(const std::string& reason);
  bool stop_exchange(bool collective);  // Note [Ending an exchange that did not finish] in tcp_mesh.cpp
  std::string name(int rank) const;     // "rank 3 (host:port)"

  std::unique_ptr<asio::io_context> io_;
  std::vector<Listener> listeners_;
  int rank_;
  uint64_t id_;
  std::string token_;
  std::vector<std::unique_ptr<Peer>> peers_;  // by rank; null for this rank
  std::string broken_;

  // The exchange in progress.
  std::vector<PendingRecv> recvs_;
  size_t recvs_left_ = 0;
  size_t writes_left_ = 0;
  std::vector<std::array<uint8_t, 24>> send_headers_;
  std::string failure_;    // set by a handler: the exchange fails
  bool draining_ = false;  // stop_exchange runs the handlers left: none may start another read
};

}  // namespace vimo::comm::tcp_detail
