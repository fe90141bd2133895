// Backend-independent parts of vimo::comm: the world read from the launcher's environment, the collective
// timeout and other knobs, the all-gather that keeps autograd, and the error formats shared by the backends.
#include "comm/communicator.h"

#include <fmt/format.h>
#include <torch/csrc/autograd/custom_function.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string_view>

#include "comm/launcher_env.h"

namespace vimo::comm {

// vimo's own knobs of the communicators, all in one place (the launcher's variables are in
// comm/launcher_env.h; see DESIGN.md, "Communication").
namespace env {
// Seconds a collective may wait for the other ranks (Note [Collective timeouts] in mpi_internal.h).
constexpr const char* kCollectiveTimeout = "VIMO_COMM_TIMEOUT_S";
// "1": asynchronous calls agree on the call like blocking ones (Note [Agreement on asynchronous calls]).
constexpr const char* kCheckAsyncCalls = "VIMO_COMM_CHECK_ASYNC";
}  // namespace env

// Generous: a collective legitimately waits for the slowest rank's step, which may include a checkpoint save
// or an evaluation. A hung rank is still reported in minutes rather than never.
constexpr std::chrono::milliseconds kDefaultCollectiveTimeout{600'000};

namespace {

std::string this_host_name() {
  char name[HOST_NAME_MAX + 1] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) {
    throw std::runtime_error(fmt::format("gethostname failed: {}", std::strerror(errno)));
  }
  return name;
}

}  // namespace

// Note [World from the launcher]
// launch_environment() reads whichever launcher started us (Note [Launcher precedence] in launcher_env.cpp)
// and throws, naming the variable, on a malformed, out-of-range or incomplete set, so WorldInfo only copies
// it. One field does not survive the copy: a launcher may not say how many ranks share this host (torchrun
// without LOCAL_WORLD_SIZE, Slurm with uneven tasks per node and no SLURM_NODEID), and WorldInfo has no way
// to say "unknown". We then report local_rank + 1, the smallest size consistent with what the launcher did
// say, so a check of "enough GPUs for the ranks on this host" errs towards running and failing with the
// device's own error rather than towards a skip nobody asked for.
WorldInfo world_from_environment() {
  const LaunchEnvironment launch = launch_environment();
  WorldInfo world;
  world.host = this_host_name();
  world.launcher = launch.launcher;
  world.rank = launch.rank;
  world.world_size = launch.world_size;
  world.local_rank = launch.local_rank;
  world.local_size = launch.local_size.value_or(launch.local_rank + 1);
  return world;
}

namespace {

// `text` as a positive number of seconds, or nullopt when it is not one (whole text, finite, > 0).
std::optional<double> parse_seconds(std::string_view text) {
  double seconds = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), seconds);
  if (error != std::errc() || end != text.data() + text.size() || !std::isfinite(seconds) || seconds <= 0)
    return std::nullopt;
  return seconds;
}

std::chrono::milliseconds read_collective_timeout() {
  const char* raw = std::getenv(env::kCollectiveTimeout);
  if (raw == nullptr) return kDefaultCollectiveTimeout;
  const std::optional<double> seconds = parse_seconds(raw);
  if (!seconds || *seconds > 1e9) {
    throw std::runtime_error(fmt::format(
        "{}='{}' is not a number of seconds. HINT: set a positive number such as 600 or 0.5, or unset it for "
        "the default of {} s",
        env::kCollectiveTimeout, raw, kDefaultCollectiveTimeout.count() / 1000));
  }
  const auto timeout = std::chrono::milliseconds(std::max<int64_t>(1, std::llround(*seconds * 1000)));
  std::fprintf(stderr, "[vimo] %s=%s overrides the default collective timeout of %lld s\n",
               env::kCollectiveTimeout, raw,
               static_cast<long long>(kDefaultCollectiveTimeout.count() / 1000));
  return timeout;
}

}  // namespace

std::chrono::milliseconds default_collective_timeout() {
  static const std::chrono::milliseconds timeout = read_collective_timeout();
  return timeout;
}

void Communicator::set_timeout(std::chrono::milliseconds timeout) {
  if (timeout.count() <= 0) {
    throw std::invalid_argument(
        fmt::format("[rank {}] set_timeout({} ms): the timeout must be positive", rank(), timeout.count()));
  }
  timeout_ = timeout;
}

