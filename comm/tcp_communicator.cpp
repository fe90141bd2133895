// Defines the TCP backend of vimo::comm::Communicator (comm/tcp_communicator.h): a worker thread per
// communicator that runs its calls in order over the mesh of comm/tcp_mesh.cpp, with ring collectives, the
// agreement of blocking calls shared with the MPI backend (comm/collective_call.h), and split.
#include "comm/tcp_communicator.h"

#include <ATen/core/grad_mode.h>
#include <fmt/format.h>

#include <climits>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <vector>

#include "comm/collective_call.h"
#include "comm/tcp_internal.h"

namespace vimo::comm {
namespace {

using namespace tcp_detail;  // NOLINT(google-build-using-namespace): the backend's own internals
using detail::bytes_of;
using detail::CallName;
using detail::check_average;
using detail::check_output;
using detail::Collective;
using detail::is_half;
using detail::kSignatureLength;
using detail::Signature;
using detail::tensor_text;

// Note [A TCP communicator]
// For jobs that MPI did not launch (torchrun, srun without PMI), CPU tensors travel over TCP. Each
// communicator holds a full mesh of connections (comm/tcp_mesh.cpp) and one worker thread that runs its calls
// one after another, in the order they were made: blocking calls and asynchronous ones alike are queued, and
// a blocking call then waits for its own. Since every rank makes the same calls in the same order, the
// workers run the same collectives in the same order, which is what lets each frame carry the collective's
// number (Note [Frames, tags and mailboxes]). The worker also makes asynchronous calls progress while the
// caller computes (backward, for the gradient reducer), with no polling by the caller.
// Collectives are rings: all-reduce is a reduce-scatter then an all-gather of p chunks (each rank sends and
// receives 2(p-1)/p of the tensor, the least any all-reduce moves), all-gather and reduce-scatter one ring
// pass each, broadcast the root sending to every rank. Every rank reduces each chunk in the same order, and
// the reduced chunks are then copied around the ring, so every rank ends with the same bits. Half types are
// reduced in float32 and rounded once, as over MPI (Note [Half types over MPI]).
// Blocking calls first agree on the call (Note [Agreeing on a collective before running it]) through a ring
// all-gather of the signatures; asynchronous ones do not (Note [Agreement on asynchronous calls]). Every call
// has a deadline: the communicator's timeout from when the worker starts it (a queued call waits for the ones
// before it, which have deadlines of their own; like MPI's waits, a timeout counts the time spent waiting for
// peers, not in the queue). A collective that timed out, a send cut in the middle, a peer that closed its
// connection, or any other failure inside a call leaves the communicator unusable, and every later call
// fails at once naming the first failure. A receive that timed out keeps it usable (Note [Ending an exchange
// that did not finish] in tcp_mesh.cpp), and so does a call the agreement rejected on every rank.

constexpr int64_t kMaxTag = INT_MAX;

// A call every rank gave up together (the agreement found a mismatch or a rejected input) or that failed on
// this rank alone with its stream intact (a receive of the wrong size): the communicator goes on. Any other
// failure inside a call leaves the ranks at different points of it, and breaks the communicator.
struct CallRejected : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A queued call: its state, which its caller or Work waits on, and what the worker runs.
struct OpState {
  OpState(CallName c, int64_t b, std::chrono::milliseconds t) : call(std::move(c)), bytes(b), timeout(t) {}
  CallName call;
  int64_t bytes;
  std::chrono::milliseconds timeout;  // from when the worker starts the call (Note [A TCP communicator])
  std::mutex mutex;
  std::condition_variable finished;
  std::atomic<bool> done{false};
  std::exception_ptr error;
  std::string broke;      // when this call left the communicator unusable: why (a later wait is refused)
  bool reported = false;  // whether a wait has thrown `error` already
};

// Waits for `state` (seen by the collective observer), then throws its error if it failed.
void wait_for(OpState& state) {
  CollectiveObserver* observer = collective_observer();
  if (observer != nullptr) observer->enter_collective(state.call.literal(), state.bytes);
  {
    std::unique_lock<std::mutex> lock(state.mutex);
    state.finished.wait(lock, [&] { return state.done.load(); });
  }
  if (observer != nullptr) observer->leave_collective();
  if (state.error) std::rethrow_exception(state.error);
}

class TcpWork final : public Work {
 public:
  TcpWork(std::shared_ptr<OpState> state, int rank) : state_(std::move(state)), rank_(rank) {}
  ~TcpWork() override {
    std::unique_lock<std::mutex> lock(state_->mutex);
    state_->finished.wait(lock, [&] { return state_->done.load(); });
  }
  // The first wait throws the call's error; once a failure made the communicator unusable, later waits are
  // refused, as on MPI.
  void wait() override {
    if (state_->done.load() && state_->reported && !state_->broke.empty()) {
      throw std::runtime_error(fmt::format(
          "[rank {}] {} refused: this communicator is unusable since an earlier call failed ({}). "
          "HINT: exit and resume from the last checkpoint",
          rank_, state_->call.text(), state_->broke));
    }
    state_->reported = true;
    wait_for(*state_);
  }
  bool is_completed() override { return state_->done.load(); }
  std::string description() const override { return state_->call.text(); }

