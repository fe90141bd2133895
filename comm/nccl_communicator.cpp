// Defines the NCCL backend of vimo::comm::Communicator: blocking collectives on CUDA tensors issued on the
// caller's current CUDA stream, asynchronous ones on the communicator's own stream with a Work that waits on
// a CUDA event (with the timeout, then aborting the communicator), and split() with ncclCommSplit. Every
// call is bounded by the timeout: communicators are non-blocking NCCL ones, made in comm/nccl_init.cpp
// (Note [Non-blocking NCCL communicators] there).
#include "comm/nccl_communicator.h"

#include <ATen/core/grad_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "comm/collective_call.h"
#include "comm/nccl_internal.h"

namespace vimo::comm {
namespace {

using namespace nccl_detail;  // NOLINT(google-build-using-namespace): the backend's own internals
using detail::bytes_of;
using detail::tensor_text;

// The shared checks of comm/collective_call.h run after this backend's own input check (check_input), which
// they need not repeat.
std::string already_checked(const char* /*collective*/, const at::Tensor& /*tensor*/) { return {}; }

// Enqueues an NCCL call on the communicator for our call `name` ("allreduce", ...) of `bytes`: a failure also
// marks the communicator broken, so the destructor aborts instead of destroying; an enqueue still in
// progress is waited for, seen by the CollectiveObserver (Note [Non-blocking NCCL communicators]).
#define VIMO_NCCL_ENQUEUE(name, bytes, call) check((call), #call, __FILE__, __LINE__, (name), (bytes))

class NcclCommunicator;

// An asynchronous collective on the communicator's stream: done when its completion event has passed.
class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<NcclCommunicator> owner, const char* name, std::string what, int64_t bytes,
           std::chrono::milliseconds timeout, std::unique_ptr<CudaEvent> done,
           std::vector<at::Tensor> buffers, std::function<void()> finish)
      : owner_(std::move(owner)),
        name_(name),
        what_(std::move(what)),
        bytes_(bytes),
        timeout_(timeout),
        done_event_(std::move(done)),
        buffers_(std::move(buffers)),
        finish_(std::move(finish)) {}
  ~NcclWork() override;
  void wait() override;
  bool is_completed() override;
  std::string description() const override { return what_; }

 private:
  void complete();

  std::shared_ptr<NcclCommunicator> owner_;
  const char* name_;  // "allreduce", ...: what the CollectiveObserver is told while wait() blocks
  std::string what_;
  int64_t bytes_ = 0;
  std::chrono::milliseconds timeout_;
  std::unique_ptr<CudaEvent> done_event_;
  std::vector<at::Tensor> buffers_;  // read or written by the collective: alive until it completes
  std::function<void()> finish_;     // host-side work after completion (copying back into a strided tensor)
  bool done_ = false;
};

// Unlike the MPI backend, this one does not make the ranks agree on each call's shape first (see Note
// [Agreeing on a collective before running it] in mpi_agreement.cpp): that would cost a host round trip
// per collective on the GPU's critical path. Mismatched calls are NCCL's to detect (or hang on, until
// timeouts arrive).
//
// Blocking calls only enqueue on the caller's stream and return, so once enqueued they cannot time out on the
// host (the enqueue itself can: Note [Non-blocking NCCL communicators]); a hung one surfaces at the next host
// synchronisation. Asynchronous calls run on the communicator's own stream, ordered after the work queued so
// far on the caller's stream; Work::wait polls their completion event with the timeout (aborting the
// communicator when it passes), then makes the caller's stream wait for the event.
// The Work holds every tensor the collective touches until the event has passed, so the caching allocator
// cannot hand their memory to another stream early (no recordStream needed).
class NcclCommunicator final : public Communicator, public std::enable_shared_from_this<NcclCommunicator> {
 public:
  // Adopts `comm`, a ready communicator (see make_nccl_communicator and split).
  NcclCommunicator(ncclComm_t comm, int rank, int size, c10::DeviceIndex device)
      : comm_(comm), rank_(rank), size_(size), device_(device) {}

