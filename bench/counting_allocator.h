// Defines CountingAllocator, a wrapper around LibTorch's CPU allocator that counts live tensor bytes and
// their high-water mark, and counting_allocator(), which installs one with c10::SetCPUAllocator on first use.
// The benchmarks report measured peak memory with it: call counting_allocator() before any tensor exists so
// every block is counted on both sides; allocations that bypass c10's allocator (BLAS workspaces,
// std::vector) are not seen.
#pragma once

#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdint>

namespace vimo::bench {

class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t bytes) override {
    c10::DataPtr inner = base_->allocate(bytes);
    void* data = inner.get();
    const c10::Device device = inner.device();
    const int64_t live = live_.fetch_add(static_cast<int64_t>(bytes)) + static_cast<int64_t>(bytes);
    int64_t peak = peak_.load();
    while (live > peak && !peak_.compare_exchange_weak(peak, live)) {
    }
    return {data, new Block{std::move(inner), bytes, this}, &release, device};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t live() const { return live_.load(); }
  int64_t peak() const { return peak_.load(); }
  void reset_peak() { peak_.store(live_.load()); }

 private:
  struct Block {
    c10::DataPtr inner;  // frees through the base allocator when destroyed
    size_t bytes;
    CountingAllocator* owner;
  };
  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    block->owner->live_.fetch_sub(static_cast<int64_t>(block->bytes));
    delete block;
  }

  c10::Allocator* base_;
  std::atomic<int64_t> live_{0}, peak_{0};
};

inline CountingAllocator& counting_allocator() {
  static CountingAllocator* allocator = [] {
    auto* a = new CountingAllocator(c10::GetDefaultCPUAllocator());
    c10::SetCPUAllocator(a, /*priority=*/100);
    return a;
  }();
  return *allocator;
}

}  // namespace vimo::bench
