// Defines how NCCL communicators are made (make_nccl_communicator of comm/nccl_communicator.h): every rank
// prepares its GPU, the unique id reaches every rank over a bootstrap communicator or the job's rendezvous
// store, and each joins a non-blocking NCCL communicator whose creation is bounded by the timeout (Note
// [Non-blocking NCCL communicators]); also nccl_library_version. Only built when CUDA is enabled.
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>

#include "comm/job_store.h"
#include "comm/nccl_communicator.h"
#include "comm/nccl_internal.h"

namespace vimo::comm {
namespace nccl_detail {

// Note [Non-blocking NCCL communicators]
// A blocking NCCL communicator can hold its caller forever, out of reach of any timeout: in
// ncclCommInitRank when a peer never calls it, in ncclCommSplit, or in the first collective between two
// peers, whose connection set-up waits for the peer. So every communicator here is made with
// config.blocking = 0: each NCCL call then returns at once, with ncclInProgress when its work is not done
// yet, and the communicator's state (ncclCommGetAsyncError) stays ncclInProgress until it is. NCCL's user
// guide asks that the state be polled until it leaves ncclInProgress before the next call on that
// communicator, and await_state() does, bounded by the communicator's timeout:
//   - after creating one (ncclCommInitRankConfig, ncclCommSplit), on the new communicator (and on the parent
//     of a split); a timeout or an error aborts the new one, and the error names the rank, the size of the
//     communicator being made and the timeout (await_creation);
//   - after enqueueing a collective or send/recv (VIMO_NCCL_COMM_CHECK), on the communicator; a timeout
//     aborts it like a timed-out Work, since a half-enqueued collective cannot be taken back.
// Polls start at 10 us and back off to 1 ms: an enqueue is usually done by the first poll, while creation
// takes milliseconds to seconds. ncclCommAbort and ncclCommDestroy stay blocking, as NCCL makes them.
ncclConfig_t nonblocking_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

// Polls `comm` until its state leaves ncclInProgress and returns that state, or ncclInProgress when
// `deadline` passed first.
ncclResult_t await_state(ncclComm_t comm, std::chrono::steady_clock::time_point deadline) {
  auto pause = std::chrono::microseconds(10);
  while (true) {
    ncclResult_t state = ncclInProgress;
    const ncclResult_t queried = ncclCommGetAsyncError(comm, &state);
    if (queried != ncclSuccess) return queried;
    if (state != ncclInProgress) return state;
    if (std::chrono::steady_clock::now() >= deadline) return ncclInProgress;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
}

// Waits until the communicator that `call` (ncclCommInitRankConfig or ncclCommSplit of `parent`) is making
// in `*created` is ready, after the call returned `started`; returns it. Otherwise aborts it and throws (see
// Note [Non-blocking NCCL communicators]); `size` is the size of the communicator being made.
ncclComm_t await_creation(ncclComm_t* created, ncclResult_t started, ncclComm_t parent, const char* call,
                          const char* file, int line, int rank, int size, int device,
                          std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  ncclResult_t state = started;
  ncclComm_t state_of = *created;  // whose state `state` is, for NCCL's last error
  if (state == ncclSuccess || state == ncclInProgress) {
    // Started: a non-blocking call returns ncclInProgress here. What decides is the state awaited below.
    state = ncclSuccess;
    if (parent != nullptr) {
      state = await_state(parent, deadline);
      state_of = parent;
    }
    if (state == ncclSuccess && *created == nullptr) {
      state = ncclInternalError;  // not expected: only NCCL_SPLIT_NOCOLOR makes none, and we never pass it
    } else if (state == ncclSuccess) {
      state = await_state(*created, deadline);
      state_of = *created;
    }
  }
  if (state == ncclSuccess) return *created;
  std::string message =
      state == ncclInProgress
          ? detail::describe_timeout(
                rank, fmt::format("creating an NCCL communicator ({}) on cuda:{}", call, device), 0, timeout,
                size, "The unfinished NCCL communicator was aborted")
          : describe_nccl_failure(state, call, file, line, rank, state_of);
  if (*created != nullptr) ncclCommAbort(*created);
  *created = nullptr;
  throw std::runtime_error(message);
}

}  // namespace nccl_detail

namespace {

using namespace nccl_detail;  // NOLINT(google-build-using-namespace): the backend's own internals

// What a rank does before the unique id travels: selects its GPU and, on rank 0, draws the id. A failure
// comes back as `problem` rather than thrown, so that the bootstrap tells every rank before any of them waits
// for the id (a rank that threw here would leave the others waiting in NCCL's init).
struct Preparation {
  std::string problem;  // empty when this rank is ready
  ncclUniqueId id{};    // rank 0's, drawn here; the others' is overwritten by the bootstrap
};

Preparation prepare_rank(int rank, int size, int device) {
  Preparation prepared;
  try {
    if (size < 1 || rank < 0 || rank >= size) {
      throw std::runtime_error(fmt::format(
          "[rank {}] make_nccl_communicator: rank {} of {} ranks is out of range: expected 0 <= rank < size",
          rank, rank, size));
    }
    int devices = 0;
    VIMO_CUDA_CHECK(cudaGetDeviceCount(&devices), rank);
    if (device < 0 || device >= devices) {
      throw std::runtime_error(
          fmt::format("[rank {}] make_nccl_communicator: CUDA device {} does not exist "
                      "(this process sees {}). HINT: pass the local rank modulo the device "
                      "count, and check CUDA_VISIBLE_DEVICES",
                      rank, device, devices));
    }
    VIMO_CUDA_CHECK(cudaSetDevice(device), rank);
    if (rank == 0) VIMO_NCCL_CHECK(ncclGetUniqueId(&prepared.id), rank);
  } catch (const std::exception& e) {
    prepared.problem = e.what();
  }
  return prepared;
}

// Every rank holds rank 0's id: joins the communicator it names (on `device`, made current by prepare_rank).
std::shared_ptr<Communicator> join(const ncclUniqueId& id, int rank, int size, int device) {
  const std::chrono::milliseconds timeout = default_collective_timeout();
  ncclConfig_t config = nonblocking_config();
  ncclComm_t comm = nullptr;
  const ncclResult_t started = ncclCommInitRankConfig(&comm, size, id, rank, &config);
  comm = await_creation(&comm, started, nullptr, "ncclCommInitRankConfig", __FILE__, __LINE__, rank, size,
                        device, timeout);
  return adopt_nccl_communicator(comm, rank, size, static_cast<c10::DeviceIndex>(device));
}

}  // namespace

std::shared_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device) {
  const int rank = bootstrap.rank();
  const int size = bootstrap.size();
  Preparation prepared = prepare_rank(rank, size, device);
  // Every rank learns the lowest rank that failed to prepare (`size` when none) before any waits for the id.
  at::Tensor first_failed = at::full({1}, prepared.problem.empty() ? size : rank, at::kInt);
  bootstrap.allreduce(first_failed, ReduceOp::Min);
  if (!prepared.problem.empty()) throw std::runtime_error(prepared.problem);
  if (const int failed = first_failed.item<int>(); failed < size) {
    throw std::runtime_error(
        fmt::format("[rank {}] make_nccl_communicator: rank {} failed to prepare its GPU (its own error says "
                    "why), so no rank goes on",
                    rank, failed));
  }
  // The id is 128 opaque bytes that rank 0 drew: it names the communicator every rank joins.
  static_assert(sizeof(ncclUniqueId) == NCCL_UNIQUE_ID_BYTES);
  at::Tensor id_bytes = at::empty({NCCL_UNIQUE_ID_BYTES}, at::kByte);  // [128] on the CPU
  std::memcpy(id_bytes.data_ptr(), &prepared.id, sizeof(prepared.id));
  bootstrap.broadcast(id_bytes, 0);
  std::memcpy(&prepared.id, id_bytes.data_ptr(), sizeof(prepared.id));
  return join(prepared.id, rank, size, device);
}

std::shared_ptr<Communicator> make_nccl_communicator(StoreClient& store, const std::string& key, int rank,
                                                     int size, int device) {
  Preparation prepared = prepare_rank(rank, size, device);
  // An out-of-range rank or size is refused by exchange_unique_id before it touches the store.
  const std::span<uint8_t> id(reinterpret_cast<uint8_t*>(&prepared.id), sizeof(prepared.id));
  exchange_unique_id(store, key, rank, size, id, prepared.problem, default_collective_timeout());
  return join(prepared.id, rank, size, device);
}

std::string nccl_library_version() {
  int code = 0;
  VIMO_NCCL_CHECK(ncclGetVersion(&code), -1);
  // NCCL_VERSION_CODE is major*10000 + minor*100 + patch since 2.9, major*1000 + minor*100 + patch before.
  if (code >= 10000) return fmt::format("{}.{}.{}", code / 10000, code % 10000 / 100, code % 100);
  return fmt::format("{}.{}.{}", code / 1000, code % 1000 / 100, code % 100);
}

}  // namespace vimo::comm