// Note [Gradient of the gathered negatives]
// Rank r holds rows X_r [n, D] and computes its loss L_r as a mean over its n local rows, each scored against
// the gathered rows X = [X_0; ...; X_{p-1}] of every rank. The objective being trained is the mean of the
// per-rank losses, (1/p) Σ_r L_r, and data parallelism supplies the 1/p: it averages parameter gradients over
// the p ranks. So each rank must backpropagate the gradient of Σ_r L_r with respect to its own rows X_r.
// L_r reaches X_q (q ≠ r) only through the gathered copy, whose gradient lives on rank r; hence the owner q
// needs Σ_r ∂L_r/∂(rows of q in the gathered tensor): the gathered gradient summed over ranks, then its own
// rows [q*n, (q+1)*n). That is exactly a reduce-scatter (sum) of the gathered gradient.
namespace {

// Carries the communicator through autograd's saved_data, which holds IValues only.
struct CommunicatorHolder : torch::CustomClassHolder {
  explicit CommunicatorHolder(std::shared_ptr<Communicator> c) : comm(std::move(c)) {}
  std::shared_ptr<Communicator> comm;
};

class AllGatherWithGrad : public torch::autograd::Function<AllGatherWithGrad> {
 public:
  // local [n, ...] -> gathered [size * n, ...]
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& local,
                            const std::shared_ptr<Communicator>& comm) {
    // The communicator validates `local` on every rank together (a 0-dim tensor included), so it goes first.
    at::Tensor gathered = comm->allgather(local.contiguous());
    ctx->saved_data["rows"] = local.size(0);
    ctx->saved_data["comm"] = at::IValue::make_capsule(c10::make_intrusive<CommunicatorHolder>(comm));
    return gathered;
  }

  // grad_outputs[0] [size * n, ...] -> gradient of the local rows [n, ...]; see Note [Gradient of the
  // gathered negatives]. The second input (the communicator) gets no gradient.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto holder =
        c10::static_intrusive_pointer_cast<CommunicatorHolder>(ctx->saved_data["comm"].toCapsule());
    const int64_t rows = ctx->saved_data["rows"].toInt();
    at::Tensor mine = holder->comm->reduce_scatter(grad_outputs[0], ReduceOp::Sum);  // [n, ...]
    TORCH_INTERNAL_ASSERT(mine.size(0) == rows);
    return {mine, at::Tensor()};
  }
};

}  // namespace

at::Tensor all_gather_with_grad(const at::Tensor& tensor, const std::shared_ptr<Communicator>& comm) {
  if (!comm) throw std::invalid_argument("all_gather_with_grad: the communicator is null");
  return AllGatherWithGrad::apply(tensor, comm);
}

namespace detail {

std::string describe_failed_call(int rank, const char* call, const char* file, int line,
                                 const std::string& reason, const std::string& hint) {
  // Keep "MPI_Allreduce" of "MPI_Allreduce(MPI_IN_PLACE, ...)".
  const std::string_view call_text(call);
  const std::string_view function = call_text.substr(0, call_text.find('('));
  // Keep "comm/x.cpp" of "/work/main/comm/x.cpp": __FILE__ is absolute under CMake.
  std::string_view path(file);
  if (const size_t folder = path.rfind("/comm/"); folder != std::string_view::npos)
    path.remove_prefix(folder + 1);
  std::string message = fmt::format("[rank {}] {} failed at {}:{}: {}", rank, function, path, line, reason);
  if (!hint.empty()) message += fmt::format(". HINT: {}", hint);
  return message;
}

namespace {
bool read_check_async_calls() {
  const char* raw = std::getenv(env::kCheckAsyncCalls);
  if (raw == nullptr || std::string_view(raw) == "0") return false;
  if (std::string_view(raw) != "1") {
    throw std::runtime_error(fmt::format("{}='{}' must be 0 or 1", env::kCheckAsyncCalls, raw));
  }
  std::fprintf(stderr,
               "[vimo] %s=1: asynchronous collectives agree on the call first (slower; for debugging)\n",
               env::kCheckAsyncCalls);
  return true;
}
}  // namespace

bool check_async_calls() {
  static const bool check = read_check_async_calls();
  return check;
}

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
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

std::string describe_timeout(int rank, const std::string& what, int64_t bytes,
                             std::chrono::milliseconds timeout, int communicator_size,
                             const std::string& consequence) {
  return fmt::format(
      "[rank {}] {} ({} bytes) timed out after {:g} s on a communicator of {} ranks: a peer did not take "
      "part "
      "(it is stuck, dead, slower than the timeout, or made a different call). {}. HINT: the rank whose log "
      "stops before this call is the cause; if it was only slow (a long checkpoint save or evaluation), "
      "raise {}",
      rank, what, bytes, static_cast<double>(timeout.count()) / 1000.0, communicator_size, consequence,
      env::kCollectiveTimeout);
}

}  // namespace detail

namespace {
std::atomic<CollectiveObserver*> g_collective_observer{nullptr};
}  // namespace

void set_collective_observer(CollectiveObserver* observer) { g_collective_observer.store(observer); }
CollectiveObserver* collective_observer() { return g_collective_observer.load(std::memory_order_relaxed); }

}  // namespace vimo::comm