 private:
  std::shared_ptr<OpState> state_;
  int rank_;
};

void reduce_into(at::Tensor dst, const at::Tensor& src, ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg:
      dst.add_(src);
      break;
    case ReduceOp::Max:
      at::maximum_out(dst, dst, src);
      break;
    case ReduceOp::Min:
      at::minimum_out(dst, dst, src);
      break;
  }
}

uint64_t fnv1a(const std::string& text, uint64_t hash = 1469598103934665603ull) {
  for (unsigned char c : text) hash = (hash ^ c) * 1099511628211ull;
  return hash;
}

// The mesh and the worker thread that owns it, shared by a communicator and nothing else.
class Engine {
 public:
  explicit Engine(std::unique_ptr<Mesh> mesh)
      : mesh_(std::move(mesh)), rank_(mesh_->rank()), size_(mesh_->size()), worker_([this] { loop(); }) {}
  ~Engine() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    worker_.join();  // after running what is queued, so every Work finishes
  }
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }

  std::shared_ptr<OpState> submit(CallName call, int64_t bytes, std::chrono::milliseconds timeout,
                                  std::function<void(Clock::time_point)> run) {
    auto state = std::make_shared<OpState>(std::move(call), bytes, timeout);
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back({state, std::move(run)});
    }
    wake_.notify_one();
    return state;
  }

  // The rest runs on the worker only.
  Mesh& mesh() { return *mesh_; }

  // The tag of the next collective: Note [Frames, tags and mailboxes].
  int64_t next_tag() { return -1 - collectives_++; }
  uint64_t next_split() { return splits_++; }

  // Note [Agreeing on a collective before running it], through a ring all-gather of the signatures.
  void agree(const CallName& call, const std::string& problem, Clock::time_point deadline) {
    Signature mine = call.signature();
    mine[detail::kInputAccepted] = problem.empty() ? 1 : 0;
    std::vector<int64_t> all(static_cast<size_t>(size_) * kSignatureLength);
    ring_allgather(mine.data(), all.data(), sizeof(mine), deadline);
    try {
      detail::judge_signatures(rank_, call, mine, all, problem);
    } catch (const std::runtime_error& e) {
      throw CallRejected(e.what());
    }
  }

  // Each rank's `block` bytes at `mine` -> `all` [size, block], in rank order.
  void ring_allgather(const void* mine, void* all, size_t block, Clock::time_point deadline) {
    auto* out = static_cast<uint8_t*>(all);
    if (out + static_cast<ptrdiff_t>(rank_ * block) != mine) std::memcpy(out + rank_ * block, mine, block);
    const int64_t tag = next_tag();
    for (int step = 0; step + 1 < size_; ++step) {
      const int send = mod(rank_ - step), receive = mod(rank_ - step - 1);
      const Send s{next(), tag, out + send * block, block};
      const Recv r{previous(), tag, out + receive * block, block};
      mesh_->exchange({&s, 1}, {&r, 1}, deadline);
    }
  }

  // Reduces the contiguous 1-d `flat` over the ring so that this rank ends with chunk (rank + shift) % size
  // of `bounds` (size + 1 element offsets) reduced over all ranks; the other chunks hold partial results.
  void ring_reduce_scatter(at::Tensor& flat, const std::vector<int64_t>& bounds, ReduceOp op, int shift,
                           Clock::time_point deadline) {
    int64_t longest = 0;
    for (int c = 0; c < size_; ++c) longest = std::max(longest, bounds[c + 1] - bounds[c]);
    const at::Tensor scratch = at::empty({longest}, flat.options());
    const auto element = static_cast<size_t>(flat.element_size());
    auto* base = static_cast<uint8_t*>(flat.data_ptr());
    const int64_t tag = next_tag();
    for (int step = 0; step + 1 < size_; ++step) {
      const int send = mod(rank_ + shift - 1 - step), receive = mod(rank_ + shift - 2 - step);
      const int64_t receive_length = bounds[receive + 1] - bounds[receive];
      const Send s{next(), tag, base + bounds[send] * element,
                   static_cast<size_t>(bounds[send + 1] - bounds[send]) * element};
      const Recv r{previous(), tag, scratch.data_ptr(), static_cast<size_t>(receive_length) * element};
      mesh_->exchange({&s, 1}, {&r, 1}, deadline);
      reduce_into(flat.narrow(0, bounds[receive], receive_length), scratch.narrow(0, 0, receive_length), op);
    }
  }

  // After ring_reduce_scatter with the same `shift`: copies every rank's reduced chunk to every rank.
  void ring_share_chunks(at::Tensor& flat, const std::vector<int64_t>& bounds, int shift,
                         Clock::time_point deadline) {
    const auto element = static_cast<size_t>(flat.element_size());
    auto* base = static_cast<uint8_t*>(flat.data_ptr());
    const int64_t tag = next_tag();
    for (int step = 0; step + 1 < size_; ++step) {
      const int send = mod(rank_ + shift - step), receive = mod(rank_ + shift - step - 1);
      const Send s{next(), tag, base + bounds[send] * element,
                   static_cast<size_t>(bounds[send + 1] - bounds[send]) * element};
      const Recv r{previous(), tag, base + bounds[receive] * element,
                   static_cast<size_t>(bounds[receive + 1] - bounds[receive]) * element};
      mesh_->exchange({&s, 1}, {&r, 1}, deadline);
    }
  }

  // Chunk offsets of `elements` split as evenly as possible into size() chunks.
  std::vector<int64_t> even_bounds(int64_t elements) const {
    std::vector<int64_t> bounds(static_cast<size_t>(size_) + 1);
    for (int c = 0; c <= size_; ++c) bounds[c] = elements * c / size_;
    return bounds;
  }

 private:
  struct Op {
    std::shared_ptr<OpState> state;
    std::function<void(Clock::time_point)> run;
  };

  int mod(int r) const { return ((r % size_) + size_) % size_; }
  int next() const { return mod(rank_ + 1); }
  int previous() const { return mod(rank_ - 1); }

  void loop() {
    const at::NoGradGuard no_grad;  // communication is never part of a graph (grad mode is per thread)
    while (true) {
      Op op;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        op = std::move(queue_.front());
        queue_.pop_front();
      }
      OpState& state = *op.state;
      std::exception_ptr error;
      if (!broken_.empty()) {
        error = std::make_exception_ptr(std::runtime_error(fmt::format(
            "[rank {}] {} refused: this communicator is unusable since an earlier call failed ({}). "
            "HINT: exit and resume from the last checkpoint",
            rank_, state.call.text(), broken_)));
      } else {
        error = execute(op);
      }
      {
        const std::lock_guard<std::mutex> lock(state.mutex);
        state.error = error;
        if (error && !broken_.empty()) state.broke = broken_;
        state.done = true;
      }
      state.finished.notify_all();
    }
  }

  // Runs `op` to its deadline; returns its error, and marks the communicator broken when the failure left the
  // ranks out of step (Note [A TCP communicator]).
  std::exception_ptr execute(Op& op) {
    OpState& state = *op.state;
    std::exception_ptr error;
    try {
      op.run(Clock::now() + state.timeout);
    } catch (const MeshTimeout& e) {
      // A collective cut short leaves the ranks at different points of it: only a receive that got
      // nothing can be given up alone.
      const bool collective = state.call.signature()[detail::kCollective] != 0;
      std::string consequence;
      if (collective) {
        consequence = fmt::format(
            "Over TCP, {}; the ranks are now at different points of the collective, so "
            "the communicator is unusable",
            e.what());
      } else if (!e.usable) {
        consequence = fmt::format(
            "Over TCP, {}; a send was cut in the middle, so the communicator is unusable", e.what());
      } else {
        consequence = fmt::format(
            "Over TCP, {}; the receive is given up and the communicator stays usable (a message that "
            "arrives later is kept for the next receive of its tag)",
            e.what());
      }
      if (collective || !e.usable) broken_ = fmt::format("{} timed out: {}", state.call.text(), e.what());
      error = std::make_exception_ptr(std::runtime_error(detail::describe_timeout(
          rank_, state.call.text(), state.bytes, state.timeout, size_, consequence)));
    } catch (const CallRejected& e) {
      error = std::make_exception_ptr(std::runtime_error(e.what()));
    } catch (const std::exception& e) {  // MeshFailure, or anything else that cut a call short
      broken_ = e.what();
      error = std::make_exception_ptr(
          std::runtime_error(fmt::format("[rank {}] {} failed: {}. The TCP communicator is unusable now",
                                         rank_, state.call.text(), e.what())));
    }
    return error;
  }

  std::unique_ptr<Mesh> mesh_;
  const int rank_;
  const int size_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Op> queue_;
  bool stopping_ = false;
  int64_t collectives_ = 0;  // worker only
  uint64_t splits_ = 0;      // worker only
  std::string broken_;       // worker only
  std::thread worker_;       // last: starts after everything it uses
};

