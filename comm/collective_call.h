// Defines what every backend of vimo::comm::Communicator says about a call, none of it part of vimo's API:
// the signature the ranks agree on before a blocking collective (Collective, Signature, CallName, and the
// verdict on every rank's signature, judge_signatures), and the input checks that do not depend on how the
// bytes travel (check_average, check_output, check_peer), with how tensors are named in messages.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <span>
#include <string>

#include "comm/communicator.h"

namespace vimo::comm::detail {

// The collectives the ranks agree on: Note [Agreeing on a collective before running it] in
// comm/mpi_agreement.cpp.
enum class Collective : int64_t { Barrier = 1, Allreduce, Allgather, Broadcast, Split, ReduceScatter };

// What the ranks compare before a collective, as int64 fields: which collective, dtype, op or root, shape,
// and whether this rank's own checks passed.
inline constexpr int kSignatureDims = 8;  // dims past the 8th are covered by numel only
enum SignatureField { kCollective, kDtype, kArgument, kInputAccepted, kDims, kNumel, kSizes };
inline constexpr int kSignatureLength = kSizes + kSignatureDims;
using Signature = std::array<int64_t, kSignatureLength>;

// "allreduce (sum) of int64 [5]": a collective's signature as errors name it.
std::string describe(const Signature& signature);

// A call as errors, timeouts and Work::description() name it ("allreduce (sum) of float32 [4]"). A collective
// keeps the numbers of its signature and formats them only when asked (Note [The fixed cost of a blocking
// call] in comm/mpi_internal.h); a point-to-point call carries its text.
class CallName {
 public:
  CallName(Collective collective, const at::Tensor& tensor, int64_t argument);
  CallName(const char* literal, std::string text) : literal_(literal), text_(std::move(text)) {}

  // The collective's signature, this rank's input marked accepted (zeros for point-to-point calls).
  const Signature& signature() const { return signature_; }
  // "allreduce", "send", ...: the string literal CollectiveObserver takes.
  const char* literal() const { return literal_; }
  std::string text() const { return text_.empty() ? describe(signature_) : text_; }

 private:
  Signature signature_{};
  const char* literal_;
  std::string text_;  // empty for collectives
};

// The verdict of an agreement, once every rank holds every rank's signature (`all`, [size, signature], in
// rank order): returns when all of them equal `mine` and accepted their input; otherwise throws on this rank
// (every rank reaches the same verdict from the same data): this rank's own `problem` when it has one, else
// an error naming the ranks that rejected their input, else one naming every rank's call.
void judge_signatures(int rank, const CallName& call, const Signature& mine, std::span<const int64_t> all,
                      const std::string& problem);

// Reports a wait to the CollectiveObserver while it lasts, so that the watchdog names a rank stuck in one:
// `name` is the call's string literal ("allreduce", "send", ...), `bytes` its payload.
class ObservedWait {
 public:
  ObservedWait(const char* name, int64_t bytes) : observer_(collective_observer()) {
    if (observer_) observer_->enter_collective(name, bytes);
  }
  ~ObservedWait() {
    if (observer_) observer_->leave_collective();
  }
  ObservedWait(const ObservedWait&) = delete;
  ObservedWait& operator=(const ObservedWait&) = delete;

 private:
  CollectiveObserver* observer_;
};

// "float32 [3, 4]".
std::string tensor_text(const at::Tensor& tensor);
// The bytes `tensor` holds; 0 when undefined.
int64_t bytes_of(const at::Tensor& tensor);
// bfloat16 or float16: reduced through float32 by the CPU backends (Note [Half types over MPI]).
inline bool is_half(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// What is wrong with averaging `tensor`, or "". Rejected rather than rounded: an integer mean is almost
// always a bug, and any rounding rule would be a silent choice every backend would have to copy.
std::string check_average(const char* collective, const at::Tensor& tensor, ReduceOp op);

// What is wrong with the caller's `output` of a call into a given tensor, or "".
std::string check_output(const char* collective, const at::Tensor& input, const at::Tensor& output,
                         at::IntArrayRef expected_sizes);

// A backend's checks of one input tensor (defined, on its device, of a dtype it moves, ...): what is wrong
// with `tensor` as the input of `collective`, or "".
using InputCheck = std::string (*)(const char* collective, const at::Tensor& tensor);

// What is wrong with `input` [n, ...] of an all-gather, or "": the backend's own checks, then the shape.
std::string check_gather_input(InputCheck check_input, const at::Tensor& input);
// ... and with the caller's `output` [size * n, ...] of an all-gather into it.
std::string check_gather_into(InputCheck check_input, const at::Tensor& input, const at::Tensor& output,
                              int size);
// What is wrong with `input` [size * n, ...] of a reduce-scatter with `op` over `size` ranks, or "".
std::string check_scatter_input(InputCheck check_input, const at::Tensor& input, ReduceOp op, int size);
// ... and with the caller's `output` [n, ...] of a reduce-scatter into it.
std::string check_scatter_into(InputCheck check_input, const at::Tensor& input, const at::Tensor& output,
                               ReduceOp op, int size);
// [size * n, ...] -> [n, ...] and [n, ...] -> [size * n, ...].
at::DimVector scattered_sizes(const at::Tensor& input, int size);
at::DimVector gathered_sizes(const at::Tensor& input, int size);

// What is wrong with `peer` as the other end of a send or recv (`direction`: "send to" / "recv from") on a
// communicator of `size` ranks where this is `rank`, or "". Tags must be in 0..max_tag.
std::string check_peer(const char* direction, int peer, int tag, int rank, int size, int64_t max_tag,
                       const char* max_tag_name);

}  // namespace vimo::comm::detail
