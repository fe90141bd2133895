// ShmAllreduce::create (see shm_allreduce.h): making, opening and agreeing on the shared segment of Note [A
// shared-memory all-reduce for one host] in comm/shm_allreduce.cpp.
#include <fcntl.h>
#include <fmt/format.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <new>
#include <random>
#include <string>
#include <thread>

#include "comm/mpi_internal.h"
#include "comm/shm_allreduce.h"
#include "comm/shm_internal.h"

namespace vimo::comm {
namespace {

using shm_detail::kAlignment;
using shm_detail::kMagic;
using shm_detail::kPage;
using shm_detail::round_up;

constexpr int64_t kReasonBytes = 512;  // of why create() failed, sent from the rank that failed to the others

// The cores this process may run on (its affinity mask, which mpirun's binding and cgroups narrow), not the
// machine's.
int usable_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

std::string errno_text(int error) { return std::strerror(error); }

// Maps all `bytes` of the shared-memory object `fd` (named `name`); null, with the reason in `failure`, when
// mmap fails.
void* map_object(int fd, int64_t bytes, const std::string& name, std::string& failure) {
  void* address = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (address != MAP_FAILED) return address;
  failure = fmt::format("mmap of {} failed: {}", name, errno_text(errno));
  return nullptr;
}

// Rank 0: makes the object, reserves its pages (a /dev/shm too small fails here, not with SIGBUS later) and
// maps it. `created`: the name exists and must be unlinked.
void* create_segment(const std::string& name, int64_t bytes, std::string& failure, bool& created) {
  const int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) {
    failure = fmt::format("shm_open({}) failed: {}", name, errno_text(errno));
    return nullptr;
  }
  created = true;
  int error = ftruncate(fd, bytes) == 0 ? 0 : errno;
  if (error == 0) error = posix_fallocate(fd, 0, bytes);  // returns the error instead of setting errno
  void* address = nullptr;
  if (error != 0) {
    failure = fmt::format("cannot reserve {:.1f} MiB of shared memory for {}: {}",
                          static_cast<double>(bytes) / (1 << 20), name, errno_text(error));
  } else {
    address = map_object(fd, bytes, name, failure);
  }
  close(fd);
  return address;
}

// The other ranks: opens rank 0's object and maps it.
void* open_segment(const std::string& name, int64_t bytes, std::string& failure) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    failure = fmt::format("shm_open({}) failed: {} (rank 0 is on another host or in another container)", name,
                          errno_text(errno));
    return nullptr;
  }
  struct stat info {};
  void* address = nullptr;
  if (fstat(fd, &info) != 0 || info.st_size != bytes) {
    failure = fmt::format("{} has {} bytes, not the {} expected", name, info.st_size, bytes);
  } else {
    address = map_object(fd, bytes, name, failure);
  }
  close(fd);
  return address;
}

}  // namespace

std::unique_ptr<ShmAllreduce> ShmAllreduce::create(Communicator& comm, int64_t capacity_bytes,
                                                   std::string* why_not) {
  const auto refuse = [&](std::string why) -> std::unique_ptr<ShmAllreduce> {
    if (why_not) *why_not = std::move(why);
    return nullptr;
  };
  if (capacity_bytes <= 0) throw std::invalid_argument("ShmAllreduce: the capacity must be positive");
  if (comm.size() < 2) return refuse("the communicator has one rank");

  std::unique_ptr<ShmAllreduce> shm(new ShmAllreduce());
  shm->rank_ = comm.rank();
  shm->size_ = comm.size();
  shm->capacity_ = round_up(capacity_bytes, kAlignment);
  shm->part_stride_ = round_up(shm->capacity_, kPage);
  shm->timeout_ = comm.timeout();
  // Each rank runs its caller and the worker: with fewer than two of this process's cores per rank, waits
  // must not spin (Note [Spinning, yielding and sleeping while waiting] in comm/mpi_internal.h).
  shm->oversubscribed_ = 2 * shm->size_ > usable_cores();
  // The worker waits for its peers while this rank's backward computes: it spins only briefly, then yields
  // the core to the compute threads (then sleeps), whatever the core count.
  shm->spin_for_ = mpi_detail::kOversubscribedSpinFor;
  const int64_t total = Control::bytes(shm->size_) + shm->part_stride_ * shm->size_;
  shm->mapping_bytes_ = static_cast<size_t>(total);

  // Rank 0 makes the object and tells the others its name (from the tag) and whether it succeeded.
  std::string failure;
  uint64_t tag = 0;
  if (shm->rank_ == 0) {
    std::random_device device;
    tag = (static_cast<uint64_t>(device()) << 32) ^ device();
  }
  at::Tensor header = at::zeros({2}, at::kLong);  // [rank 0 succeeded, tag]
  const auto name_of = [](uint64_t t) { return fmt::format("/vimo-allreduce-{:016x}", t); };
  bool created = false;
  // Rank 0 removes the name once every rank has tried to open it, or when a collective below throws (a
  // timed-out or dead peer): the mapped segment lives on, unnamed, until the last rank unmaps it.
  struct Unlink {
    const bool& created;
    std::string name;
    ~Unlink() {
      if (created) shm_unlink(name.c_str());
    }
  } unlink_on_exit{created, name_of(tag)};  // the tag is rank 0's own there
  if (shm->rank_ == 0) {
    void* address = create_segment(name_of(tag), total, failure, created);
    if (address) {
      shm->own_mapping(address);
      shm->control_ = static_cast<Control*>(address);
      shm->control_->tag = tag;
      for (int q = 0; q < shm->size_; ++q) {
        new (reinterpret_cast<char*>(address) + Control::kCountersAt + Control::kCounterStride * q)
            std::atomic<uint64_t>(0);
      }
      std::atomic_thread_fence(std::memory_order_release);
      shm->control_->magic = kMagic;
    }
    header[0] = failure.empty() ? 1 : 0;
    header[1] = static_cast<int64_t>(tag);
  }
  comm.broadcast(header, 0);
  tag = static_cast<uint64_t>(header[1].item<int64_t>());
  if (shm->rank_ != 0 && header[0].item<int64_t>() == 1) {
    void* address = open_segment(name_of(tag), total, failure);
    if (address) {
      shm->own_mapping(address);
      shm->control_ = static_cast<Control*>(address);
      if (shm->control_->magic != kMagic || shm->control_->tag != tag)
        failure = fmt::format("{} holds another job's segment", name_of(tag));
    }
  } else if (shm->rank_ != 0) {
    failure = "rank 0 could not make the segment";
  }
  // The first rank that failed, or size() when none did; then the name can go.
  at::Tensor first_failed = at::full({1}, failure.empty() ? shm->size_ : shm->rank_, at::kLong);
  comm.allreduce(first_failed, ReduceOp::Min);
  if (created) {
    shm_unlink(unlink_on_exit.name.c_str());
    created = false;
  }
  const int64_t failed_rank = first_failed.item<int64_t>();
  if (failed_rank < shm->size_) {  // every rank gives that rank's reason
    at::Tensor text = at::zeros({kReasonBytes}, at::kByte);
    if (failed_rank == shm->rank_) {
      std::memcpy(text.data_ptr(), failure.data(), std::min<size_t>(failure.size(), kReasonBytes - 1));
    }
    comm.broadcast(text, static_cast<int>(failed_rank));
    return refuse(fmt::format("rank {}: {}", failed_rank, reinterpret_cast<const char*>(text.data_ptr())));
  }
  shm->worker_ = std::thread([raw = shm.get()] { raw->run_worker(); });
  return shm;
}

}  // namespace vimo::comm
