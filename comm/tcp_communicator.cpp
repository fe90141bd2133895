// Defines the TCP backend of vimo::comm::Communicator (comm/tcp_communicator.h): TcpCommunicator, which
// checks each call and queues it on its Engine (comm/tcp_engine.h) as a ring collective, a broadcast or a
// point-to-point exchange; split; and make_tcp_communicator, which forms the mesh through the store.
#include "comm/tcp_communicator.h"

#include <fmt/format.h>

#include <climits>
#include <functional>
#include <stdexcept>
#include <vector>

#include "comm/collective_call.h"
#include "comm/tcp_engine.h"
#include "comm/tcp_internal.h"

namespace vimo::comm {
namespace {

using namespace tcp_detail;  // NOLINT(google-build-using-namespace): the backend's own internals
using detail::bytes_of;
using detail::CallName;
using detail::check_average;
using detail::Collective;
using detail::is_half;
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

uint64_t fnv1a(const std::string& text, uint64_t hash = 1469598103934665603ull) {
  for (unsigned char c : text) hash = (hash ^ c) * 1099511628211ull;
  return hash;
}

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

  void broadcast(at::Tensor& tensor, int root) override { wait_for(*start_broadcast(tensor, root, true)); }
  std::shared_ptr<Work> broadcast_async(at::Tensor& tensor, int root) override {
    return std::make_shared<TcpWork>(start_broadcast(tensor, root, detail::check_async_calls()), rank());
  }

  // The agreement is a ring all-gather, which no rank can leave before every rank has entered it. The
  // asynchronous barrier is one too, agreed or not: with nothing to agree on, a ring all-gather of no bytes
  // still passes a frame from every rank to the next, around the whole ring.
  void barrier() override { wait_for(*start_barrier(true)); }
  std::shared_ptr<Work> barrier_async() override {
    return std::make_shared<TcpWork>(start_barrier(detail::check_async_calls()), rank());
  }

  void send(const at::Tensor& tensor, int dst, int tag) override { wait_for(*start_send(tensor, dst, tag)); }
  std::shared_ptr<Work> send_async(const at::Tensor& tensor, int dst, int tag) override {
    return std::make_shared<TcpWork>(start_send(tensor, dst, tag), rank());
  }

  void recv(at::Tensor& tensor, int src, int tag) override { wait_for(*start_recv(tensor, src, tag)); }
  std::shared_ptr<Work> recv_async(at::Tensor& tensor, int src, int tag) override {
    return std::make_shared<TcpWork>(start_recv(tensor, src, tag), rank());
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

  std::shared_ptr<OpState> start_broadcast(const at::Tensor& tensor, int root, bool agree_first) {
    std::string problem = check_input("broadcast", tensor);
    if (problem.empty() && (root < 0 || root >= size())) {
      problem = fmt::format("broadcast from rank {}, but the ranks are 0..{}", root, size() - 1);
    }
    CallName call(Collective::Broadcast, tensor, root);
    Engine* engine = engine_.get();
    return start(std::move(call), bytes_of(tensor), problem, agree_first,
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
                 });
  }

  // Agreed: the agreement is the barrier. Not agreed: a ring all-gather of nothing, in which each rank's
  // frame must travel the whole ring.
  std::shared_ptr<OpState> start_barrier(bool agree_first) {
    Engine* engine = engine_.get();
    return start(CallName(Collective::Barrier, at::Tensor(), 0), 0, "", agree_first,
                 [engine, agree_first](Clock::time_point deadline) {
                   if (agree_first) return;
                   std::vector<uint8_t> all(static_cast<size_t>(engine->size()));
                   const uint8_t mine = 1;
                   engine->ring_allgather(&mine, all.data(), 1, deadline);
                 });
  }

  std::shared_ptr<OpState> start_send(const at::Tensor& tensor, int dst, int tag) {
    CallName call("send", fmt::format("send of {} to rank {} (tag {})", tensor_text(tensor), dst, tag));
    std::string problem = check_input("send", tensor);
    if (problem.empty())
      problem = detail::check_peer("send to", dst, tag, rank(), size(), kMaxTag, "INT_MAX");
    Engine* engine = engine_.get();
    return start(std::move(call), bytes_of(tensor), problem, false,
                 [engine, tensor, dst, tag](Clock::time_point deadline) {
                   const at::Tensor buffer = tensor.contiguous();
                   const Send s{dst, tag, buffer.data_ptr(), static_cast<size_t>(bytes_of(buffer))};
                   engine->mesh().exchange({&s, 1}, {}, deadline);
                 });
  }

  std::shared_ptr<OpState> start_recv(const at::Tensor& tensor, int src, int tag) {
    CallName call("recv", fmt::format("recv of {} from rank {} (tag {})", tensor_text(tensor), src, tag));
    std::string problem = check_input("recv", tensor);
    if (problem.empty())
      problem = detail::check_peer("recv from", src, tag, rank(), size(), kMaxTag, "INT_MAX");
    Engine* engine = engine_.get();
    const std::string text = call.text();
    return start(std::move(call), bytes_of(tensor), problem, false,
                 [engine, tensor, src, tag, text](Clock::time_point deadline) {
                   at::Tensor buffer =
                       tensor.is_contiguous() ? tensor : at::empty(tensor.sizes(), tensor.options());
                   const Recv r{src, tag, buffer.data_ptr(), static_cast<size_t>(bytes_of(buffer))};
                   try {
                     engine->mesh().exchange({}, {&r, 1}, deadline);
                   } catch (const MessageSizeMismatch& e) {
                     throw CallRejected(fmt::format(
                         "[rank {}] {}: {}, but {} needs {}. HINT: the sender must send a tensor of the "
                         "receiver's shape and dtype",
                         engine->rank(), text, e.what(), tensor_text(tensor), bytes_of(tensor)));
                   }
                   if (!buffer.is_same(tensor)) at::Tensor(tensor).copy_(buffer);
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

  std::string check_gather_input(const at::Tensor& input) const {
    return detail::check_gather_input(&check_input, input);
  }
  std::string check_scatter_input(const at::Tensor& input, ReduceOp op) const {
    return detail::check_scatter_input(&check_input, input, op, size());
  }
  std::string check_gather_into(const at::Tensor& input, const at::Tensor& output) const {
    return detail::check_gather_into(&check_input, input, output, size());
  }
  std::string check_scatter_into(const at::Tensor& input, const at::Tensor& output, ReduceOp op) const {
    return detail::check_scatter_into(&check_input, input, output, op, size());
  }
  at::DimVector scattered_sizes(const at::Tensor& input) const {
    return detail::scattered_sizes(input, size());
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