  ~NcclCommunicator() override {
    if (comm_ == nullptr) return;  // never made, or aborted after a timeout
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
    fail_if(detail::check_average("allreduce", tensor, op));
    c10::cuda::CUDAGuard guard(device_);
    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.contiguous();
    VIMO_NCCL_ENQUEUE("allreduce", bytes_of(buffer),
                      ncclAllReduce(buffer.data_ptr(), buffer.data_ptr(), static_cast<size_t>(buffer.numel()),
                                    type, nccl_op(op), comm_, stream()));
    if (!buffer.is_same(tensor)) tensor.copy_(buffer);
  }

  at::Tensor allgather(const at::Tensor& tensor) override {
    check_input("allgather", tensor);
    fail_if(detail::check_gather_input(already_checked, tensor));
    c10::cuda::CUDAGuard guard(device_);
    at::Tensor output = at::empty(detail::gathered_sizes(tensor, size_),
                                  tensor.options().requires_grad(false));  // [size * n, ...]
    allgather_into(tensor, output);
    return output;
  }

  // The blocking calls into the caller's output: on the caller's stream like the others, with no fresh output
  // and no copy (the base's default allocates and copies).
  void allgather_into(const at::Tensor& tensor, at::Tensor& output) override {
    const ncclDataType_t type = check_input("allgather", tensor);
    fail_if(detail::check_gather_into(already_checked, tensor, output, size_));
    c10::cuda::CUDAGuard guard(device_);
    const at::Tensor input = tensor.contiguous();  // [n, ...]
    VIMO_NCCL_ENQUEUE("allgather", bytes_of(input),
                      ncclAllGather(input.data_ptr(), output.data_ptr(), static_cast<size_t>(input.numel()),
                                    type, comm_, stream()));
  }

  void reduce_scatter_into(const at::Tensor& input, at::Tensor& output, ReduceOp op) override {
    const ncclDataType_t type = check_input("reduce_scatter", input);
    fail_if(detail::check_scatter_into(already_checked, input, output, op, size_));
    c10::cuda::CUDAGuard guard(device_);
    const at::Tensor send = input.contiguous();  // [size * n, ...]
    VIMO_NCCL_ENQUEUE(
        "reduce_scatter", bytes_of(send),
        ncclReduceScatter(send.data_ptr(), output.data_ptr(), static_cast<size_t>(output.numel()), type,
                          nccl_op(op), comm_, stream()));
  }

  void broadcast(at::Tensor& tensor, int root) override {
    const ncclDataType_t type = check_input("broadcast", tensor);
    check_root(root);
    c10::cuda::CUDAGuard guard(device_);
    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.contiguous();
    VIMO_NCCL_ENQUEUE("broadcast", bytes_of(buffer),
                      ncclBroadcast(buffer.data_ptr(), buffer.data_ptr(), static_cast<size_t>(buffer.numel()),
                                    type, root, comm_, stream()));
    if (!buffer.is_same(tensor)) tensor.copy_(buffer);
  }

  // NCCL has no barrier: a one-element all-reduce involves every rank, and waiting for it on the host makes
  // the barrier hold for the calling thread, not just for the stream (barrier_async).
  void barrier() override { barrier_async()->wait(); }

  at::Tensor reduce_scatter(const at::Tensor& input, ReduceOp op) override {
    check_input("reduce_scatter", input);
    fail_if(detail::check_scatter_input(already_checked, input, op, size_));
    c10::cuda::CUDAGuard guard(device_);
    at::Tensor output =
        at::empty(detail::scattered_sizes(input, size_), input.options().requires_grad(false));  // [n, ...]
    reduce_scatter_into(input, output, op);
    return output;
  }