class TcpCommunicator final : public Communicator {
 public:
  explicit TcpCommunicator(std::unique_ptr<Mesh> mesh) : engine_(std::make_unique<Engine>(std::move(mesh))) {}

  int rank() const override { return engine_->rank(); }
  int size() const override { return engine_->size(); }
  std::string backend_name() const override { return "tcp"; }

  void allreduce(at::Tensor& tensor, ReduceOp op) override { wait_for(*start_allreduce(tensor, op, true)); }
  std::shared_ptr<Work> allreduce_async(at::Tensor& tensor, ReduceOp op) override {
    return std::make_shared<TcpWork>(start_allreduce(tensor, op, detail::check_async_calls()), rank());
  }

  at::Tensor allgather(const at::Tensor& tensor) override {
    const std::string problem = check_gather_input(tensor);
    at::Tensor output;
    if (problem.empty()) {
      at::DimVector sizes(tensor.sizes());
      sizes[0] *= size();
      output = at::empty(sizes, tensor.options().requires_grad(false));
    }
    wait_for(*start_allgather(tensor, output, problem, true));
    return output;
  }
  std::shared_ptr<Work> allgather_async(const at::Tensor& input, at::Tensor& output) override {
    return std::make_shared<TcpWork>(
        start_allgather(input, output, check_gather_into(input, output), detail::check_async_calls()),
        rank());
  }
  void allgather_into(const at::Tensor& input, at::Tensor& output) override {
    wait_for(*start_allgather(input, output, check_gather_into(input, output), true));
  }

