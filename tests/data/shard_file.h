// Reads a shard's index straight from its bytes, as data/FORMAT.md lays it out (footer: record count, index
// offset, magic; index: uint64 offset[n], ...), so that tests check the offsets in error messages against the
// file rather than against the reader that produced them.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <fstream>
#include <string>

namespace vimo::testing {

inline uint64_t read_uint64_at(std::ifstream& in, uint64_t offset) {
  in.seekg(static_cast<std::streamoff>(offset));
  uint64_t value = 0;
  in.read(reinterpret_cast<char*>(&value), sizeof value);
  return value;
}

// The byte offset of record `record` in the shard at `path`, from the file's own index.
inline uint64_t indexed_record_offset(const std::string& path, uint64_t record) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  const auto size = static_cast<uint64_t>(in.tellg());
  const uint64_t count = read_uint64_at(in, size - 24);
  const uint64_t index = read_uint64_at(in, size - 16);
  EXPECT_LT(record, count) << path;
  const uint64_t offset = read_uint64_at(in, index + 8 * record);
  EXPECT_TRUE(in.good()) << "cannot read the index of " << path;
  return offset;
}

}  // namespace vimo::testing
