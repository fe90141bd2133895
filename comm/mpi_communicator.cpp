// Defines the MPI backend of vimo::comm::Communicator (CPU tensors, over a duplicate of MPI_COMM_WORLD or a
// split of one): MpiCommunicator, its input checks and its collectives, each admitted by the agreement of
// comm/mpi_agreement.cpp and run as MPI's blocking call (run_blocking) or as an MpiWork (comm/mpi_work.cpp).
#include <ATen/core/grad_mode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_internal.h"

namespace vimo::comm {
namespace {

using namespace mpi_detail;  // NOLINT(google-build-using-namespace): the backend's own internals

using detail::check_average;

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() : group_(std::make_shared<MpiGroup>()) {
    int initialized = 0;
    VIMO_MPI_CHECK(MPI_Initialized(&initialized));
    if (!initialized) {
      throw std::runtime_error(
          "make_mpi_communicator: MPI is not initialized. HINT: create vimo::comm::MpiRuntime first thing in "
          "main()");
    }
    // A private duplicate: our collectives never match messages of other code using MPI_COMM_WORLD.
    VIMO_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &group_->comm));
    adopt();
    group_->spin_for = oversubscribed() ? kOversubscribedSpinFor
                                        : std::chrono::duration_cast<std::chrono::microseconds>(kYieldFor);
  }

  // Takes ownership of `owned` (a communicator made by split), freed with the group; waits spin as the
  // parent's do.
  MpiCommunicator(MPI_Comm owned, std::chrono::microseconds spin_for) : group_(std::make_shared<MpiGroup>()) {
    group_->comm = owned;
    adopt();
    group_->spin_for = spin_for;
  }

  int rank() const override { return group_->rank; }
  int size() const override { return group_->size; }
  std::string backend_name() const override { return "mpi"; }

  void allreduce(at::Tensor& tensor, ReduceOp op) override { start_allreduce(tensor, op, Call::Blocking); }

  std::shared_ptr<Work> allreduce_async(at::Tensor& tensor, ReduceOp op) override {
    return start_allreduce(tensor, op, detail::check_async_calls() ? Call::AgreedAsync : Call::Async);
  }

  at::Tensor allgather(const at::Tensor& tensor) override {
    const CallName call(Collective::Allgather, tensor, 0);
    admit(call, bytes_of(tensor), check_gather_input(tensor), true);
    at::DimVector sizes(tensor.sizes());
    sizes[0] *= size();
    at::Tensor output = at::empty(sizes, tensor.options().requires_grad(false));  // [size * n, ...]
    start_allgather(call, tensor, output, Call::Blocking);
    return output;
  }

  std::shared_ptr<Work> allgather_async(const at::Tensor& input, at::Tensor& output) override {
    const CallName call(Collective::Allgather, input, 0);
    admit(call, bytes_of(input), check_gather_into(input, output), detail::check_async_calls());
    return start_allgather(call, input, output, Call::Async);
  }

  void allgather_into(const at::Tensor& input, at::Tensor& output) override {
    const CallName call(Collective::Allgather, input, 0);
    admit(call, bytes_of(input), check_gather_into(input, output), true);
    start_allgather(call, input, output, Call::Blocking);
  }

  at::Tensor reduce_scatter(const at::Tensor& input, ReduceOp op) override {
    const CallName call(Collective::ReduceScatter, input, static_cast<int64_t>(op));
    admit(call, bytes_of(input), check_scatter_input(input, op), true);
    at::Tensor output = at::empty(scattered_sizes(input), input.options().requires_grad(false));  // [n, ...]
    start_reduce_scatter(call, input, output, op, Call::Blocking);
    return output;
  }

  std::shared_ptr<Work> reduce_scatter_async(const at::Tensor& input, at::Tensor& output,
                                             ReduceOp op) override {
    const CallName call(Collective::ReduceScatter, input, static_cast<int64_t>(op));
    admit(call, bytes_of(input), check_scatter_into(input, output, op), detail::check_async_calls());
    return start_reduce_scatter(call, input, output, op, Call::Async);
  }

  void reduce_scatter_into(const at::Tensor& input, at::Tensor& output, ReduceOp op) override {
    const CallName call(Collective::ReduceScatter, input, static_cast<int64_t>(op));
    admit(call, bytes_of(input), check_scatter_into(input, output, op), true);
    start_reduce_scatter(call, input, output, op, Call::Blocking);
  }

  void broadcast(at::Tensor& tensor, int root) override { start_broadcast(tensor, root, Call::Blocking); }

  std::shared_ptr<Work> broadcast_async(at::Tensor& tensor, int root) override {
    return start_broadcast(tensor, root, detail::check_async_calls() ? Call::AgreedAsync : Call::Async);
  }

  // The agreement (an all-gather, or an all-reduce beyond 64 ranks) has a result that depends on every
  // rank's input: no rank can leave it before all have entered, so it is itself the barrier (and it also
  // catches a rank calling something else).
  void barrier() override { admit(CallName(Collective::Barrier, at::Tensor(), 0), 0, "", true); }

  std::shared_ptr<Work> barrier_async() override {
    const CallName call(Collective::Barrier, at::Tensor(), 0);
    admit(call, 0, "", detail::check_async_calls());
    auto work = new_work(call, 0);
    VIMO_MPI_CHECK(MPI_Ibarrier(group_->comm, work->request()));
    return work;
  }

  void send(const at::Tensor& tensor, int dst, int tag) override { start_send(tensor, dst, tag)->wait(); }

  std::shared_ptr<Work> send_async(const at::Tensor& tensor, int dst, int tag) override {
    return start_send(tensor, dst, tag);
  }

  // Posted at once, so that receives of one (src, tag) match in the order started. Unlike recv, it cannot
  // probe the message's size first: the work's status is checked instead (MpiWork::expect_message).
  std::shared_ptr<Work> recv_async(at::Tensor& tensor, int src, int tag) override {
    CallName call = p2p_call("recv", tensor, src, tag);
    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.is_contiguous() ? tensor : at::empty(tensor.sizes(), tensor.options());
    const MPI_Datatype type = wire_type(tensor.scalar_type());
    auto work = new_work(std::move(call), bytes_of(tensor));
    work->keep({buffer, tensor});
    work->write_back_on_completion(buffer, tensor, false);
    work->expect_message(tensor);
    VIMO_MPI_CHECK(MPI_Irecv(buffer.data_ptr(), static_cast<int>(buffer.numel()), type, src, tag,
                             group_->comm, work->request()));
    return work;
  }

  void recv(at::Tensor& tensor, int src, int tag) override {
    const CallName call = p2p_call("recv", tensor, src, tag);

    // Probe first, to compare the message's size with ours before receiving it: MPI would otherwise report a
    // longer message as a bare truncation and accept a shorter one silently.
    MPI_Status probed{};
    const bool arrived = poll_until_done(
        [&] {
          int flag = 0;
          VIMO_MPI_CHECK(MPI_Iprobe(src, tag, group_->comm, &flag, &probed));
          return flag != 0;
        },
        timeout(), group_->spin_for);
    if (!arrived) {
      // Nothing was posted, so nothing is abandoned: the communicator stays usable.
      throw std::runtime_error(
          detail::describe_timeout(rank(), call.text(), bytes_of(tensor), timeout(), size(),
                                   "No message arrived, so the communicator stays usable"));
    }
    const MPI_Datatype type = wire_type(tensor.scalar_type());
    int count = 0;
    VIMO_MPI_CHECK(MPI_Get_count(&probed, type, &count));
    if (count != tensor.numel()) {
      int bytes = 0;
      VIMO_MPI_CHECK(MPI_Get_count(&probed, MPI_BYTE, &bytes));
      // Receive it anyway, so that the sender is released and the next message of this tag is the next one.
      at::Tensor discard = at::empty({bytes}, at::kByte);
      receive_into(discard, MPI_BYTE, src, tag, call);
      throw std::runtime_error(
          fmt::format("[rank {}] {}: the message held {} bytes, but {} needs {}. HINT: the sender must send "
                      "a tensor of the "
                      "receiver's shape and dtype",
                      rank(), call.text(), bytes, tensor_text(tensor), bytes_of(tensor)));
    }
    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.is_contiguous() ? tensor : at::empty(tensor.sizes(), tensor.options());
    receive_into(buffer, type, src, tag, call);
    write_back(buffer, tensor, false, size());
  }

  std::shared_ptr<Communicator> split(int color, int key) override {
    std::string problem;
    if (color < 0) {
      problem = fmt::format(
          "split got color {}, but colors must be >= 0. HINT: give every rank a group number "
          "0, 1, ...; a rank that belongs to no group still needs a color of its own",
          color);
    }
    // Colors and keys differ between ranks by design, so only the call itself is agreed on. After the
    // agreement every rank is inside the split, so the blocking MPI call cannot wait for a missing rank.
    admit(CallName(Collective::Split, at::Tensor(), 0), 0, problem, true);
    MPI_Comm group = MPI_COMM_NULL;
    VIMO_MPI_CHECK(MPI_Comm_split(group_->comm, color, key, &group));
    auto child = std::make_shared<MpiCommunicator>(group, group_->spin_for);
    child->set_timeout(timeout());
    return child;
  }

 private:
  // The set-up shared by every way of making one: errors come back as codes (see VIMO_MPI_CHECK).
  void adopt() {
    VIMO_MPI_CHECK(MPI_Comm_set_errhandler(group_->comm, MPI_ERRORS_RETURN));
    VIMO_MPI_CHECK(MPI_Comm_rank(group_->comm, &group_->rank));
    VIMO_MPI_CHECK(MPI_Comm_size(group_->comm, &group_->size));
    int* max_tag = nullptr;
    int found = 0;
    VIMO_MPI_CHECK(MPI_Comm_get_attr(group_->comm, MPI_TAG_UB, &max_tag, &found));
    if (found && max_tag != nullptr) group_->max_tag = *max_tag;
  }

  // Whether this node runs more of the communicator's ranks than it has cores (a collective). See Note
  // [Spinning, yielding and sleeping while waiting].
  bool oversubscribed() {
    MPI_Comm node = MPI_COMM_NULL;
    VIMO_MPI_CHECK(
        MPI_Comm_split_type(group_->comm, MPI_COMM_TYPE_SHARED, group_->rank, MPI_INFO_NULL, &node));
    int ranks_here = 1;
    VIMO_MPI_CHECK(MPI_Comm_size(node, &ranks_here));
    VIMO_MPI_CHECK(MPI_Comm_free(&node));
    const unsigned cores = std::thread::hardware_concurrency();
    return cores == 0 || static_cast<unsigned>(ranks_here) > cores;
  }

  std::shared_ptr<MpiWork> new_work(CallName call, int64_t bytes) {
    return std::make_shared<MpiWork>(group_, std::move(call), bytes, timeout());
  }

  // The gate every collective passes before its payload moves: refuses calls on a broken communicator, then
  // either agrees on the call with every rank (Note [Agreeing on a collective before running it]) or, for
  // asynchronous calls, only throws this rank's own `problem` (Note [Agreement on asynchronous calls]).
  // `bytes` is the payload's size, for a timeout's message.
  void admit(const CallName& call, int64_t bytes, const std::string& problem, bool agree_first) {
    group_->throw_if_broken(call);
    if (agree_first) {
      agree(group_, timeout(), call, bytes, problem);
    } else if (!problem.empty()) {
      throw std::runtime_error(fmt::format("[rank {}] {}", rank(), problem));
    }
  }

  // Names a point-to-point call and checks it on this rank (there is no agreement to fail every rank).
  CallName p2p_call(const char* kind, const at::Tensor& tensor, int peer, int tag) const {
    const bool sending = std::string_view(kind) == "send";
    CallName call(kind, fmt::format("{} of {} {} rank {} (tag {})", kind, tensor_text(tensor),
                                    sending ? "to" : "from", peer, tag));
    group_->throw_if_broken(call);
    std::string problem = check_input(kind, tensor);
    if (problem.empty()) problem = check_peer(sending ? "send to" : "recv from", peer, tag);
    if (!problem.empty()) throw std::runtime_error(fmt::format("[rank {}] {}", rank(), problem));
    return call;
  }

  std::shared_ptr<MpiWork> start_send(const at::Tensor& tensor, int dst, int tag) {
    CallName call = p2p_call("send", tensor, dst, tag);
    const at::Tensor buffer = tensor.contiguous();
    auto work = new_work(std::move(call), bytes_of(tensor));
    work->keep({buffer});
    VIMO_MPI_CHECK(MPI_Isend(buffer.data_ptr(), static_cast<int>(buffer.numel()),
                             wire_type(buffer.scalar_type()), dst, tag, group_->comm, work->request()));
    return work;
  }

  // In place from `root`; a blocking call returns no Work.
  std::shared_ptr<MpiWork> start_broadcast(at::Tensor& tensor, int root, Call mode) {
    std::string problem = check_input("broadcast", tensor);
    if (problem.empty() && (root < 0 || root >= size())) {
      problem = fmt::format("broadcast from rank {}, but the ranks are 0..{}", root, size() - 1);
    }
    const CallName call(Collective::Broadcast, tensor, root);
    admit(call, bytes_of(tensor), problem, mode != Call::Async);

    at::NoGradGuard no_grad;
    at::Tensor buffer = tensor.contiguous();
    const auto count = static_cast<int>(buffer.numel());
    const MPI_Datatype type = wire_type(buffer.scalar_type());
    if (mode == Call::Blocking) {
      run_blocking(*group_, call, bytes_of(tensor),
                   [&] { return MPI_Bcast(buffer.data_ptr(), count, type, root, group_->comm); });
      write_back(buffer, tensor, false, size());
      return nullptr;
    }
    auto work = new_work(call, bytes_of(tensor));
    work->keep({buffer, tensor});
    work->write_back_on_completion(buffer, tensor, false);
    VIMO_MPI_CHECK(MPI_Ibcast(buffer.data_ptr(), count, type, root, group_->comm, work->request()));
    return work;
  }

  // Reduces `tensor` in place, through a float32 copy for half types (Note [Half types over MPI]) or a
  // contiguous copy for strided tensors, written back at the end. A blocking call returns no Work: Note [The
  // fixed cost of a blocking call].
  std::shared_ptr<MpiWork> start_allreduce(at::Tensor& tensor, ReduceOp op, Call mode) {
    std::string problem = check_input("allreduce", tensor);
    if (problem.empty()) problem = check_average("allreduce", tensor, op);
    const CallName call(Collective::Allreduce, tensor, static_cast<int64_t>(op));
    const int64_t bytes = bytes_of(tensor);
    admit(call, bytes, problem, mode != Call::Async);

    at::NoGradGuard no_grad;
    const bool widen = is_half(tensor.scalar_type());
    at::Tensor buffer =
        widen ? tensor.to(tensor.options().dtype(at::kFloat), false, false, at::MemoryFormat::Contiguous)
              : tensor.contiguous();
    const auto count = static_cast<int>(buffer.numel());
    const MPI_Datatype type = widen ? MPI_FLOAT : wire_type(buffer.scalar_type());
    const bool average = op == ReduceOp::Avg;
    if (mode == Call::Blocking) {
      run_blocking(*group_, call, bytes, [&] {
        return MPI_Allreduce(MPI_IN_PLACE, buffer.data_ptr(), count, type, reduction(op), group_->comm);
      });
      write_back(buffer, tensor, average, size());
      return nullptr;
    }
    auto work = new_work(call, bytes);
    work->keep({buffer, tensor});
    work->write_back_on_completion(buffer, tensor, average);
    VIMO_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, buffer.data_ptr(), count, type, reduction(op), group_->comm,
                                  work->request()));
    return work;
  }

  // `input` [n, ...] -> `output` [size * n, ...] (checked and admitted as `call`). Moves bits only, so half
  // types travel as 16-bit words. A blocking call returns no Work.
  std::shared_ptr<MpiWork> start_allgather(const CallName& call, const at::Tensor& input, at::Tensor& output,
                                           Call mode) {
    const at::Tensor send = input.contiguous();  // [n, ...]
    const int count = static_cast<int>(send.numel());
    const MPI_Datatype type = wire_type(send.scalar_type());
    if (mode == Call::Blocking) {
      run_blocking(*group_, call, bytes_of(input), [&] {
        return MPI_Allgather(send.data_ptr(), count, type, output.data_ptr(), count, type, group_->comm);
      });
      return nullptr;
    }
    auto work = new_work(call, bytes_of(input));
    work->keep({send, output});
    VIMO_MPI_CHECK(MPI_Iallgather(send.data_ptr(), count, type, output.data_ptr(), count, type, group_->comm,
                                  work->request()));
    return work;
  }

  // `input` [size * n, ...] -> `output` [n, ...] (checked and admitted as `call`), through float32 for half
  // types. A blocking call returns no Work.
  std::shared_ptr<MpiWork> start_reduce_scatter(const CallName& call, const at::Tensor& input,
                                                at::Tensor& output, ReduceOp op, Call mode) {
    at::NoGradGuard no_grad;
    const bool widen = is_half(input.scalar_type());
    const at::Tensor send =
        widen ? input.to(input.options().dtype(at::kFloat), false, false, at::MemoryFormat::Contiguous)
              : input.contiguous();  // [size * n, ...]
    at::Tensor receive = widen ? at::empty(output.sizes(), output.options().dtype(at::kFloat)) : output;
    const auto count = static_cast<int>(send.numel() / size());
    const MPI_Datatype type = widen ? MPI_FLOAT : wire_type(send.scalar_type());
    const bool average = op == ReduceOp::Avg;
    if (mode == Call::Blocking) {
      run_blocking(*group_, call, bytes_of(input), [&] {
        return MPI_Reduce_scatter_block(send.data_ptr(), receive.data_ptr(), count, type, reduction(op),
                                        group_->comm);
      });
      write_back(receive, output, average, size());
      return nullptr;
    }
    auto work = new_work(call, bytes_of(input));
    work->keep({send, receive, output});
    work->write_back_on_completion(receive, output, average);
    VIMO_MPI_CHECK(MPI_Ireduce_scatter_block(send.data_ptr(), receive.data_ptr(), count, type, reduction(op),
                                             group_->comm, work->request()));
    return work;
  }

  // Receives the probed message into `buffer` (contiguous), waiting at most the timeout.
  void receive_into(at::Tensor& buffer, MPI_Datatype type, int src, int tag, const CallName& call) {
    auto work = new_work(call, bytes_of(buffer));
    VIMO_MPI_CHECK(MPI_Irecv(buffer.data_ptr(), static_cast<int>(buffer.numel()), type, src, tag,
                             group_->comm, work->request()));
    work->keep({buffer});
    work->wait();
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

  std::string check_peer(const char* direction, int peer, int tag) const {
    return detail::check_peer(direction, peer, tag, rank(), size(), group_->max_tag, "MPI_TAG_UB");
  }

  std::shared_ptr<MpiGroup> group_;
};

}  // namespace

std::shared_ptr<Communicator> make_mpi_communicator() { return std::make_shared<MpiCommunicator>(); }

}  // namespace vimo::comm
