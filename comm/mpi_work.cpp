// Defines the pieces of the MPI backend that every call goes through (declared in comm/mpi_internal.h): the
// error of a failed MPI call, MpiWork (one non-blocking operation, its wait with the timeout and the
// progress it pokes), the write-back after a reduction, and how tensors are named in messages.
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <mpi.h>

#include <cstdio>
#include <stdexcept>
#include <string>

#include "comm/communicator.h"
#include "comm/mpi_internal.h"

namespace vimo::comm::mpi_detail {
namespace {

// This process's rank in MPI_COMM_WORLD, or -1 before MPI_Init / after MPI_Finalize (for error messages).
int world_rank_for_errors() {
  int initialized = 0, finalized = 0, rank = -1;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

}  // namespace

std::recursive_mutex& mpi_call_mutex() {
  static std::recursive_mutex mutex;
  return mutex;
}

[[noreturn]] void throw_mpi_failure(int status, const char* call, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  const std::string reason = MPI_Error_string(status, text, &length) == MPI_SUCCESS
                                 ? std::string(text, length)
                                 : fmt::format("MPI error code {}", status);
  throw std::runtime_error(detail::describe_failed_call(
      world_rank_for_errors(), call, file, line, reason,
      "if another rank failed first, its error is the cause; otherwise rerun with --mca btl_base_verbose 100 "
      "to see the transport's view"));
}

// Note [Progress of non-blocking MPI collectives]
// Open MPI runs its non-blocking collectives (libnbc) without a progress thread over shared memory and TCP: a
// collective moves to its next round only while this process is inside some MPI call (MPI_Test, MPI_Wait, or
// any other). Left alone during a long backward, an MPI_Iallreduce therefore mostly runs when wait() finally
// polls it, and the overlap is lost. We cannot add a progress thread of our own: MPI is initialised
// MPI_THREAD_SERIALIZED (Note [MPI thread level]), so a thread calling MPI_Test while the main thread is in a
// collective would be undefined behaviour. Instead the thread that owns the work pokes progress at the points
// it controls: Work::is_completed() is one MPI_Test, and GradientReducer calls it on every bucket in flight
// each time a gradient becomes ready and each time it launches a bucket: often enough for the rounds to
// advance during backward, and cheap (an MPI_Test costs about a microsecond). The NCCL backend needs none of
// this: the GPU runs its collectives on their own stream.

MpiWork::~MpiWork() {
  if (done_ || request_ == MPI_REQUEST_NULL) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (!group_->broken.empty()) {  // the request may never complete: its memory must stay valid
    group_->abandoned.insert(group_->abandoned.end(), buffers_.begin(), buffers_.end());
    return;
  }
  try {
    wait();  // MPI may still read and write the buffers: they cannot be freed before it finishes
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    group_->abandoned.insert(group_->abandoned.end(), buffers_.begin(), buffers_.end());
  }
}

void MpiWork::wait() {
  if (!failure_.empty()) throw std::runtime_error(failure_);
  if (done_) return;
  group_->throw_if_broken(call_);
  const ObservedWait observed(call_.literal(), bytes_);
  if (!poll_until_done([&] { return test(); }, timeout_, group_->spin_for, bytes_)) {
    if (receiving() && cancel_receive()) {
      if (!failure_.empty()) throw std::runtime_error(failure_);
      return;
    }
    group_->broken = detail::describe_timeout(group_->rank, call_.text(), bytes_, timeout_, group_->size,
                                              "This communicator is unusable from now on");
    group_->abandoned.insert(group_->abandoned.end(), buffers_.begin(), buffers_.end());
    throw std::runtime_error(group_->broken);
  }
}

bool MpiWork::is_completed() {
  if (!failure_.empty()) throw std::runtime_error(failure_);
  if (done_) return true;
  group_->throw_if_broken(call_);
  return test();
}

bool MpiWork::test() {
  if (!receiving()) {
    int flag = 0;
    VIMO_MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
    if (!flag) return false;
    finish();
    return true;
  }
  // A receive: its status says how long the message was.
  int flag = 0;
  MPI_Status status{};
  int code = MPI_SUCCESS;
  int error_class = MPI_SUCCESS;
  int bytes = 0;
  {
    const std::lock_guard<std::recursive_mutex> lock(mpi_call_mutex());
    code = MPI_Test(&request_, &flag, &status);
    // Open MPI keeps a request that completed with an error (a truncated message): it is over, so free it.
    if (code != MPI_SUCCESS && request_ != MPI_REQUEST_NULL) MPI_Request_free(&request_);
    if (code != MPI_SUCCESS) MPI_Error_class(code, &error_class);
    if (code == MPI_SUCCESS && flag) MPI_Get_count(&status, MPI_BYTE, &bytes);
  }
  if (code == MPI_SUCCESS && !flag) return false;
  if (code == MPI_SUCCESS && bytes == expected_bytes_) {
    finish();
    return true;
  }
  // The receive is over (the message taken, or cut), so only this call fails and the stream goes on.
  end_without_result();
  if (code != MPI_SUCCESS && error_class != MPI_ERR_TRUNCATE) {
    try {
      throw_mpi_failure(code, "MPI_Test(&request_, &flag, &status)", __FILE__, __LINE__);
    } catch (const std::runtime_error& e) {
      failure_ = e.what();
      throw;
    }
  }
  failure_ = fmt::format(
      "[rank {}] {}: the message held {} bytes, but {} needs {}. HINT: the sender must send a tensor of the "
      "receiver's shape and dtype",
      group_->rank, call_.text(),
      code == MPI_SUCCESS ? fmt::format("{}", bytes) : fmt::format("more than {}", expected_bytes_),
      expected_text_, expected_bytes_);
  throw std::runtime_error(failure_);
}

// A receive that timed out is cancelled: MPI can take back a receive nothing matched (unlike a collective),
// so the communicator stays usable, as after the blocking recv's timeout. If a message matched it meanwhile,
// the cancel fails and the receive completes: then it is checked as any other.
bool MpiWork::cancel_receive() {
  int cancelled = 0;
  MPI_Status status{};
  {
    const std::lock_guard<std::recursive_mutex> lock(mpi_call_mutex());
    if (MPI_Cancel(&request_) != MPI_SUCCESS) return false;
    if (MPI_Wait(&request_, &status) != MPI_SUCCESS) return false;  // returns at once after a cancel
    if (MPI_Test_cancelled(&status, &cancelled) != MPI_SUCCESS) return false;
  }
  if (!cancelled) {
    int bytes = 0;
    MPI_Get_count(&status, MPI_BYTE, &bytes);
    if (bytes == expected_bytes_) {
      finish();
      return true;
    }
  }
  end_without_result();
  failure_ = cancelled ? detail::describe_timeout(group_->rank, call_.text(), bytes_, timeout_, group_->size,
                                                  "No message arrived, so the communicator stays usable")
                       : fmt::format(
                             "[rank {}] {}: the message arrived as the receive timed out, and its length "
                             "does not match {}",
                             group_->rank, call_.text(), expected_text_);
  return true;
}

void MpiWork::end_without_result() {
  done_ = true;
  result_ = at::Tensor();
  target_ = at::Tensor();
  buffers_.clear();
}

void MpiWork::finish() {
  done_ = true;
  if (result_.defined()) write_back(result_, target_, average_, group_->size);
  result_ = at::Tensor();
  target_ = at::Tensor();
  buffers_.clear();
}

void write_back(at::Tensor& result, at::Tensor& target, bool average, int ranks) {
  at::NoGradGuard no_grad;  // the division and copy are communication, not part of any graph
  if (average) result.div_(ranks);
  if (!result.is_same(target)) target.copy_(result);
}

}  // namespace vimo::comm::mpi_detail
