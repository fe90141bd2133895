// Defines vimo::comm::ShmAllreduce: the in-place all-reduce (sum or average) of float32 / float64 buffers
// between the ranks of one host through one shared-memory segment, without MPI's transport. GradientReducer
// uses it for its CPU buckets when every rank of its communicator is on this host (Note [A shared-memory
// all-reduce for one host] in comm/shm_allreduce.cpp).
//
//   std::string why_not;
//   auto shm = ShmAllreduce::create(*comm, capacity_bytes, &why_not);   // a collective; null: use MPI
//   at::Tensor flat = shm->allocate(numel, at::kFloat);                   // the same sequence on every rank
//   ... write into flat ...
//   std::shared_ptr<Work> work = shm->allreduce_async(flat, ReduceOp::Avg); work->wait();
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "comm/communicator.h"

namespace vimo::comm {

class ShmAllreduce {
 public:
  // A collective over `comm` (every rank calls it): maps one segment with `capacity_bytes` for each rank.
  // Returns null on every rank, with the reason in `*why_not` when given, when the ranks do not share this
  // host's shared memory (another host, another container), when the segment cannot be made (for instance
  // /dev/shm too small for size() × capacity_bytes), or when comm has one rank. Operations time out after
  // comm.timeout() as it is now. Throws std::invalid_argument when capacity_bytes is not positive.
  static std::unique_ptr<ShmAllreduce> create(Communicator& comm, int64_t capacity_bytes,
                                              std::string* why_not = nullptr);
  ~ShmAllreduce();
  ShmAllreduce(const ShmAllreduce&) = delete;
  ShmAllreduce& operator=(const ShmAllreduce&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int64_t capacity_bytes() const { return capacity_; }

  // A zeroed, contiguous tensor [numel] of `dtype` (float32 or float64; numel may be 0) in this rank's part
  // of the segment, aligned to 64 bytes. Every rank must allocate the same sequence of sizes and dtypes, so
  // that a tensor sits at the same offset in every rank's part. Throws std::invalid_argument for another
  // dtype and std::length_error when the capacity is used up. The tensor must not outlive this object.
  at::Tensor allocate(int64_t numel, at::ScalarType dtype);

  // Starts the in-place all-reduce of `tensor` with ReduceOp::Sum or ReduceOp::Avg. `tensor`: one from
  // allocate(), or a contiguous 1-D piece of what allocate() handed out that starts on a 64-byte boundary
  // (the same piece on every rank); anything else, or another op, throws std::invalid_argument, and a call
  // after a failed operation throws std::runtime_error. Every rank must start the same tensors, in the same
  // order, with the same op. The operations run one after another on this object's thread; the tensor
  // belongs to the operation until its Work has finished, and once it has, every rank holds bit-identical
  // results (each part is summed once, over the ranks in rank order, by the rank that owns it).
  // Work::wait() throws std::runtime_error when a rank has not arrived within the timeout (naming it); this
  // object is then unusable.
  std::shared_ptr<Work> allreduce_async(const at::Tensor& tensor, ReduceOp op);

 private:
  struct Operation;
  class ShmWork;
  struct Control;  // the segment's header: one progress counter per rank

  ShmAllreduce() = default;
  void run_worker();
  void execute(Operation& op);
  // Waits until every rank's counter has reached `target`; throws naming the ranks behind once `op` has run
  // for the timeout, or naming a rank whose operation failed.
  void wait_for_all(uint64_t target, const Operation& op);
  char* part(int rank) const;  // the start of `rank`'s part of the segment

  int rank_ = 0;
  int size_ = 1;
  int64_t capacity_ = 0;     // bytes per rank's part
  int64_t part_stride_ = 0;  // bytes between two ranks' parts (capacity rounded up to a page)
  int64_t allocated_ = 0;    // bytes of this rank's part handed out by allocate()
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  // Unmaps the segment once the last holder lets go: this object, and every tensor allocate() returned (a
  // gradient may outlive its reducer as a view of its bucket).
  std::shared_ptr<void> mapping_owner_;
  void own_mapping(void* address);  // mapping_ = address, unmapped by mapping_owner_
  Control* control_ = nullptr;
  std::chrono::milliseconds timeout_{0};
  bool oversubscribed_ = false;            // fewer than two cores per rank on this host: waits do not spin
  std::chrono::microseconds spin_for_{0};  // how long a wait for the peers spins before yielding

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Operation>> queue_;
  std::atomic<uint64_t> queued_{0};  // operations ever queued, for the worker's brief look before sleeping
  uint64_t started_ = 0;             // operations started (each rank numbers them 1, 2, ...)
  std::string broken_;               // why this object is unusable, or empty
  std::atomic<bool> stop_{false};    // set under mutex_ (for wake_), read without it by waits
  std::thread worker_;
};

}  // namespace vimo::comm