  at::Tensor reduce_scatter(const at::Tensor& input, ReduceOp op) override {
    const std::string problem = check_scatter_input(input, op);
    at::Tensor output;
    if (problem.empty()) output = at::empty(scattered_sizes(input), input.options().requires_grad(false));
    wait_for(*start_reduce_scatter(input, output, op, problem, true));
    return output;
  }
  std::shared_ptr<Work> reduce_scatter_async(const at::Tensor& input, at::Tensor& output,
                                             ReduceOp op) override {
    return std::make_shared<TcpWork>(
        start_reduce_scatter(input, output, op, check_scatter_into(input, output, op),
                             detail::check_async_calls()),
        rank());
  }
  void reduce_scatter_into(const at::Tensor& input, at::Tensor& output, ReduceOp op) override {
    wait_for(*start_reduce_scatter(input, output, op, check_scatter_into(input, output, op), true));
  }

  void broadcast(at::Tensor& tensor, int root) override {
    std::string problem = check_input("broadcast", tensor);
    if (problem.empty() && (root < 0 || root >= size())) {
      problem = fmt::format("broadcast from rank {}, but the ranks are 0..{}", root, size() - 1);
    }
    CallName call(Collective::Broadcast, tensor, root);
    Engine* engine = engine_.get();
    wait_for(*start(std::move(call), bytes_of(tensor), problem, true,
                    [engine, tensor, root](Clock::time_point deadline) {
                      at::Tensor buffer = tensor.contiguous();
                      const auto bytes = static_cast<size_t>(bytes_of(buffer));
                      const int64_t tag = engine->next_tag();
                      if (engine->rank() == root) {
                        std::vector<Send> sends;
                        for (int r = 0; r < engine->size(); ++r) {
                          if (r != root) sends.push_back(Send{r, tag, buffer.data_ptr(), bytes});
                        }
                        engine->mesh().exchange(sends, {}, deadline);
                      } else {
                        const Recv r{root, tag, buffer.data_ptr(), bytes};
                        engine->mesh().exchange({}, {&r, 1}, deadline);
                        if (!buffer.is_same(tensor)) at::Tensor(tensor).copy_(buffer);
                      }
                    }));
  }

