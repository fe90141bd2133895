// Defines what the files of the NCCL backend (comm/nccl_*.cpp) share, none of it part of vimo's API: the
// errors of failed NCCL and CUDA calls (VIMO_NCCL_CHECK, VIMO_CUDA_CHECK), NCCL's datatype and reduction of
// a tensor, CUDA events and the host's wait on them, the creation of non-blocking communicators (Note
// [Non-blocking NCCL communicators] in comm/nccl_init.cpp), and the one constructor of NcclCommunicator.
// Only built when CUDA is enabled (VIMO_HAVE_CUDA).
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "comm/communicator.h"

// ncclCommSplit with a config, and non-blocking communicators that report ncclInProgress, are NCCL 2.18's.
#if NCCL_VERSION_CODE < NCCL_VERSION(2, 18, 0)
#error "vimo's NCCL backend needs NCCL >= 2.18 (see Note [One NCCL] in cmake/Dependencies.cmake)"
#endif

namespace vimo::comm::nccl_detail {

// Reads NCCL's last error of `comm`, so call it before aborting `comm`.
std::string describe_nccl_failure(ncclResult_t status, const char* call, const char* file, int line, int rank,
                                  ncclComm_t comm);
[[noreturn]] void throw_nccl_failure(ncclResult_t status, const char* call, const char* file, int line,
                                     int rank, ncclComm_t comm);
[[noreturn]] void throw_cuda_failure(cudaError_t status, const char* call, const char* file, int line,
                                     int rank);

}  // namespace vimo::comm::nccl_detail

// Calls that have no communicator yet (or none at all) report `rank` only.
#define VIMO_NCCL_CHECK(call, rank)                                                                     \
  do {                                                                                                  \
    const ncclResult_t vimo_nccl_status_ = (call);                                                      \
    if (vimo_nccl_status_ != ncclSuccess)                                                               \
      ::vimo::comm::nccl_detail::throw_nccl_failure(vimo_nccl_status_, #call, __FILE__, __LINE__, rank, \
                                                    nullptr);                                           \
  } while (0)

#define VIMO_CUDA_CHECK(call, rank)                                                                      \
  do {                                                                                                   \
    const cudaError_t vimo_cuda_status_ = (call);                                                        \
    if (vimo_cuda_status_ != cudaSuccess)                                                                \
      ::vimo::comm::nccl_detail::throw_cuda_failure(vimo_cuda_status_, #call, __FILE__, __LINE__, rank); \
  } while (0)

namespace vimo::comm::nccl_detail {

// The NCCL datatype of `dtype`; false when NCCL (or vimo) does not support it (nccl_support.cpp).
bool nccl_type(at::ScalarType dtype, ncclDataType_t* out);
ncclRedOp_t nccl_op(ReduceOp op);
// "sum", "avg", "max", "min".
const char* op_name(ReduceOp op);

// A CUDA event without timing, created on the current device.
class CudaEvent {
 public:
  explicit CudaEvent(int rank) {
    VIMO_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), rank);
  }
  ~CudaEvent() {
    if (event_ != nullptr) cudaEventDestroy(event_);
  }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

// Polls `event` until the GPU passed it (true) or `timeout` elapsed (false) (nccl_support.cpp).
bool wait_for_event(cudaEvent_t event, std::chrono::milliseconds timeout, int rank);

// The config of every communicator made here: non-blocking, see Note [Non-blocking NCCL communicators] in
// nccl_init.cpp, which also defines the two functions below.
ncclConfig_t nonblocking_config();
// Polls `comm` until its state leaves ncclInProgress and returns that state, or ncclInProgress when
// `deadline` passed first.
ncclResult_t await_state(ncclComm_t comm, std::chrono::steady_clock::time_point deadline);
// Waits until the communicator that `call` (ncclCommInitRankConfig or ncclCommSplit of `parent`) is making
// in `*created` is ready, after the call returned `started`; returns it. Otherwise aborts it and throws.
ncclComm_t await_creation(ncclComm_t* created, ncclResult_t started, ncclComm_t parent, const char* call,
                          const char* file, int line, int rank, int size, int device,
                          std::chrono::milliseconds timeout);

// The NCCL backend's Communicator, adopting `comm`, a ready communicator (nccl_communicator.cpp).
std::shared_ptr<Communicator> adopt_nccl_communicator(ncclComm_t comm, int rank, int size,
                                                      c10::DeviceIndex device);

}  // namespace vimo::comm::nccl_detail
