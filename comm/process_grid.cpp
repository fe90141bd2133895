// Implements ParallelDims' checks and ProcessGrid: the rank layout of Note [Process grid layout] and the
// split of the world into TP and DP groups.
#include "comm/process_grid.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "comm/launcher_env.h"

namespace vimo::comm {

std::string ParallelDims::describe() const { return fmt::format("dp {} × tp {}", dp, tp); }

ParallelDims ParallelDims::from_world(int world_size, int tp) {
  if (tp < 1 || world_size < 1 || world_size % tp != 0) {
    throw std::invalid_argument(
        fmt::format("world size {} cannot be split into TP groups of {}. HINT: tp must be >= 1 and divide "
                    "the number of ranks",
                    world_size, tp));
  }
  return ParallelDims{.dp = world_size / tp, .tp = tp};
}

void ParallelDims::check_fits(int world_size) const {
  if (dp < 1 || tp < 1) {
    throw std::invalid_argument(fmt::format(
        "{} has an axis below 1. HINT: every degree of parallelism is at least 1 (1 = unused)", describe()));
  }
  const int64_t product = static_cast<int64_t>(dp) * tp;
  if (product != world_size) {
    throw std::invalid_argument(
        fmt::format("world size {} is not {} = {}. HINT: launch {} ranks (mpirun -np {}), or choose dp and "
                    "tp whose product is {}",
                    world_size, describe(), product, product, product, world_size));
  }
}

// See Note [TP groups stay on one node].
void ParallelDims::check_tp_within_node(std::optional<int> ranks_per_node) const {
  if (!ranks_per_node) return;
  const int local = *ranks_per_node;
  if (local < 1) {
    throw std::invalid_argument(fmt::format(
        "the launcher reports {} ranks per node (local size); expected at least 1. HINT: check the "
        "launcher's local size variable ({}, {}, {})",
        local, launcher_env::kOpenMpiLocalSize, launcher_env::kTorchLocalWorldSize,
        launcher_env::kSlurmNtasksPerNode));
  }
  if (tp >= 1 && local % tp == 0) return;
  std::vector<int> divisors;
  for (int d = 1; d <= local; ++d) {
    if (local % d == 0) divisors.push_back(d);
  }
  const std::string problem =
      tp > local ? fmt::format("TP size {} is larger than the local size {} (ranks per node)", tp, local)
                 : fmt::format("TP size {} does not divide the local size {} (ranks per node)", tp, local);
  throw std::invalid_argument(fmt::format(
      "{}, so a TP group would span two nodes and all-reduce every layer's activations over the network. "
      "HINT: choose a TP size that divides {} ({}), or launch a multiple of {} ranks on every node",
      problem, local, fmt::join(divisors, ", "), tp));
}

GridCoordinates ProcessGrid::coordinates(int rank, const ParallelDims& dims) {
  dims.check_fits(dims.world_size());
  if (rank < 0 || rank >= dims.world_size()) {
    throw std::invalid_argument(fmt::format("rank {} is outside the grid {} (ranks 0..{})", rank,
                                            dims.describe(), dims.world_size() - 1));
  }
  return GridCoordinates{.dp_rank = rank / dims.tp, .tp_rank = rank % dims.tp};
}

int ProcessGrid::rank_of(int dp_rank, int tp_rank, const ParallelDims& dims) {
  dims.check_fits(dims.world_size());
  if (dp_rank < 0 || dp_rank >= dims.dp || tp_rank < 0 || tp_rank >= dims.tp) {
    throw std::invalid_argument(
        fmt::format("(dp_rank {}, tp_rank {}) is outside the grid {}", dp_rank, tp_rank, dims.describe()));
  }
  return dp_rank * dims.tp + tp_rank;
}

namespace {

// Every rank's dims and local size (-1: unknown), gathered over `world`: [world size, 3] of (dp, tp, local
// size). So that the checks below fail on every rank before any split, instead of leaving some ranks in a
// split that others never enter.
at::Tensor gather_requests(Communicator& world, const ParallelDims& dims, std::optional<int> ranks_per_node) {
  const at::Tensor mine = at::tensor({static_cast<int64_t>(dims.dp), static_cast<int64_t>(dims.tp),
                                      static_cast<int64_t>(ranks_per_node.value_or(-1))},
                                     at::kLong)
                              .unsqueeze(0);  // [1, 3]
  return world.allgather(mine);               // [world size, 3]
}

// A rank passing other dims (another config) fails on every rank, instead of silently building groups that
// disagree. `all`: gather_requests'.
void agree_on_dims(Communicator& world, const ParallelDims& dims, const at::Tensor& all) {
  const at::Tensor asked_dims = all.narrow(1, 0, 2);  // [world size, 2]
  if (at::equal(asked_dims, asked_dims[world.rank()].expand_as(asked_dims))) return;
  std::vector<std::string> asked;
  for (int r = 0; r < world.size(); ++r) {
    const ParallelDims theirs{.dp = static_cast<int>(all[r][0].item<int64_t>()),
                              .tp = static_cast<int>(all[r][1].item<int64_t>())};
    asked.push_back(fmt::format("rank {}: {}", r, theirs.describe()));
  }
  throw std::runtime_error(
      fmt::format("[rank {}] the ranks asked for different process grids: {}. HINT: every rank must build "
                  "its ProcessGrid from the same ParallelDims (the same config)",
                  world.rank(), fmt::join(asked, "; ")));
}

// Note [TP groups stay on one node], for every rank's local size (nodes may hold different numbers of ranks),
// so that every rank throws together, naming the first rank whose node does not fit.
void check_every_node(Communicator& world, const ParallelDims& dims, const at::Tensor& all) {
  for (int r = 0; r < world.size(); ++r) {
    const auto local = all[r][2].item<int64_t>();
    try {
      dims.check_tp_within_node(local == -1 ? std::nullopt : std::optional<int>(static_cast<int>(local)));
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(
          fmt::format("[rank {}] {} on the node of rank {}: {}", world.rank(), dims.describe(), r, e.what()));
    }
  }
}

}  // namespace

ProcessGrid::ProcessGrid(std::shared_ptr<Communicator> world, ParallelDims dims,
                         std::optional<int> ranks_per_node)
    : world_(std::move(world)), dims_(dims) {
  if (!world_) throw std::invalid_argument("ProcessGrid needs a world communicator, got a null pointer");
  const at::Tensor requests = gather_requests(*world_, dims_, ranks_per_node);
  agree_on_dims(*world_, dims_, requests);
  try {
    dims_.check_fits(world_->size());
  } catch (const std::invalid_argument& e) {
    // Every rank agreed on the dims above, so every rank throws here together.
    throw std::runtime_error(fmt::format("[rank {}] {}", world_->rank(), e.what()));
  }
  check_every_node(*world_, dims_, requests);
  coordinates_ = coordinates(world_->rank(), dims_);
  // See Note [Process grid layout]: the key makes each group's rank its coordinate along the axis. Every
  // rank splits in the same order (TP, then DP), as collectives require.
  tp_group_ = world_->split(/*color=*/coordinates_.dp_rank, /*key=*/coordinates_.tp_rank);
  dp_group_ = world_->split(/*color=*/coordinates_.tp_rank, /*key=*/coordinates_.dp_rank);
}

}  // namespace vimo::comm