  // The agreement is a ring all-gather, which no rank can leave before every rank has entered it.
  void barrier() override {
    wait_for(*start(CallName(Collective::Barrier, at::Tensor(), 0), 0, "", true, [](Clock::time_point) {}));
  }

  void send(const at::Tensor& tensor, int dst, int tag) override {
    CallName call("send", fmt::format("send of {} to rank {} (tag {})", tensor_text(tensor), dst, tag));
    std::string problem = check_input("send", tensor);
    if (problem.empty())
      problem = detail::check_peer("send to", dst, tag, rank(), size(), kMaxTag, "INT_MAX");
    Engine* engine = engine_.get();
    wait_for(*start(std::move(call), bytes_of(tensor), problem, false,
                    [engine, tensor, dst, tag](Clock::time_point deadline) {
                      const at::Tensor buffer = tensor.contiguous();
                      const Send s{dst, tag, buffer.data_ptr(), static_cast<size_t>(bytes_of(buffer))};
                      engine->mesh().exchange({&s, 1}, {}, deadline);
                    }));
  }

  void recv(at::Tensor& tensor, int src, int tag) override {
    CallName call("recv", fmt::format("recv of {} from rank {} (tag {})", tensor_text(tensor), src, tag));
    std::string problem = check_input("recv", tensor);
    if (problem.empty())
      problem = detail::check_peer("recv from", src, tag, rank(), size(), kMaxTag, "INT_MAX");
    Engine* engine = engine_.get();
    const std::string text = call.text();
    wait_for(*start(std::move(call), bytes_of(tensor), problem, false,
                    [engine, tensor, src, tag, text](Clock::time_point deadline) {
                      at::Tensor buffer =
                          tensor.is_contiguous() ? tensor : at::empty(tensor.sizes(), tensor.options());
                      const Recv r{src, tag, buffer.data_ptr(), static_cast<size_t>(bytes_of(buffer))};
                      try {
                        engine->mesh().exchange({}, {&r, 1}, deadline);
                      } catch (const MessageSizeMismatch& e) {
                        throw CallRejected(fmt::format(
                            "[rank {}] {}: {}, but {} needs {}. HINT: the sender must send a tensor of the "
                            "receiver's shape and "
                            "dtype",
                            engine->rank(), text, e.what(), tensor_text(tensor), bytes_of(tensor)));
                      }
                      if (!buffer.is_same(tensor)) at::Tensor(tensor).copy_(buffer);
                    }));
  }

