// Defines the MPI backend of vimo::comm::Communicator (CPU tensors, over a duplicate of MPI_COMM_WORLD or a
// split of one), MpiRuntime, the owner of MPI_Init_thread / MPI_Finalize, and Communicator::split's default.
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <mpi.h>

#include <algorithm>
#include <array>
#include <climits>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace vimo::comm {
namespace {

// This process's rank in MPI_COMM_WORLD, or -1 before MPI_Init / after MPI_Finalize (for error messages).
int world_rank_for_errors() {
  int initialized = 0, finalized = 0, rank = -1;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
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

// Every MPI call goes through this: a failure becomes an exception naming the rank, call, file:line and MPI's
// own error string. (Our communicators use MPI_ERRORS_RETURN, so failures come back here instead of
// aborting.)
#define VIMO_MPI_CHECK(call)                                                                             \
  do {                                                                                                   \
    const int vimo_mpi_status_ = (call);                                                                 \
    if (vimo_mpi_status_ != MPI_SUCCESS) throw_mpi_failure(vimo_mpi_status_, #call, __FILE__, __LINE__); \
  } while (0)

// Note [MPI thread level]
// We ask for MPI_THREAD_SERIALIZED: any thread may call MPI, one call at a time. The Communicator contract
// (every rank issues the same collectives in the same order) already rules out concurrent calls, but not
// calls from other threads: autograd runs backward functions such as all_gather_with_grad's all-reduce on its
// own worker threads for some devices, and helpers may run on background threads. FUNNELED (main thread only)
// would make those undefined behaviour; MULTIPLE would cost locking we do not need.
constexpr int kRequiredThreadLevel = MPI_THREAD_SERIALIZED;

// Set when MpiRuntime called MPI_Init_thread, so that only it calls MPI_Finalize.
bool runtime_owns_mpi = false;

// Note [Half types over MPI]
// MPI 3.1 (OpenMPI 4) has no bfloat16 or float16 datatype, so MPI cannot add them. All-reduce converts them
// to float32, reduces and rounds back once: max and min are exact (the conversion is exact), a sum is rounded
// once at the end instead of after every addition. All-gather and broadcast only move bits, so they send the
// raw 16-bit words as MPI_UINT16_T (the same bytes as MPI_BYTE, counted per element).
bool is_half(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// The MPI datatype that carries `dtype` bit for bit, or MPI_DATATYPE_NULL when unsupported.
MPI_Datatype wire_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return MPI_FLOAT;
    case at::kDouble:
      return MPI_DOUBLE;
    case at::kLong:
      return MPI_INT64_T;
    case at::kInt:
      return MPI_INT32_T;
    case at::kByte:
      return MPI_UINT8_T;
    case at::kBFloat16:
    case at::kHalf:
      return MPI_UINT16_T;  // moved, never reduced: see Note [Half types over MPI]
    default:
      return MPI_DATATYPE_NULL;
  }
}

// Avg is a Sum followed by a division on every rank (MPI has no average).
MPI_Op reduction(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg:
      return MPI_SUM;
    case ReduceOp::Max:
      return MPI_MAX;
    case ReduceOp::Min:
      return MPI_MIN;
  }
  throw std::invalid_argument("unknown ReduceOp");
}

const char* op_name(int64_t op) {
  switch (static_cast<ReduceOp>(op)) {
    case ReduceOp::Sum:
      return "sum";
    case ReduceOp::Avg:
      return "avg";
    case ReduceOp::Max:
      return "max";
    case ReduceOp::Min:
      return "min";
  }
  return "unknown op";
}

// Note [Agreeing on a collective before running it]
// MPI matches collectives by order alone. A rank that passes another shape, dtype, op or root makes the
// others read garbage or hang, and a rank that rejects its input and throws leaves the others waiting
// forever. So every collective first all-reduces a small fixed-size signature of the call (which collective,
// dtype, op or root, shape, and whether this rank's own checks passed) with MPI_MAX over [s, -s], which hands
// every rank both the maximum and the minimum of each field: the ranks agree exactly when they are equal.
// Every rank receives the same extremes, so on disagreement all of them take the error path together: they
// gather each other's signatures and throw errors that name every rank's call, and nobody is left waiting.
// The price is one small all-reduce per collective, negligible beside the payload of a gradient bucket.
// Split agrees on the call only: its color and key differ between ranks by design.
enum class Collective : int64_t { Barrier = 1, Allreduce, Allgather, Broadcast, Split };
constexpr int kSignatureDims = 8;  // dims past the 8th are covered by numel only
enum SignatureField { kCollective, kDtype, kArgument, kInputAccepted, kDims, kNumel, kSizes };
constexpr int kSignatureLength = kSizes + kSignatureDims;
constexpr int kExtremesLength = 2 * kSignatureLength;  // [max of each field, -(min of each field)]
using Signature = std::array<int64_t, kSignatureLength>;

Signature signature_of(Collective collective, const at::Tensor& tensor, int64_t argument, bool accepted) {
  Signature s{};
  s[kCollective] = static_cast<int64_t>(collective);
  s[kArgument] = argument;
  s[kInputAccepted] = accepted ? 1 : 0;
  s[kDtype] = -1;
  if (tensor.defined()) {
    s[kDtype] = static_cast<int64_t>(tensor.scalar_type());
    s[kDims] = tensor.dim();
    s[kNumel] = tensor.numel();
    for (int64_t d = 0; d < std::min<int64_t>(tensor.dim(), kSignatureDims); ++d)
      s[kSizes + d] = tensor.size(d);
  }
  return s;
}

// "allgather of float32 [3, 4]", "allreduce (sum) of int64 [5]", "broadcast from rank 1 of float32 [2]",
// "barrier", "split".
std::string describe(const Signature& s) {
  const auto collective = static_cast<Collective>(s[kCollective]);
  if (collective == Collective::Barrier) return "barrier";
  if (collective == Collective::Split) return "split";
  std::string text =
      collective == Collective::Allreduce   ? fmt::format("allreduce ({})", op_name(s[kArgument]))
      : collective == Collective::Allgather ? std::string("allgather")
                                            : fmt::format("broadcast from rank {}", s[kArgument]);
  if (s[kDtype] < 0) return text + " of an undefined tensor";
  std::vector<int64_t> shown(s.begin() + kSizes,
                             s.begin() + kSizes + std::min<int64_t>(s[kDims], kSignatureDims));
  text += fmt::format(" of {} [{}{}]", c10::getDtypeNames(static_cast<at::ScalarType>(s[kDtype])).first,
                      fmt::join(shown, ", "), s[kDims] > kSignatureDims ? ", ..." : "");
  return text;
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() {
    int initialized = 0;
    VIMO_MPI_CHECK(MPI_Initialized(&initialized));
    if (!initialized) {
      throw std::runtime_error(
          "make_mpi_communicator: MPI is not initialized. HINT: create vimo::comm::MpiRuntime first thing in "
          "main()");
    }
    // A private duplicate: our collectives never match messages of other code using MPI_COMM_WORLD.
    VIMO_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm_));
    adopt();
  }

  // Takes ownership of `owned` (a communicator made by split), freed in the destructor.
  explicit MpiCommunicator(MPI_Comm owned) : comm_(owned) {
    try {
      adopt();
    } catch (...) {
      MPI_Comm_free(&comm_);
      throw;
    }
  }

  ~MpiCommunicator() override {
    // A communicator kept in a static outlives main()'s MpiRuntime; MPI_Finalize has released it then.
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override { return "mpi"; }

  void allreduce(at::Tensor& tensor, ReduceOp op) override {
    std::string problem = check_input("allreduce", tensor);
    if (problem.empty() && op == ReduceOp::Avg && !at::isFloatingType(tensor.scalar_type())) {
      // Rejected rather than rounded: an integer mean is almost always a bug, and any rounding rule would be
      // a silent choice the NCCL backend would have to copy.
      problem = fmt::format(
          "allreduce (avg) of {} tensors is not supported. HINT: allreduce with Sum and divide "
          "with the rounding you want",
          c10::getDtypeNames(tensor.scalar_type()).first);
    }
    agree(Collective::Allreduce, tensor, static_cast<int64_t>(op), problem);

    at::NoGradGuard no_grad;  // the copies below are communication, not part of any graph
    // Reduce in a contiguous buffer of a type MPI can add: the tensor itself when it already is one.
    const bool widen = is_half(tensor.scalar_type());
    at::Tensor buffer =
        widen ? tensor.to(tensor.options().dtype(at::kFloat), false, false, at::MemoryFormat::Contiguous)
              : tensor.contiguous();
    VIMO_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buffer.data_ptr(), static_cast<int>(buffer.numel()),
                                 widen ? MPI_FLOAT : wire_type(buffer.scalar_type()), reduction(op), comm_));
    if (op == ReduceOp::Avg) buffer.div_(size_);
    if (!buffer.is_same(tensor)) tensor.copy_(buffer);
  }

  at::Tensor allgather(const at::Tensor& tensor) override {
    std::string problem = check_input("allgather", tensor);
    if (problem.empty() && tensor.dim() == 0) {
      problem = "allgather gathers along dim 0 but got a 0-dim tensor. HINT: unsqueeze(0) it first";
    }
    agree(Collective::Allgather, tensor, 0, problem);

    const at::Tensor input = tensor.contiguous();  // [n, ...]
    std::vector<int64_t> sizes = input.sizes().vec();
    sizes[0] *= size_;
    at::Tensor output = at::empty(sizes, input.options().requires_grad(false));  // [size * n, ...]
    const int count = static_cast<int>(input.numel());
    const MPI_Datatype type = wire_type(input.scalar_type());
    VIMO_MPI_CHECK(MPI_Allgather(input.data_ptr(), count, type, output.data_ptr(), count, type, comm_));
    return output;
  }

  void broadcast(at::Tensor& tensor, int root) override {
    std::string problem = check_input("broadcast", tensor);
    if (problem.empty() && (root < 0 || root >= size_)) {
      problem = fmt::format("broadcast from rank {}, but the ranks are 0..{}", root, size_ - 1);
    }
    agree(Collective::Broadcast, tensor, root, problem);

    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.contiguous();
    VIMO_MPI_CHECK(MPI_Bcast(buffer.data_ptr(), static_cast<int>(buffer.numel()),
                             wire_type(buffer.scalar_type()), root, comm_));
    if (!buffer.is_same(tensor)) tensor.copy_(buffer);
  }

  // The agreement is an all-reduce, whose result depends on every rank's input: no rank can leave it before
  // all have entered, so it is itself the barrier (and it also catches a rank calling something else).
  void barrier() override { agree(Collective::Barrier, at::Tensor(), 0, ""); }

  std::shared_ptr<Communicator> split(int color, int key) override {
    std::string problem;
    if (color < 0) {
      problem = fmt::format(
          "split got color {}, but colors must be >= 0. HINT: give every rank a group number "
          "0, 1, ...; a rank that belongs to no group still needs a color of its own",
          color);
    }
    // Colors and keys differ between ranks by design, so only the call itself is agreed on.
    agree(Collective::Split, at::Tensor(), 0, problem);
    MPI_Comm group = MPI_COMM_NULL;
    VIMO_MPI_CHECK(MPI_Comm_split(comm_, color, key, &group));
    return std::make_shared<MpiCommunicator>(group);
  }

 private:
  // The set-up shared by every way of making one: errors come back as codes (see VIMO_MPI_CHECK).
  void adopt() {
    VIMO_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    VIMO_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    VIMO_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }

  // The checks every collective makes on its own input; returns what is wrong, or "" when nothing is.
  static std::string check_input(const char* collective, const at::Tensor& tensor) {
    if (!tensor.defined()) return fmt::format("{} got an undefined tensor", collective);
    if (!tensor.device().is_cpu()) {
      return fmt::format(
          "{} got a tensor on {}, but the MPI backend moves CPU tensors only. HINT: use the NCCL "
          "communicator for CUDA tensors, or move the tensor with .cpu()",
          collective, tensor.device().str());
    }
    if (wire_type(tensor.scalar_type()) == MPI_DATATYPE_NULL) {
      return fmt::format(
          "{} got a {} tensor, which the MPI backend does not support. HINT: use float32, float64, "
          "bfloat16, float16, int32, int64 or uint8",
          collective, c10::getDtypeNames(tensor.scalar_type()).first);
    }
    if (tensor.numel() > INT_MAX) {
      return fmt::format("{} got {} elements, but MPI counts are ints (at most {}). HINT: split the tensor",
                         collective, tensor.numel(), INT_MAX);
    }
    return "";
  }

  // See Note [Agreeing on a collective before running it]. Returns when every rank made the same call and
  // accepted its input; otherwise throws on every rank. `problem` is what this rank's own checks found.
  void agree(Collective collective, const at::Tensor& tensor, int64_t argument, const std::string& problem) {
    const Signature mine = signature_of(collective, tensor, argument, problem.empty());
    std::array<int64_t, kExtremesLength> extremes{};
    for (int i = 0; i < kSignatureLength; ++i) {
      extremes[i] = mine[i];
      extremes[kSignatureLength + i] = -mine[i];
    }
    VIMO_MPI_CHECK(
        MPI_Allreduce(MPI_IN_PLACE, extremes.data(), kExtremesLength, MPI_INT64_T, MPI_MAX, comm_));
    bool same = true;
    for (int i = 0; i < kSignatureLength; ++i) same = same && extremes[i] == -extremes[kSignatureLength + i];
    if (same && mine[kInputAccepted] == 1) return;

    std::vector<int64_t> all(static_cast<size_t>(size_) * kSignatureLength);
    VIMO_MPI_CHECK(MPI_Allgather(mine.data(), kSignatureLength, MPI_INT64_T, all.data(), kSignatureLength,
                                 MPI_INT64_T, comm_));
    auto of_rank = [&](int r) {
      Signature s;
      std::copy_n(all.begin() + static_cast<ptrdiff_t>(r) * kSignatureLength, kSignatureLength, s.begin());
      return s;
    };
    if (!problem.empty()) throw std::runtime_error(fmt::format("[rank {}] {}", rank_, problem));
    std::vector<int> rejecting;
    std::vector<std::string> calls;
    for (int r = 0; r < size_; ++r) {
      const Signature s = of_rank(r);
      if (s[kInputAccepted] == 0) rejecting.push_back(r);
      calls.push_back(fmt::format("rank {}: {}", r, describe(s)));
    }
    if (!rejecting.empty()) {
      throw std::runtime_error(
          fmt::format("[rank {}] {} abandoned on every rank: rank(s) {} rejected their input "
                      "(their own errors say why)",
                      rank_, describe(mine), fmt::join(rejecting, ", ")));
    }
    throw std::runtime_error(
        fmt::format("[rank {}] the ranks made different calls: {}. HINT: every rank must make the same "
                    "collective calls in "
                    "the same order, with the same dtype, shape, op and root (allgather needs equal shapes: "
                    "pad to the largest)",
                    rank_, fmt::join(calls, "; ")));
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
};

