// Defines vimo::comm::ParallelDims (how many ways the job is data- and tensor-parallel) and ProcessGrid, the
// layout of the world's ranks on that DP × TP grid with one sub-communicator per axis.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "comm/communicator.h"

namespace vimo::comm {

// The degrees of parallelism. World = dp × tp today; pipeline parallelism will add `pp` as the outermost
// (slowest-varying) axis, world = pp × dp × tp, so that TP groups stay contiguous (inside a node) and the
// existing rank ↔ (dp_rank, tp_rank) mapping holds within each pipeline stage.
struct ParallelDims {
  int dp = 1;
  int tp = 1;

  int world_size() const { return dp * tp; }
  // "dp 4 × tp 2".
  std::string describe() const;

  // dp = world_size / tp. Throws std::invalid_argument when tp < 1 or does not divide world_size.
  static ParallelDims from_world(int world_size, int tp);
  // Throws std::invalid_argument unless dp >= 1, tp >= 1 and dp × tp == world_size, e.g.
  //   "world size 6 is not dp 4 × tp 2 = 8. HINT: ..."
  void check_fits(int world_size) const;
  // Note [TP groups stay on one node]: throws std::invalid_argument, naming both sizes, when
  // `ranks_per_node` (the launcher's local size, LaunchEnvironment::local_size) is known and tp does not
  // divide it. Unknown (nullopt): nothing to check.
  void check_tp_within_node(std::optional<int> ranks_per_node) const;
};

// Where one rank sits on the grid.
struct GridCoordinates {
  int dp_rank = 0;
  int tp_rank = 0;
  bool operator==(const GridCoordinates&) const = default;
};

// Note [Process grid layout]
// TP groups are contiguous ranks and DP groups strided: rank r has tp_rank = r % tp and dp_rank = r / tp.
// Tensor parallelism all-reduces activations in every layer, so its ranks must share a node's fast links
// (launchers number the ranks of a node contiguously); data parallelism communicates once per step in large
// buckets and tolerates the slower links between nodes. Each group's own ranks are the coordinate along its
// axis: tp_group()->rank() == tp_rank() and dp_group()->rank() == dp_rank().
//
// Note [TP groups stay on one node]
// With the ranks of a node numbered contiguously (the launchers' default placement: mpirun --map-by slot,
// srun's block distribution, torchrun), the contiguous TP groups stay inside nodes exactly when tp divides
// every node's rank count: each node then starts at a multiple of tp. ProcessGrid checks this with each
// rank's local size (ranks on its node) when the launcher reports it; a TP group across nodes would run
// every layer's all-reduce over the network, many times slower, without failing. (A placement that does not
// number a node's ranks contiguously, mpirun --map-by node, is not detected.)
class ProcessGrid {
 public:
  // A collective over `world` (every rank calls it with the same dims): first checks that all ranks asked for
  // the same grid, that it fits the world and, where `ranks_per_node` (this rank's
  // LaunchEnvironment::local_size) is known, that no TP group spans two nodes; then splits `world` into the
  // TP and DP groups. Throws std::runtime_error on every rank, naming the rank, when the dims disagree or do
  // not fit.
  ProcessGrid(std::shared_ptr<Communicator> world, ParallelDims dims,
              std::optional<int> ranks_per_node = std::nullopt);

  // Pure functions of the layout (no communication). Throw std::invalid_argument, naming the value, when a
  // rank or coordinate is outside the grid.
  static GridCoordinates coordinates(int rank, const ParallelDims& dims);
  static int rank_of(int dp_rank, int tp_rank, const ParallelDims& dims);

  const ParallelDims& dims() const { return dims_; }
  int dp_rank() const { return coordinates_.dp_rank; }
  int tp_rank() const { return coordinates_.tp_rank; }
  int dp_size() const { return dims_.dp; }
  int tp_size() const { return dims_.tp; }

  const std::shared_ptr<Communicator>& world() const { return world_; }
  // The ranks with this rank's tp_rank (dp_size of them, ordered by dp_rank).
  const std::shared_ptr<Communicator>& dp_group() const { return dp_group_; }
  // The ranks with this rank's dp_rank (tp_size of them, ordered by tp_rank).
  const std::shared_ptr<Communicator>& tp_group() const { return tp_group_; }

 private:
  std::shared_ptr<Communicator> world_;
  ParallelDims dims_;
  GridCoordinates coordinates_;
  std::shared_ptr<Communicator> dp_group_;
  std::shared_ptr<Communicator> tp_group_;
};

}  // namespace vimo::comm