  std::shared_ptr<Communicator> split(int color, int key) override;

 private:
  // Queues `run` as the call `call`: with the agreement first when `agree_first` (then `problem` fails every
  // rank together), else after throwing `problem` on this rank alone.
  std::shared_ptr<OpState> start(CallName call, int64_t bytes, const std::string& problem, bool agree_first,
                                 std::function<void(Clock::time_point)> run) {
    if (!agree_first && !problem.empty())
      throw std::runtime_error(fmt::format("[rank {}] {}", rank(), problem));
    if (!agree_first) return engine_->submit(std::move(call), bytes, timeout(), std::move(run));
    Engine* engine = engine_.get();
    CallName agreed = call;
    return engine_->submit(std::move(call), bytes, timeout(),
                           [engine, agreed, problem, run = std::move(run)](Clock::time_point deadline) {
                             engine->agree(agreed, problem, deadline);
                             run(deadline);
                           });
  }

  std::shared_ptr<OpState> start_allreduce(at::Tensor& tensor, ReduceOp op, bool agree_first) {
    std::string problem = check_input("allreduce", tensor);
    if (problem.empty()) problem = check_average("allreduce", tensor, op);
    CallName call(Collective::Allreduce, tensor, static_cast<int64_t>(op));
    Engine* engine = engine_.get();
    return start(std::move(call), bytes_of(tensor), problem, agree_first,
                 [engine, tensor, op](Clock::time_point deadline) {
                   const bool widen = is_half(tensor.scalar_type());
                   at::Tensor buffer = widen ? tensor.to(tensor.options().dtype(at::kFloat), false, false,
                                                         at::MemoryFormat::Contiguous)
                                             : tensor.contiguous();
                   at::Tensor flat = buffer.view({-1});
                   const std::vector<int64_t> bounds = engine->even_bounds(flat.numel());
                   engine->ring_reduce_scatter(flat, bounds, op, 1, deadline);
                   engine->ring_share_chunks(flat, bounds, 1, deadline);
                   if (op == ReduceOp::Avg) buffer.div_(engine->size());
                   if (!buffer.is_same(tensor)) at::Tensor(tensor).copy_(buffer);
                 });
  }

  // `input` [n, ...] -> `output` [size * n, ...] (contiguous); moves bits only.
  std::shared_ptr<OpState> start_allgather(const at::Tensor& input, at::Tensor output,
                                           const std::string& problem, bool agree_first) {
    CallName call(Collective::Allgather, input, 0);
    Engine* engine = engine_.get();
    return start(std::move(call), bytes_of(input), problem, agree_first,
                 [engine, input, output](Clock::time_point deadline) {
                   const at::Tensor mine = input.contiguous();
                   engine->ring_allgather(mine.data_ptr(), output.data_ptr(),
                                          static_cast<size_t>(bytes_of(mine)), deadline);
                 });
  }