  // NCCL has no tags: messages between two ranks arrive in the order sent, whatever the tag.
  void send(const at::Tensor& tensor, int dst, int tag) override {
    const ncclDataType_t type = check_input("send", tensor);
    check_peer("send to", dst, tag);
    c10::cuda::CUDAGuard guard(device_);
    const at::Tensor buffer = tensor.contiguous();
    VIMO_NCCL_ENQUEUE(
        "send", bytes_of(buffer),
        ncclSend(buffer.data_ptr(), static_cast<size_t>(buffer.numel()), type, dst, comm_, stream()));
  }

  void recv(at::Tensor& tensor, int src, int tag) override {
    const ncclDataType_t type = check_input("recv", tensor);
    check_peer("recv from", src, tag);
    c10::cuda::CUDAGuard guard(device_);
    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.is_contiguous() ? tensor : at::empty(tensor.sizes(), tensor.options());
    VIMO_NCCL_ENQUEUE(
        "recv", bytes_of(buffer),
        ncclRecv(buffer.data_ptr(), static_cast<size_t>(buffer.numel()), type, src, comm_, stream()));
    if (!buffer.is_same(tensor)) tensor.copy_(buffer);
  }

  std::shared_ptr<Work> allreduce_async(at::Tensor& tensor, ReduceOp op) override {
    const ncclDataType_t type = check_input("allreduce", tensor);
    fail_if(detail::check_average("allreduce", tensor, op));
    c10::cuda::CUDAGuard guard(device_);
    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.contiguous();
    std::function<void()> finish;
    if (!buffer.is_same(tensor)) finish = [buffer, target = tensor]() mutable { target.copy_(buffer); };
    return launch("allreduce", fmt::format("allreduce ({}) of {}", op_name(op), tensor_text(tensor)),
                  bytes_of(tensor), {buffer, tensor}, std::move(finish), [&](cudaStream_t side) {
                    VIMO_NCCL_ENQUEUE(
                        "allreduce", bytes_of(buffer),
                        ncclAllReduce(buffer.data_ptr(), buffer.data_ptr(),
                                      static_cast<size_t>(buffer.numel()), type, nccl_op(op), comm_, side));
                  });
  }

  std::shared_ptr<Work> allgather_async(const at::Tensor& input, at::Tensor& output) override {
    const ncclDataType_t type = check_input("allgather", input);
    fail_if(detail::check_gather_into(already_checked, input, output, size_));
    c10::cuda::CUDAGuard guard(device_);
    const at::Tensor send = input.contiguous();  // [n, ...]
    return launch("allgather", fmt::format("allgather of {}", tensor_text(input)), bytes_of(input),
                  {send, output}, nullptr, [&](cudaStream_t side) {
                    VIMO_NCCL_ENQUEUE("allgather", bytes_of(send),
                                      ncclAllGather(send.data_ptr(), output.data_ptr(),
                                                    static_cast<size_t>(send.numel()), type, comm_, side));
                  });
  }

  std::shared_ptr<Work> reduce_scatter_async(const at::Tensor& input, at::Tensor& output,
                                             ReduceOp op) override {
    const ncclDataType_t type = check_input("reduce_scatter", input);
    fail_if(detail::check_scatter_into(already_checked, input, output, op, size_));
    c10::cuda::CUDAGuard guard(device_);
    const at::Tensor send = input.contiguous();  // [size * n, ...]
    return launch("reduce_scatter", fmt::format("reduce_scatter ({}) of {}", op_name(op), tensor_text(input)),
                  bytes_of(input), {send, output}, nullptr, [&](cudaStream_t side) {
                    VIMO_NCCL_ENQUEUE("reduce_scatter", bytes_of(send),
                                      ncclReduceScatter(send.data_ptr(), output.data_ptr(),
                                                        static_cast<size_t>(output.numel()), type,
                                                        nccl_op(op), comm_, side));
                  });
  }

