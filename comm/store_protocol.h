// Defines the frames of Note [Rendezvous protocol] (comm/store.h) that the store's server
// (comm/store_server.cpp) and client (comm/store_client.cpp) exchange: the message types, FrameWriter, the
// header, and FrameReader with its bounds checks. Internal to comm/, not part of vimo's API.
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "comm/store.h"

namespace vimo::comm::store_detail {

using std::chrono::milliseconds;

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
inline constexpr size_t kHeaderBytes = 8;

// The longest a Get or Wait may park on the server; the client caps its timeouts to it.
inline constexpr milliseconds kLongestServerWait = std::chrono::hours(24);

// A protocol violation by the peer: the connection is closed with this reason.
struct ProtocolError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::string describe(milliseconds duration) {
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

inline Header decode_header(const uint8_t* bytes) {
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

// Note [A connection to itself]
// A TCP connect to a local port that nothing listens on can connect the socket to itself: when the kernel
// picks that very port as the connection's own (it walks the ephemeral range, from 32768 by default, on each
// retry to one destination), both ends are one socket, and TCP's simultaneous open completes. A store client
// that retries while rank 0's server is not up yet can do that when the store's port lies in the ephemeral
// range (a MASTER_PORT drawn at random, say): it would then read its own hello as the answer, and hold the
// port the server is about to bind. The client checks for it after every connect, closes such a connection
// and retries, as after a refusal.
//
// Whether the connected socket `fd` has itself as its peer (same address and port at both ends).
bool connected_to_itself(int fd);

}  // namespace vimo::comm::store_detail
