// Defines the NCCL backend's helpers (declared in comm/nccl_internal.h): the errors of failed NCCL and CUDA
// calls with their hints, NCCL's datatype and reduction of a tensor, how calls and tensors are named in
// messages, and the host's bounded wait on a CUDA event. Only built when CUDA is enabled (VIMO_HAVE_CUDA).
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>

#include "comm/communicator.h"
#include "comm/nccl_internal.h"

namespace vimo::comm::nccl_detail {
namespace {

std::string nccl_hint(ncclResult_t status) {
  switch (status) {
    case ncclUnhandledCudaError:
      return "a CUDA call inside NCCL failed: check the device with nvidia-smi and CUDA_VISIBLE_DEVICES";
    case ncclSystemError:
      return "a system call or the network failed: check NCCL_SOCKET_IFNAME / NCCL_IB_HCA and rerun with "
             "NCCL_DEBUG=INFO";
    case ncclInvalidArgument:
    case ncclInvalidUsage:
      return "every rank must make the same calls with the same count, dtype and root, one GPU per rank; "
             "rerun "
             "with NCCL_DEBUG=WARN for NCCL's reason";
    case ncclRemoteError:
      return "a peer failed or exited: the first error on another rank is the cause";
    default:
      return "rerun with NCCL_DEBUG=INFO to see NCCL's own log";
  }
}

}  // namespace

// Reads NCCL's last error of `comm`, so call it before aborting `comm`.
std::string describe_nccl_failure(ncclResult_t status, const char* call, const char* file, int line, int rank,
                                  ncclComm_t comm) {
  std::string reason = ncclGetErrorString(status);
  if (comm != nullptr) {
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && *last != '\0') reason += fmt::format(" ({})", last);
  }
  return detail::describe_failed_call(rank, call, file, line, reason, nccl_hint(status));
}

[[noreturn]] void throw_nccl_failure(ncclResult_t status, const char* call, const char* file, int line,
                                     int rank, ncclComm_t comm) {
  throw std::runtime_error(describe_nccl_failure(status, call, file, line, rank, comm));
}

[[noreturn]] void throw_cuda_failure(cudaError_t status, const char* call, const char* file, int line,
                                     int rank) {
  throw std::runtime_error(detail::describe_failed_call(
      rank, call, file, line, fmt::format("{} ({})", cudaGetErrorString(status), cudaGetErrorName(status)),
      "check the device with nvidia-smi, CUDA_VISIBLE_DEVICES, and that the driver supports this CUDA "
      "version"));
}

// The NCCL datatype of `dtype`; false when NCCL (or vimo) does not support it. NCCL adds bf16 and fp16
// natively.
bool nccl_type(at::ScalarType dtype, ncclDataType_t* out) {
  switch (dtype) {
    case at::kFloat:
      *out = ncclFloat32;
      return true;
    case at::kDouble:
      *out = ncclFloat64;
      return true;
    case at::kBFloat16:
      *out = ncclBfloat16;
      return true;
    case at::kHalf:
      *out = ncclFloat16;
      return true;
    case at::kLong:
      *out = ncclInt64;
      return true;
    case at::kInt:
      *out = ncclInt32;
      return true;
    case at::kByte:
      *out = ncclUint8;
      return true;
    default:
      return false;
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
      return ncclSum;
    case ReduceOp::Avg:
      return ncclAvg;
    case ReduceOp::Max:
      return ncclMax;
    case ReduceOp::Min:
      return ncclMin;
  }
  throw std::invalid_argument("unknown ReduceOp");
}

const char* op_name(ReduceOp op) { return detail::reduce_op_name(op); }

// Polls `event` until the GPU passed it (true) or `timeout` elapsed (false): the host-side half of the
// timeout of Note [Collective timeouts] in mpi_internal.h.
bool wait_for_event(cudaEvent_t event, std::chrono::milliseconds timeout, int rank) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  while (true) {
    const cudaError_t status = cudaEventQuery(event);
    if (status == cudaSuccess) return true;
    if (status != cudaErrorNotReady) VIMO_CUDA_CHECK(status, rank);
    if (Clock::now() - start >= timeout) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

}  // namespace vimo::comm::nccl_detail
