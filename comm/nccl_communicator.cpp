// Defines the NCCL backend of vimo::comm::Communicator: collectives on CUDA tensors, issued on the caller's
// current CUDA stream. The NCCL unique id reaches every rank over a bootstrap communicator.
#include "comm/nccl_communicator.h"

#include <ATen/core/grad_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace vimo::comm {
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

[[noreturn]] void throw_nccl_failure(ncclResult_t status, const char* call, const char* file, int line,
                                     int rank, ncclComm_t comm) {
  std::string reason = ncclGetErrorString(status);
  if (comm != nullptr) {
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && *last != '\0') reason += fmt::format(" ({})", last);
  }
  throw std::runtime_error(detail::describe_failed_call(rank, call, file, line, reason, nccl_hint(status)));
}

[[noreturn]] void throw_cuda_failure(cudaError_t status, const char* call, const char* file, int line,
                                     int rank) {
  throw std::runtime_error(detail::describe_failed_call(
      rank, call, file, line, fmt::format("{} ({})", cudaGetErrorString(status), cudaGetErrorName(status)),
      "check the device with nvidia-smi, CUDA_VISIBLE_DEVICES, and that the driver supports this CUDA "
      "version"));
}

// Calls that have no communicator yet (or none at all) report `rank` only.
#define VIMO_NCCL_CHECK(call, rank)                                                    \
  do {                                                                                 \
    const ncclResult_t vimo_nccl_status_ = (call);                                     \
    if (vimo_nccl_status_ != ncclSuccess)                                              \
      throw_nccl_failure(vimo_nccl_status_, #call, __FILE__, __LINE__, rank, nullptr); \
  } while (0)

#define VIMO_CUDA_CHECK(call, rank)                                           \
  do {                                                                        \
    const cudaError_t vimo_cuda_status_ = (call);                             \
    if (vimo_cuda_status_ != cudaSuccess)                                     \
      throw_cuda_failure(vimo_cuda_status_, #call, __FILE__, __LINE__, rank); \
  } while (0)

// NCCL calls on the communicator: a failure also marks it broken, so the destructor aborts instead of
// destroying.
#define VIMO_NCCL_COMM_CHECK(call) check((call), #call, __FILE__, __LINE__)

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

// Unlike the MPI backend, this one does not make the ranks agree on each call's shape first (see Note
// [Agreeing on a collective before running it] in mpi_communicator.cpp): that would cost a host round trip
// per collective on the GPU's critical path. Mismatched calls are NCCL's to detect (or hang on, until
// timeouts arrive).
class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(Communicator& bootstrap, int device)
      : rank_(bootstrap.rank()), size_(bootstrap.size()), device_(static_cast<c10::DeviceIndex>(device)) {
    // Local preparation may fail on some ranks only; they must not leave the others waiting in the broadcast
    // below, so every rank first learns (through the bootstrap) whether all are ready.
    std::string problem;
    ncclUniqueId id;
    std::memset(&id, 0, sizeof(id));
    try {
      int devices = 0;
      VIMO_CUDA_CHECK(cudaGetDeviceCount(&devices), rank_);
      if (device < 0 || device >= devices) {
        throw std::runtime_error(
            fmt::format("[rank {}] make_nccl_communicator: CUDA device {} does not exist "
                        "(this process sees {}). HINT: pass the local rank modulo the device "
                        "count, and check CUDA_VISIBLE_DEVICES",
                        rank_, device, devices));
      }
      VIMO_CUDA_CHECK(cudaSetDevice(device), rank_);
      if (rank_ == 0) VIMO_NCCL_CHECK(ncclGetUniqueId(&id), rank_);
    } catch (const std::exception& e) {
      problem = e.what();
    }
    at::Tensor ready = at::full({1}, problem.empty() ? 1 : 0, at::kInt);
    bootstrap.allreduce(ready, ReduceOp::Min);
    if (!problem.empty()) throw std::runtime_error(problem);
    if (ready.item<int>() == 0) {
      throw std::runtime_error(
          fmt::format("[rank {}] make_nccl_communicator: another rank failed to prepare its "
                      "GPU (its own error says why)",
                      rank_));
    }

    // The id is 128 opaque bytes that rank 0 drew: it names the communicator every rank joins.
    static_assert(sizeof(ncclUniqueId) == NCCL_UNIQUE_ID_BYTES);
    at::Tensor id_bytes = at::empty({NCCL_UNIQUE_ID_BYTES}, at::kByte);  // [128] on the CPU
    std::memcpy(id_bytes.data_ptr(), &id, sizeof(id));
    bootstrap.broadcast(id_bytes, 0);
    std::memcpy(&id, id_bytes.data_ptr(), sizeof(id));
    VIMO_NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_), rank_);
  }

  ~NcclCommunicator() override {
    if (comm_ == nullptr) return;
    c10::cuda::CUDAGuard guard(device_);
    ncclResult_t pending = ncclSuccess;
    ncclCommGetAsyncError(comm_, &pending);
    // A communicator that saw an error may have kernels waiting on peers forever: abort rather than destroy.
    if (failed_ || pending != ncclSuccess) {
      ncclCommAbort(comm_);
    } else {
      ncclCommDestroy(comm_);
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override { return "nccl"; }

  void allreduce(at::Tensor& tensor, ReduceOp op) override {
    const ncclDataType_t type = check_input("allreduce", tensor);
    if (op == ReduceOp::Avg && !at::isFloatingType(tensor.scalar_type())) {
      // The same rule as the MPI backend: an integer mean would need a rounding rule nobody chose.
      throw std::runtime_error(
          fmt::format("[rank {}] allreduce (avg) of {} tensors is not supported. HINT: "
                      "allreduce with Sum and divide with the rounding you want",
                      rank_, c10::getDtypeNames(tensor.scalar_type()).first));
    }
    c10::cuda::CUDAGuard guard(device_);
    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.contiguous();
    VIMO_NCCL_COMM_CHECK(ncclAllReduce(buffer.data_ptr(), buffer.data_ptr(),
                                       static_cast<size_t>(buffer.numel()), type, nccl_op(op), comm_,
                                       stream()));
    if (!buffer.is_same(tensor)) tensor.copy_(buffer);
  }

  at::Tensor allgather(const at::Tensor& tensor) override {
    const ncclDataType_t type = check_input("allgather", tensor);
    if (tensor.dim() == 0) {
      throw std::runtime_error(fmt::format(
          "[rank {}] allgather gathers along dim 0 but got a 0-dim tensor. HINT: unsqueeze(0) it", rank_));
    }
    c10::cuda::CUDAGuard guard(device_);
    const at::Tensor input = tensor.contiguous();  // [n, ...]
    std::vector<int64_t> sizes = input.sizes().vec();
    sizes[0] *= size_;
    at::Tensor output = at::empty(sizes, input.options().requires_grad(false));  // [size * n, ...]
    VIMO_NCCL_COMM_CHECK(ncclAllGather(input.data_ptr(), output.data_ptr(),
                                       static_cast<size_t>(input.numel()), type, comm_, stream()));
    return output;
  }

  void broadcast(at::Tensor& tensor, int root) override {
    const ncclDataType_t type = check_input("broadcast", tensor);
    if (root < 0 || root >= size_) {
      throw std::runtime_error(
          fmt::format("[rank {}] broadcast from rank {}, but the ranks are 0..{}", rank_, root, size_ - 1));
    }
    c10::cuda::CUDAGuard guard(device_);
    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.contiguous();
    VIMO_NCCL_COMM_CHECK(ncclBroadcast(buffer.data_ptr(), buffer.data_ptr(),
                                       static_cast<size_t>(buffer.numel()), type, root, comm_, stream()));
    if (!buffer.is_same(tensor)) tensor.copy_(buffer);
  }

  // NCCL has no barrier: a one-element all-reduce involves every rank, and waiting for it on the host makes
  // the barrier hold for the calling thread, not just for the stream.
  void barrier() override {
    c10::cuda::CUDAGuard guard(device_);
    at::Tensor token = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device_));
    allreduce(token, ReduceOp::Sum);
    VIMO_CUDA_CHECK(cudaStreamSynchronize(stream()), rank_);
  }

 private:
  cudaStream_t stream() const { return at::cuda::getCurrentCUDAStream(device_).stream(); }

  // Returns the NCCL datatype of `tensor`, or throws saying what is wrong with it.
  ncclDataType_t check_input(const char* collective, const at::Tensor& tensor) const {
    if (!tensor.defined())
      throw std::runtime_error(fmt::format("[rank {}] {} got an undefined tensor", rank_, collective));
    if (!tensor.is_cuda() || tensor.get_device() != device_) {
      throw std::runtime_error(
          fmt::format("[rank {}] {} got a tensor on {}, but this NCCL communicator runs on "
                      "cuda:{}. HINT: move it with .to(torch::Device(torch::kCUDA, {}))",
                      rank_, collective, tensor.device().str(), device_, device_));
    }
    ncclDataType_t type;
    if (!nccl_type(tensor.scalar_type(), &type)) {
      throw std::runtime_error(
          fmt::format("[rank {}] {} got a {} tensor, which the NCCL backend does not support. "
                      "HINT: use float32, float64, bfloat16, float16, int32, int64 or uint8",
                      rank_, collective, c10::getDtypeNames(tensor.scalar_type()).first));
    }
    return type;
  }

  void check(ncclResult_t status, const char* call, const char* file, int line) {
    if (status == ncclSuccess) return;
    failed_ = true;
    throw_nccl_failure(status, call, file, line, rank_, comm_);
  }

  ncclComm_t comm_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
  c10::DeviceIndex device_ = 0;  // checked against the device count before use
  bool failed_ = false;
};

}  // namespace

std::shared_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device) {
  return std::make_shared<NcclCommunicator>(bootstrap, device);
}

std::string nccl_library_version() {
  int code = 0;
  VIMO_NCCL_CHECK(ncclGetVersion(&code), -1);
  // NCCL_VERSION_CODE is major*10000 + minor*100 + patch since 2.9, major*1000 + minor*100 + patch before.
  if (code >= 10000) return fmt::format("{}.{}.{}", code / 10000, code % 10000 / 100, code % 100);
  return fmt::format("{}.{}.{}", code / 1000, code % 1000 / 100, code % 100);
}

}  // namespace vimo::comm
