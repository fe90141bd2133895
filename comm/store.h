// Defines vimo::comm::StoreServer and StoreClient: the TCP rendezvous store (a small key-value server that
// rank 0 runs) through which ranks launched without MPI find each other, exchange the NCCL unique id and meet
// at barriers. Built on Boost.Asio; authenticated by a per-job token; every message bounded.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

namespace vimo::comm {

// Note [Rendezvous protocol]
// One TCP connection per client, carrying request/reply pairs in order (the client is synchronous). Every
// message, both ways, is a frame:
//   header  version:u8 (= kStoreProtocolVersion)  type:u8  reserved:u16 (= 0)  length:u32   8 bytes
//   payload `length` bytes
// Integers are little-endian. Inside a payload: bytes = u32 size + data; keys = u32 count + count × bytes;
// u8 is 1 byte, i64 / u64 are 8. Types: Hello 1, Set 2, Get 3, Add 4, Check 5, Wait 6; replies Ok 64,
// Value 65, Integer 66, Bool 67, Timeout 68, Error 69 (payload: bytes message).
//   request                       payload                        reply
//   Hello  (must come first)      bytes token, bytes peer name   Ok | Error (then the server closes)
//   Set                           bytes key, bytes value         Ok
//   Get                           bytes key, u64 timeout_ms      Value(bytes) | Timeout(keys missing)
//   Add                           bytes key, i64 delta           Integer(i64) | Error (not a counter)
//   Check                         keys                           Bool(u8)
//   Wait                          keys, u64 timeout_ms           Ok | Timeout(keys missing)
// Counters made by Add are stored as decimal text, so `get` of a counter reads "42".
// Get and Wait park on the server until their keys exist or their timeout ends, so a waiting rank costs no
// polling; the server answers Timeout with the keys still missing, which is how a barrier names the ranks
// that never arrived (Note [Store barrier] in store_client.cpp). Bounds are checked on the header before
// anything is allocated: before its Hello succeeds a peer may send one frame of at most 8 KiB; after it,
// frames of at most StoreLimits::max_frame_bytes(). A longer frame, a key over max_key_bytes, a value over
// max_value_bytes, more than max_keys_per_request keys, a wrong version, an unknown type, a field running
// past its frame or bytes after the last field: each gets an Error reply, is logged, and closes that
// connection only. A wrong token gets a generic Error (nothing about the right one) and is closed, and so is
// a peer that sends no Hello within the handshake timeout.
constexpr uint8_t kStoreProtocolVersion = 1;

struct StoreLimits {
  std::size_t max_key_bytes = 4096;
  std::size_t max_value_bytes = std::size_t{64} << 20;
  std::size_t max_keys_per_request = 65536;
  // The largest payload a frame may claim: one key and one value plus the field headers.
  std::size_t max_frame_bytes() const { return max_value_bytes + max_key_bytes + 64; }
};

struct StoreServerOptions {
  std::string host = "0.0.0.0";  // the address to listen on
  uint16_t port = 0;             // 0: an ephemeral port, read back with StoreServer::port()
  std::string token;             // every peer must present it; must not be empty
  StoreLimits limits;
  std::chrono::milliseconds handshake_timeout{10000};  // a connection must say Hello within this
};

// Serves the store on a thread of its own until destroyed; many clients at once.
class StoreServer {
 public:
  // Listens before returning, so clients may connect as soon as it exists. Throws std::runtime_error naming
  // host:port when it cannot listen.
  explicit StoreServer(StoreServerOptions options);
  ~StoreServer();
  StoreServer(const StoreServer&) = delete;
  StoreServer& operator=(const StoreServer&) = delete;

  uint16_t port() const;
  // Connections closed for a wrong token or a protocol violation, since start.
  std::size_t rejected_connections() const;
  // Get and Wait requests parked now, waiting for keys.
  std::size_t waiting_requests() const;

  struct State;  // the io thread's state (store_server.cpp)

 private:
  std::unique_ptr<State> state_;
  std::thread thread_;
};

struct StoreClientOptions {
  std::string host;
  uint16_t port = 0;
  std::string token;
  int rank = -1;  // this peer's rank: names it in the server's log; barrier() needs it
  std::chrono::milliseconds connect_timeout{30000};    // retry connecting (with backoff) until this passes
  std::chrono::milliseconds operation_timeout{30000};  // default for every operation
  StoreLimits limits;
};

// A connection to the store. Calls are serialized (a mutex), blocking, and each has a deadline. Errors are
// std::runtime_error starting "rendezvous store at host:port: ". After a transport error or a client-side
// timeout the connection is closed and every later call fails; make a new client.
class StoreClient {
 public:
  // Connects and authenticates, retrying refused or unreachable connects with exponential backoff until
  // connect_timeout passes. A rejected token fails at once.
  explicit StoreClient(StoreClientOptions options);
  ~StoreClient();
  StoreClient(const StoreClient&) = delete;
  StoreClient& operator=(const StoreClient&) = delete;

  void set(const std::string& key, std::span<const uint8_t> value);
  // Blocks until `key` exists, then returns its value; fails naming the key after `timeout`.
  std::vector<uint8_t> get(const std::string& key);
  std::vector<uint8_t> get(const std::string& key, std::chrono::milliseconds timeout);
  // Blocks until every key exists; fails naming the missing keys after `timeout`.
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout);
  // Atomically adds `delta` to the counter `key` (0 when absent) and returns the new value.
  int64_t add(const std::string& key, int64_t delta);
  // Whether every key exists now.
  bool check(const std::vector<std::string>& keys);
  // Returns when all `world_size` ranks have entered the barrier `name` (each calls it with its own rank
  // and the same world size); fails after `timeout` naming the ranks that did not arrive. The same name may
  // be used again: each rank counts its own rounds, and all ranks pass the same barriers in the same order.
  void barrier(const std::string& name, int world_size, std::chrono::milliseconds timeout);

  // "host:port", as errors name it.
  const std::string& endpoint() const { return endpoint_; }

  struct Connection;  // the socket and its io_context (store_client.cpp)

 private:
  StoreClientOptions options_;
  std::string endpoint_;
  std::mutex mutex_;
  std::unique_ptr<Connection> connection_;
  std::map<std::string, int> barrier_rounds_;  // name -> barriers of that name passed so far
};

}  // namespace vimo::comm