  // `input` [size * n, ...] -> `output` [n, ...], through float32 for half types.
  std::shared_ptr<OpState> start_reduce_scatter(const at::Tensor& input, at::Tensor output, ReduceOp op,
                                                const std::string& problem, bool agree_first) {
    CallName call(Collective::ReduceScatter, input, static_cast<int64_t>(op));
    Engine* engine = engine_.get();
    return start(std::move(call), bytes_of(input), problem, agree_first,
                 [engine, input, output, op](Clock::time_point deadline) {
                   const at::ScalarType accumulate =
                       is_half(input.scalar_type()) ? at::kFloat : input.scalar_type();
                   at::Tensor flat =
                       input.to(input.options().dtype(accumulate), false, true, at::MemoryFormat::Contiguous)
                           .view({-1});  // a copy: the ring reduces in place
                   const std::vector<int64_t> bounds = engine->even_bounds(flat.numel());
                   engine->ring_reduce_scatter(flat, bounds, op, 0, deadline);
                   const int r = engine->rank();
                   at::Tensor mine = flat.narrow(0, bounds[r], bounds[r + 1] - bounds[r]);
                   if (op == ReduceOp::Avg) mine.div_(engine->size());
                   at::Tensor(output).view({-1}).copy_(mine);
                 });
  }

  static std::string check_input(const char* collective, const at::Tensor& tensor) {
    if (!tensor.defined()) return fmt::format("{} got an undefined tensor", collective);
    if (!tensor.device().is_cpu()) {
      return fmt::format(
          "{} got a tensor on {}, but the TCP backend moves CPU tensors only. HINT: use the NCCL "
          "communicator "
          "for CUDA tensors, or move the tensor with .cpu()",
          collective, tensor.device().str());
    }
    switch (tensor.scalar_type()) {
      case at::kFloat:
      case at::kDouble:
      case at::kBFloat16:
      case at::kHalf:
      case at::kLong:
      case at::kInt:
      case at::kByte:
        return "";
      default:
        return fmt::format(
            "{} got a {} tensor, which the TCP backend does not support. HINT: use float32, float64, "
            "bfloat16, "
            "float16, int32, int64 or uint8",
            collective, c10::getDtypeNames(tensor.scalar_type()).first);
    }
  }

  static std::string check_gather_input(const at::Tensor& input) {
    std::string problem = check_input("allgather", input);
    if (problem.empty() && input.dim() == 0) {
      problem = "allgather gathers along dim 0 but got a 0-dim tensor. HINT: unsqueeze(0) it first";
    }
    return problem;
  }

  std::string check_scatter_input(const at::Tensor& input, ReduceOp op) const {
    std::string problem = check_input("reduce_scatter", input);
    if (problem.empty()) problem = check_average("reduce_scatter", input, op);
    if (problem.empty() && input.dim() == 0) {
      problem = "reduce_scatter splits dim 0 but got a 0-dim tensor. HINT: unsqueeze(0) it first";
    }
    if (problem.empty() && input.size(0) % size() != 0) {
      problem = fmt::format(
          "reduce_scatter splits dim 0 of {} among {} ranks, but {} is not divisible by {}. HINT: pad dim 0 "
          "to a multiple of the communicator size",
          tensor_text(input), size(), input.size(0), size());
    }
    return problem;
  }

  std::string check_gather_into(const at::Tensor& input, const at::Tensor& output) const {
    std::string problem = check_gather_input(input);
    if (problem.empty()) {
      at::DimVector sizes(input.sizes());
      sizes[0] *= size();
      problem = check_output("allgather", input, output, sizes);
    }
    return problem;
  }

  std::string check_scatter_into(const at::Tensor& input, const at::Tensor& output, ReduceOp op) const {
    std::string problem = check_scatter_input(input, op);
    if (problem.empty()) problem = check_output("reduce_scatter", input, output, scattered_sizes(input));
    return problem;
  }

  at::DimVector scattered_sizes(const at::Tensor& input) const {
    at::DimVector sizes(input.sizes());
    sizes[0] /= size();
    return sizes;
  }

  std::unique_ptr<Engine> engine_;  // ops hold a raw pointer: it drains its queue before it goes
};