  std::shared_ptr<Work> broadcast_async(at::Tensor& tensor, int root) override {
    const ncclDataType_t type = check_input("broadcast", tensor);
    check_root(root);
    c10::cuda::CUDAGuard guard(device_);
    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.contiguous();
    std::function<void()> finish;
    if (!buffer.is_same(tensor)) finish = [buffer, target = tensor]() mutable { target.copy_(buffer); };
    return launch("broadcast", fmt::format("broadcast of {} from rank {}", tensor_text(tensor), root),
                  bytes_of(tensor), {buffer, tensor}, std::move(finish), [&](cudaStream_t side) {
                    VIMO_NCCL_ENQUEUE(
                        "broadcast", bytes_of(buffer),
                        ncclBroadcast(buffer.data_ptr(), buffer.data_ptr(),
                                      static_cast<size_t>(buffer.numel()), type, root, comm_, side));
                  });
  }

  // A one-element all-reduce, as barrier(); finished when every rank has started it.
  std::shared_ptr<Work> barrier_async() override {
    throw_if_broken("barrier");
    c10::cuda::CUDAGuard guard(device_);
    at::Tensor token = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, device_));
    return launch("barrier", "barrier", 0, {token}, nullptr, [&](cudaStream_t side) {
      VIMO_NCCL_ENQUEUE(
          "barrier", 0,
          ncclAllReduce(token.data_ptr(), token.data_ptr(), 1, ncclFloat, ncclSum, comm_, side));
    });
  }

  // NCCL has no tags (see send); the calls run in order on the communicator's stream (Note [Ordering of
  // asynchronous point-to-point calls] in comm/communicator.h).
  std::shared_ptr<Work> send_async(const at::Tensor& tensor, int dst, int tag) override {
    const ncclDataType_t type = check_input("send", tensor);
    check_peer("send to", dst, tag);
    c10::cuda::CUDAGuard guard(device_);
    const at::Tensor buffer = tensor.contiguous();
    return launch("send", fmt::format("send of {} to rank {} (tag {})", tensor_text(tensor), dst, tag),
                  bytes_of(tensor), {buffer}, nullptr, [&](cudaStream_t side) {
                    VIMO_NCCL_ENQUEUE("send", bytes_of(buffer),
                                      ncclSend(buffer.data_ptr(), static_cast<size_t>(buffer.numel()), type,
                                               dst, comm_, side));
                  });
  }

  std::shared_ptr<Work> recv_async(at::Tensor& tensor, int src, int tag) override {
    const ncclDataType_t type = check_input("recv", tensor);
    check_peer("recv from", src, tag);
    c10::cuda::CUDAGuard guard(device_);
    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.is_contiguous() ? tensor : at::empty(tensor.sizes(), tensor.options());
    std::function<void()> finish;
    if (!buffer.is_same(tensor)) finish = [buffer, target = tensor]() mutable { target.copy_(buffer); };
    return launch("recv", fmt::format("recv of {} from rank {} (tag {})", tensor_text(tensor), src, tag),
                  bytes_of(tensor), {buffer, tensor}, std::move(finish), [&](cudaStream_t side) {
                    VIMO_NCCL_ENQUEUE("recv", bytes_of(buffer),
                                      ncclRecv(buffer.data_ptr(), static_cast<size_t>(buffer.numel()), type,
                                               src, comm_, side));
                  });
  }

  // Every rank first learns whether any rank passed a negative color, so that all fail together (the MPI
  // backend's rule) instead of the others waiting in ncclCommSplit for a rank that threw. That costs one
  // small all-reduce, which a split (made once per group, at start-up) can afford. The result is a
  // non-blocking communicator too, with this one's device and timeout.
  std::shared_ptr<Communicator> split(int color, int key) override {
    c10::cuda::CUDAGuard guard(device_);
    at::Tensor first_negative = at::full({1}, color < 0 ? rank_ : size_,
                                         at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device_));
    allreduce_async(first_negative, ReduceOp::Min)->wait();
    if (color < 0) {
      throw std::runtime_error(
          fmt::format("[rank {}] split got color {}, but colors must be >= 0. HINT: give every rank a group "
                      "number 0, 1, ...; a rank that belongs to no group still needs a color of its own",
                      rank_, color));
    }
    if (const int first = first_negative.item<int>(); first < size_) {
      throw std::runtime_error(fmt::format(
          "[rank {}] split refused: rank {} passed a negative color (its own error says which), so no rank "
          "splits",
          rank_, first));
    }
    ncclConfig_t config = nonblocking_config();
    ncclComm_t group = nullptr;
    const ncclResult_t started = ncclCommSplit(comm_, color, key, &group, &config);
    // The group's size is unknown until NCCL made it: errors name this communicator's size.
    group = await_creation(&group, started, comm_, "ncclCommSplit", __FILE__, __LINE__, rank_, size_, device_,
                           timeout());
    int group_rank = 0, group_size = 0;
    const ncclResult_t rank_status = ncclCommUserRank(group, &group_rank);
    const ncclResult_t size_status = ncclCommCount(group, &group_size);
    if (rank_status != ncclSuccess || size_status != ncclSuccess) {
      const ncclResult_t status = rank_status != ncclSuccess ? rank_status : size_status;
      const std::string message =
          describe_nccl_failure(status, rank_status != ncclSuccess ? "ncclCommUserRank" : "ncclCommCount",
                                __FILE__, __LINE__, rank_, group);
      ncclCommAbort(group);
      throw std::runtime_error(message);
    }
    auto result = std::make_shared<NcclCommunicator>(group, group_rank, group_size, device_);
    result->set_timeout(timeout());
    return result;
  }

  // After a timeout: kernels waiting for a missing peer would never finish, so the communicator is torn down.
  void abort(const std::string& reason) {
    if (broken_.empty()) broken_ = reason;
    if (comm_ == nullptr) return;
    c10::cuda::CUDAGuard guard(device_);
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }

  void throw_if_broken(const std::string& what) const {
    if (broken_.empty()) return;
    throw std::runtime_error(fmt::format(
        "[rank {}] {} refused: this communicator is unusable, aborted after an earlier failure ({}). HINT: "
        "exit and resume from the last checkpoint",
        rank_, what, broken_));
  }

  c10::DeviceIndex device() const { return device_; }

 private:
  cudaStream_t stream() const { return at::cuda::getCurrentCUDAStream(device_).stream(); }

  // Orders the communicator's stream after the caller's, enqueues `enqueue` on it, and returns the Work that
  // waits for it (see the class comment).
  template <typename Enqueue>
  std::shared_ptr<Work> launch(const char* name, std::string what, int64_t bytes,
                               std::vector<at::Tensor> buffers, std::function<void()> finish,
                               Enqueue&& enqueue) {
    if (!side_stream_) side_stream_ = at::cuda::getStreamFromPool(/*isHighPriority=*/true, device_);
    const cudaStream_t side = side_stream_->stream();
    CudaEvent inputs_ready(rank_);
    VIMO_CUDA_CHECK(cudaEventRecord(inputs_ready.get(), stream()), rank_);
    VIMO_CUDA_CHECK(cudaStreamWaitEvent(side, inputs_ready.get(), 0), rank_);
    enqueue(side);
    auto done = std::make_unique<CudaEvent>(rank_);
    VIMO_CUDA_CHECK(cudaEventRecord(done->get(), side), rank_);
    return std::make_shared<NcclWork>(shared_from_this(), name, std::move(what), bytes, timeout(),
                                      std::move(done), std::move(buffers), std::move(finish));
  }

  // Throws `problem`, prefixed with this rank, unless it is empty.
  void fail_if(const std::string& problem) const {
    if (!problem.empty()) throw std::runtime_error(fmt::format("[rank {}] {}", rank_, problem));
  }

  void check_root(int root) const {
    if (root < 0 || root >= size_) {
      throw std::runtime_error(
          fmt::format("[rank {}] broadcast from rank {}, but the ranks are 0..{}", rank_, root, size_ - 1));
    }
  }

  // The other backends' rules for peers and tags, so that a program moves between backends unchanged,
  // although NCCL ignores the tag.
  void check_peer(const char* direction, int peer, int tag) const {
    fail_if(detail::check_peer(direction, peer, tag, rank_, size_, std::numeric_limits<int>::max(),
                               "NCCL ignores the tag"));
  }

  // Returns the NCCL datatype of `tensor`, or throws saying what is wrong with it.
  ncclDataType_t check_input(const char* collective, const at::Tensor& tensor) const {
    throw_if_broken(collective);
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

  // See Note [Non-blocking NCCL communicators]: ncclInProgress means "still being enqueued".
  void check(ncclResult_t status, const char* call, const char* file, int line, const char* name,
             int64_t bytes) {
    if (status == ncclInProgress) status = await_enqueue(call, name, bytes);
    if (status == ncclSuccess) return;
    failed_ = true;
    throw_nccl_failure(status, call, file, line, rank_, comm_);
  }

  // An enqueue can wait for the peers (NCCL connects lazily, on a communicator's first calls), so the wait is
  // reported like any other, as the call it enqueues.
  ncclResult_t await_enqueue(const char* call, const char* name, int64_t bytes) {
    ncclResult_t state = ncclInProgress;
    {
      const detail::ObservedWait observed(name, bytes);
      state = await_state(comm_, std::chrono::steady_clock::now() + timeout());
    }
    if (state != ncclInProgress) return state;
    const std::string_view call_text(call);
    const std::string reason = detail::describe_timeout(
        rank_, fmt::format("enqueueing {}", call_text.substr(0, call_text.find('('))), bytes, timeout(),
        size_, "The NCCL communicator was aborted and is unusable from now on");
    abort(reason);
    throw std::runtime_error(reason);
  }

  ncclComm_t comm_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
  c10::DeviceIndex device_ = 0;  // checked against the device count before use
  bool failed_ = false;
  std::string broken_;                                // why the communicator was aborted, or empty
  std::optional<c10::cuda::CUDAStream> side_stream_;  // asynchronous collectives run here
};

