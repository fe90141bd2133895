// Defines ShardMapping: a shard file mapped read-only into memory, with a SIGBUS guard that turns a file
// shrinking under its mapping into a named error instead of a bare crash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace vimo::data {

// Process exit status when a mapped shard shrank while mapped (EX_IOERR of sysexits.h).
inline constexpr int kShardChangedExitCode = 74;

// The first `size` bytes of an open file, mapped read-only. See Note [Reading shards through a mapping] in
// data/shard_mapping.cpp. Not copyable; unmapped by the destructor.
class ShardMapping {
 public:
  // Maps `size` bytes of `fd` (which may be closed afterwards); `path` names the file in the SIGBUS message.
  // Returns a mapping whose data() is null when the file cannot be mapped (too many mappings, mmap failed):
  // callers then read with pread.
  ShardMapping(int fd, uint64_t size, const std::string& path);
  ~ShardMapping();
  ShardMapping(const ShardMapping&) = delete;
  ShardMapping& operator=(const ShardMapping&) = delete;
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  int slot_ = -1;  // in the SIGBUS guard's table
};

}  // namespace vimo::data