// Agrees on the call, all-gathers every rank's color, key and the port of a fresh listener, and forms the
// new group's mesh from the addresses this mesh already knows.
std::shared_ptr<Communicator> TcpCommunicator::split(int color, int key) {
  std::string problem;
  if (color < 0) {
    problem = fmt::format(
        "split got color {}, but colors must be >= 0. HINT: give every rank a group number 0, 1, ...; a rank "
        "that belongs to no group still needs a color of its own",
        color);
  }
  std::shared_ptr<Communicator> child;
  Engine* engine = engine_.get();
  const std::chrono::milliseconds timeout_now = timeout();
  wait_for(*start(CallName(Collective::Split, at::Tensor(), 0), 0, problem, true,
                  [engine, color, key, &child, timeout_now](Clock::time_point deadline) {
                    MeshSeed seed = open_listener();
                    const std::array<int64_t, 3> mine{color, key, seed.port};
                    std::vector<int64_t> all(3 * static_cast<size_t>(engine->size()));
                    engine->ring_allgather(mine.data(), all.data(), sizeof(mine), deadline);
                    std::vector<int> members;
                    for (int r = 0; r < engine->size(); ++r) {
                      if (all[3 * r] == color) members.push_back(r);
                    }
                    std::stable_sort(members.begin(), members.end(),
                                     [&](int a, int b) { return all[3 * a + 1] < all[3 * b + 1]; });
                    std::vector<Listener> known;  // the new group's ranks up to this one
                    for (int member : members) {
                      Listener where = engine->mesh().listener(member);
                      where.port = static_cast<uint16_t>(all[3 * member + 2]);
                      known.push_back(where);
                      if (member == engine->rank()) break;
                    }
                    const uint64_t id = fnv1a(fmt::format("split {} color {}", engine->next_split(), color),
                                              engine->mesh().id());
                    auto mesh =
                        std::make_unique<Mesh>(std::move(seed), static_cast<int>(members.size()),
                                               std::move(known), id, engine->mesh().token(), deadline);
                    child = std::make_shared<TcpCommunicator>(std::move(mesh));
                    child->set_timeout(timeout_now);
                  }));
  return child;
}

}  // namespace

std::shared_ptr<Communicator> make_tcp_communicator(StoreClient& store, const std::string& key, int rank,
                                                    int size, const std::string& token,
                                                    std::chrono::milliseconds timeout) {
  if (size < 1 || rank < 0 || rank >= size) {
    throw std::invalid_argument(fmt::format("make_tcp_communicator: rank {} of {} ranks", rank, size));
  }
  const Clock::time_point deadline = Clock::now() + timeout;
  MeshSeed seed = open_listener();
  const std::string& endpoint = store.endpoint();  // "host:port"
  const size_t colon = endpoint.rfind(':');
  const std::string store_host = endpoint.substr(0, colon);
  const auto store_port = static_cast<uint16_t>(std::stoi(endpoint.substr(colon + 1)));
  const Listener me{this_host_name(), address_towards(store_host, store_port), seed.port};
  const std::string mine = encode_listener(me);
  store.set(fmt::format("{}/{}", key, rank), {reinterpret_cast<const uint8_t*>(mine.data()), mine.size()});

  // Only the lower ranks' addresses: the higher ranks say where they listen when they connect.
  std::vector<Listener> known;
  for (int r = 0; r < rank; ++r) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    const std::vector<uint8_t> value =
        store.get(fmt::format("{}/{}", key, r), std::max(left, std::chrono::milliseconds(1)));
    const std::optional<Listener> where = decode_listener(std::string(value.begin(), value.end()));
    if (!where) {
      throw std::runtime_error(fmt::format(
          "[rank {}] make_tcp_communicator: rank {}'s address under '{}/{}' is malformed", rank, r, key, r));
    }
    known.push_back(*where);
  }
  known.push_back(me);
  auto mesh = std::make_unique<Mesh>(std::move(seed), size, std::move(known), fnv1a(key), token, deadline);
  auto communicator = std::make_shared<TcpCommunicator>(std::move(mesh));
  communicator->set_timeout(timeout);
  return communicator;
}

}  // namespace vimo::comm
