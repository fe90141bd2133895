// Defines how every backend names, checks and agrees on a call (declared in comm/collective_call.h).
#include "comm/collective_call.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

namespace vimo::comm::detail {
namespace {

const char* op_name(int64_t op) { return reduce_op_name(static_cast<ReduceOp>(op)); }

// The string literal CollectiveObserver takes for `collective`.
const char* literal_of(Collective collective) {
  switch (collective) {
    case Collective::Barrier:
      return "barrier";
    case Collective::Allreduce:
      return "allreduce";
    case Collective::Allgather:
      return "allgather";
    case Collective::Broadcast:
      return "broadcast";
    case Collective::Split:
      return "split";
    case Collective::ReduceScatter:
      return "reduce_scatter";
  }
  return "collective";
}

}  // namespace

CallName::CallName(Collective collective, const at::Tensor& tensor, int64_t argument)
    : literal_(literal_of(collective)) {
  Signature& s = signature_;
  s[kCollective] = static_cast<int64_t>(collective);
  s[kArgument] = argument;
  s[kInputAccepted] = 1;
  s[kDtype] = -1;
  if (tensor.defined()) {
    s[kDtype] = static_cast<int64_t>(tensor.scalar_type());
    s[kDims] = tensor.dim();
    s[kNumel] = tensor.numel();
    for (int64_t d = 0; d < std::min<int64_t>(tensor.dim(), kSignatureDims); ++d)
      s[kSizes + d] = tensor.size(d);
  }
}

// "allgather of float32 [3, 4]", "allreduce (sum) of int64 [5]", "reduce_scatter (avg) of float64 [4, 2]",
// "broadcast from rank 1 of float32 [2]", "barrier", "split".
std::string describe(const Signature& s) {
  const auto collective = static_cast<Collective>(s[kCollective]);
  if (collective == Collective::Barrier) return "barrier";
  if (collective == Collective::Split) return "split";
  std::string text;
  switch (collective) {
    case Collective::Allreduce:
      text = fmt::format("allreduce ({})", op_name(s[kArgument]));
      break;
    case Collective::ReduceScatter:
      text = fmt::format("reduce_scatter ({})", op_name(s[kArgument]));
      break;
    case Collective::Allgather:
      text = "allgather";
      break;
    default:
      text = fmt::format("broadcast from rank {}", s[kArgument]);
  }
  if (s[kDtype] < 0) return text + " of an undefined tensor";
  std::vector<int64_t> shown(s.begin() + kSizes,
                             s.begin() + kSizes + std::min<int64_t>(s[kDims], kSignatureDims));
  text += fmt::format(" of {} [{}{}]", c10::getDtypeNames(static_cast<at::ScalarType>(s[kDtype])).first,
                      fmt::join(shown, ", "), s[kDims] > kSignatureDims ? ", ..." : "");
  return text;
}

void judge_signatures(int rank, const CallName& call, const Signature& mine, std::span<const int64_t> all,
                      const std::string& problem) {
  const int size = static_cast<int>(all.size() / kSignatureLength);
  bool agreed = true;
  for (int r = 0; r < size && agreed; ++r) {
    const int64_t* row = all.data() + static_cast<ptrdiff_t>(r) * kSignatureLength;
    agreed = std::equal(mine.begin(), mine.end(), row) && row[kInputAccepted] == 1;
  }
  if (agreed) return;
  auto of_rank = [&](int r) {
    Signature s;
    std::copy_n(all.data() + static_cast<ptrdiff_t>(r) * kSignatureLength, kSignatureLength, s.begin());
    return s;
  };
  if (!problem.empty()) throw std::runtime_error(fmt::format("[rank {}] {}", rank, problem));
  std::vector<int> rejecting;
  std::vector<std::string> calls;
  for (int r = 0; r < size; ++r) {
    const Signature s = of_rank(r);
    if (s[kInputAccepted] == 0) rejecting.push_back(r);
    calls.push_back(fmt::format("rank {}: {}", r, describe(s)));
  }
  if (!rejecting.empty()) {
    throw std::runtime_error(
        fmt::format("[rank {}] {} abandoned on every rank: rank(s) {} rejected their input "
                    "(their own errors say why)",
                    rank, call.text(), fmt::join(rejecting, ", ")));
  }
  throw std::runtime_error(
      fmt::format("[rank {}] the ranks made different calls: {}. HINT: every rank must make the same "
                  "collective calls in "
                  "the same order, with the same dtype, shape, op and root (allgather needs equal shapes: "
                  "pad to the largest)",
                  rank, fmt::join(calls, "; ")));
}

std::string tensor_text(const at::Tensor& tensor) {
  if (!tensor.defined()) return "an undefined tensor";
  return fmt::format("{} [{}]", c10::getDtypeNames(tensor.scalar_type()).first,
                     fmt::join(tensor.sizes(), ", "));
}

int64_t bytes_of(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.numel() * static_cast<int64_t>(tensor.element_size()) : 0;
}

std::string check_average(const char* collective, const at::Tensor& tensor, ReduceOp op) {
  if (op != ReduceOp::Avg || at::isFloatingType(tensor.scalar_type())) return "";
  return fmt::format(
      "{} (avg) of {} tensors is not supported. HINT: use Sum and divide with the rounding you want",
      collective, c10::getDtypeNames(tensor.scalar_type()).first);
}

std::string check_output(const char* collective, const at::Tensor& input, const at::Tensor& output,
                         at::IntArrayRef expected_sizes) {
  if (!output.defined()) return fmt::format("{} got an undefined output tensor", collective);
  if (output.device() != input.device() || output.scalar_type() != input.scalar_type() ||
      !output.sizes().equals(expected_sizes) || !output.is_contiguous()) {
    return fmt::format("{} of {} needs a contiguous {} output of {} [{}], but got {}{} on {}", collective,
                       tensor_text(input), input.device().str(),
                       c10::getDtypeNames(input.scalar_type()).first, fmt::join(expected_sizes, ", "),
                       output.is_contiguous() ? "" : "a non-contiguous ", tensor_text(output),
                       output.device().str());
  }
  return "";
}

std::string check_gather_input(InputCheck check_input, const at::Tensor& input) {
  std::string problem = check_input("allgather", input);
  if (problem.empty() && input.dim() == 0) {
    problem = "allgather gathers along dim 0 but got a 0-dim tensor. HINT: unsqueeze(0) it first";
  }
  return problem;
}

std::string check_gather_into(InputCheck check_input, const at::Tensor& input, const at::Tensor& output,
                              int size) {
  std::string problem = check_gather_input(check_input, input);
  if (problem.empty()) problem = check_output("allgather", input, output, gathered_sizes(input, size));
  return problem;
}

std::string check_scatter_input(InputCheck check_input, const at::Tensor& input, ReduceOp op, int size) {
  std::string problem = check_input("reduce_scatter", input);
  if (problem.empty()) problem = check_average("reduce_scatter", input, op);
  if (problem.empty() && input.dim() == 0) {
    problem = "reduce_scatter splits dim 0 but got a 0-dim tensor. HINT: unsqueeze(0) it first";
  }
  if (problem.empty() && input.size(0) % size != 0) {
    problem = fmt::format(
        "reduce_scatter splits dim 0 of {} among {} ranks, but {} is not divisible by {}. HINT: pad dim 0 "
        "to a multiple of the communicator size",
        tensor_text(input), size, input.size(0), size);
  }
  return problem;
}

std::string check_scatter_into(InputCheck check_input, const at::Tensor& input, const at::Tensor& output,
                               ReduceOp op, int size) {
  std::string problem = check_scatter_input(check_input, input, op, size);
  if (problem.empty()) problem = check_output("reduce_scatter", input, output, scattered_sizes(input, size));
  return problem;
}

at::DimVector scattered_sizes(const at::Tensor& input, int size) {
  at::DimVector sizes(input.sizes());
  sizes[0] /= size;
  return sizes;
}

at::DimVector gathered_sizes(const at::Tensor& input, int size) {
  at::DimVector sizes(input.sizes());
  sizes[0] *= size;
  return sizes;
}

std::string check_peer(const char* direction, int peer, int tag, int rank, int size, int64_t max_tag,
                       const char* max_tag_name) {
  if (peer < 0 || peer >= size) {
    return fmt::format("{} rank {}, but the ranks are 0..{}", direction, peer, size - 1);
  }
  if (peer == rank) {
    return fmt::format("{} rank {}, which is this rank. HINT: copy the tensor instead", direction, peer);
  }
  if (tag < 0 || tag > max_tag) {
    return fmt::format("{} rank {} with tag {}, but tags must be in 0..{} ({})", direction, peer, tag,
                       max_tag, max_tag_name);
  }
  return "";
}

}  // namespace vimo::comm::detail
