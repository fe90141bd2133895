// The shard format's byte layout, shared by the files that implement shard.h (internal to data/): the sizes
// of the header, footer and index entries, and the small helpers that write and check them.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "data/shard.h"

namespace vimo::data::shard_layout {

// Note [Native little-endian I/O]: the format is little-endian, and integers are written and read with
// memcpy of their native representation. That is correct only on little-endian hosts (x86-64, aarch64
// Linux), which this assertion pins down; a big-endian port would byte-swap in put() below and in
// RecordParser::get() (shard_reader.cpp).
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "vimo shards are little-endian: see Note [Native little-endian I/O]");

constexpr uint64_t kHeaderSize = sizeof(kShardMagic) + 2 * sizeof(uint32_t);  // 16
constexpr uint64_t kFooterSize = 2 * sizeof(uint64_t) + sizeof(kShardMagic);  // 24
constexpr uint64_t kIndexEntrySize = 3 * sizeof(uint64_t);  // offset + checksum + encoded size
constexpr uint64_t kMaxZstdExpansion = 32768;               // 128 KiB of output per 4 bytes of input
constexpr const char* kRegenerateHint = "the file is corrupt: regenerate it";

inline std::string hex(uint64_t value) { return fmt::format("{:#018x}", value); }

inline std::string printable_magic(const char* bytes) {
  std::string out;
  for (int i = 0; i < 8; ++i) {
    const auto c = static_cast<unsigned char>(bytes[i]);
    out += (c >= 0x20 && c < 0x7f) ? std::string(1, static_cast<char>(c)) : fmt::format("\\x{:02x}", c);
  }
  return out;
}

// Product of a shape's extents times the element size, or throws when it overflows or is negative.
// `where` names the field or record in the error ("field 'x'").
uint64_t checked_byte_count(const std::vector<int64_t>& shape, DType dtype, std::string_view where);

inline bool valid_dtype(uint8_t code) { return code >= 1 && code <= 7; }

template <typename T>
inline void put(std::vector<uint8_t>& out, T value) {
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  out.insert(out.end(), p, p + sizeof(T));
}

}  // namespace vimo::data::shard_layout