const char* thread_level_name(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE:
      return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED:
      return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED:
      return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE:
      return "MPI_THREAD_MULTIPLE";
    default:
      return "an unknown thread level";
  }
}

}  // namespace

// The base's default (declared in comm/communicator.h); the MPI backend overrides it.
std::shared_ptr<Communicator> Communicator::split(int /*color*/, int /*key*/) {
  throw std::runtime_error(fmt::format(
      "[rank {}] split is not implemented for the {} backend yet. HINT: split the MPI communicator and "
      "make one {} communicator per group from it (e.g. make_nccl_communicator(group, device))",
      rank(), backend_name(), backend_name()));
}

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  VIMO_MPI_CHECK(MPI_Initialized(&initialized));
  if (initialized) return;  // someone else (a host program, a test harness) owns MPI
  int provided = MPI_THREAD_SINGLE;
  VIMO_MPI_CHECK(MPI_Init_thread(argc, argv, kRequiredThreadLevel, &provided));
  if (provided < kRequiredThreadLevel) {
    MPI_Finalize();
    throw std::runtime_error(
        fmt::format("MPI provides {} but vimo needs {} (see Note [MPI thread level] in "
                    "comm/mpi_communicator.cpp). HINT: use "
                    "an MPI built with thread support, e.g. Open MPI 4 or newer",
                    thread_level_name(provided), thread_level_name(kRequiredThreadLevel)));
  }
  runtime_owns_mpi = true;
}

MpiRuntime::~MpiRuntime() {
  if (!runtime_owns_mpi) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
  runtime_owns_mpi = false;
}

std::shared_ptr<Communicator> make_mpi_communicator() { return std::make_shared<MpiCommunicator>(); }

std::string mpi_library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING] = {};
  int length = 0;
  VIMO_MPI_CHECK(MPI_Get_library_version(text, &length));
  // Open MPI says "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, ..." and MPICH "MPICH
  // Version:\t4.0\n...": keep the first line up to its first comma.
  std::string version(text, static_cast<size_t>(length));
  version = version.substr(0, version.find_first_of(",\n"));
  const size_t first = version.find_first_not_of(" \t\r");
  const size_t last = version.find_last_not_of(" \t\r");
  return first == std::string::npos ? std::string() : version.substr(first, last - first + 1);
}

}  // namespace vimo::comm