NcclWork::~NcclWork() {
  if (done_) return;
  try {
    wait();  // the collective still reads and writes the buffers: they cannot be freed before it finishes
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
  }
}

void NcclWork::wait() {
  if (done_) return;
  owner_->throw_if_broken(what_);
  c10::cuda::CUDAGuard guard(owner_->device());
  bool finished = false;
  {
    const detail::ObservedWait observed(name_, bytes_);
    finished = wait_for_event(done_event_->get(), timeout_, owner_->rank());
  }
  if (!finished) {
    const std::string reason =
        detail::describe_timeout(owner_->rank(), what_, bytes_, timeout_, owner_->size(),
                                 "The NCCL communicator was aborted and is unusable from now on");
    owner_->abort(reason);
    throw std::runtime_error(reason);
  }
  complete();
}

bool NcclWork::is_completed() {
  if (done_) return true;
  c10::cuda::CUDAGuard guard(owner_->device());
  const cudaError_t status = cudaEventQuery(done_event_->get());
  if (status == cudaErrorNotReady) return false;
  VIMO_CUDA_CHECK(status, owner_->rank());
  complete();
  return true;
}

// The caller's stream waits for the collective before anything queued on it later uses the results.
void NcclWork::complete() {
  VIMO_CUDA_CHECK(
      cudaStreamWaitEvent(at::cuda::getCurrentCUDAStream(owner_->device()).stream(), done_event_->get(), 0),
      owner_->rank());
  done_ = true;
  at::NoGradGuard no_grad;
  if (finish_) finish_();
  finish_ = nullptr;
  buffers_.clear();
}

}  // namespace

namespace nccl_detail {

std::shared_ptr<Communicator> adopt_nccl_communicator(ncclComm_t comm, int rank, int size,
                                                      c10::DeviceIndex device) {
  return std::make_shared<NcclCommunicator>(comm, rank, size, device);
}

}  // namespace nccl_detail
}  // namespace vimo::comm
