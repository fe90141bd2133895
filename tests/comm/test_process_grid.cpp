// Communicator::split and ProcessGrid under mpirun (2 and 4 ranks): the pure layout functions on every shape
// up to 8 × 8, every grid shape that fits the world checked through real collectives over its groups, invalid
// or disagreeing shapes failing on every rank instead of hanging, TP groups that would span nodes (by the
// launcher's local size) refused on every rank, and split's color / key rules on a subset.
#include <gtest/gtest.h>

#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "comm/launcher_env.h"
#include "comm/process_grid.h"
#include "tests/comm/collective_reference.h"

namespace {
using vimo::comm::Communicator;
using vimo::comm::GridCoordinates;
using vimo::comm::ParallelDims;
using vimo::comm::ProcessGrid;
using vimo::comm::ReduceOp;
using vimo::testing::error_of;
using vimo::testing::expect_still_usable;
using vimo::testing::world;

// The world ranks of `group`'s members in group-rank order, by an all-gather of each member's world rank.
std::vector<int64_t> members_in_order(Communicator& group) {
  const at::Tensor mine = at::tensor({static_cast<int64_t>(world()->rank())}, at::kLong);  // [1]
  const at::Tensor all = group.allgather(mine);                                            // [group size]
  return std::vector<int64_t>(all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + all.numel());
}

// Sum of the world ranks of `group`'s members, by an all-reduce.
int64_t sum_of_members(Communicator& group) {
  at::Tensor rank = at::tensor({static_cast<int64_t>(world()->rank())}, at::kLong);  // [1]
  group.allreduce(rank, ReduceOp::Sum);
  return rank.item<int64_t>();
}

TEST(ProcessGridLayout, CoordinatesAndRankOfRoundTripOnEveryShapeUpTo8x8) {
  for (int dp = 1; dp <= 8; ++dp) {
    for (int tp = 1; tp <= 8; ++tp) {
      const ParallelDims dims{.dp = dp, .tp = tp};
      std::vector<int> hits(static_cast<size_t>(dp * tp), 0);
      for (int rank = 0; rank < dp * tp; ++rank) {
        const GridCoordinates c = ProcessGrid::coordinates(rank, dims);
        ASSERT_EQ(c.tp_rank, rank % tp) << dims.describe() << " rank " << rank;  // TP contiguous
        ASSERT_EQ(c.dp_rank, rank / tp) << dims.describe() << " rank " << rank;  // DP strided
        ASSERT_EQ(ProcessGrid::rank_of(c.dp_rank, c.tp_rank, dims), rank) << dims.describe();
      }
      for (int d = 0; d < dp; ++d) {
        for (int t = 0; t < tp; ++t) {
          const int rank = ProcessGrid::rank_of(d, t, dims);
          ASSERT_GE(rank, 0);
          ASSERT_LT(rank, dp * tp);
          ++hits[static_cast<size_t>(rank)];
          ASSERT_EQ(ProcessGrid::coordinates(rank, dims), (GridCoordinates{.dp_rank = d, .tp_rank = t}));
        }
      }
      for (int rank = 0; rank < dp * tp; ++rank)
        ASSERT_EQ(hits[static_cast<size_t>(rank)], 1) << dims.describe() << ": rank_of is not a bijection";
    }
  }
}

TEST(ProcessGridLayout, OutOfGridInputsAreRejected) {
  const ParallelDims dims{.dp = 2, .tp = 3};
  EXPECT_CONTAINS(error_of([&] { ProcessGrid::coordinates(6, dims); }),
                  "rank 6 is outside the grid dp 2 × tp 3 (ranks 0..5)");
  EXPECT_CONTAINS(error_of([&] { ProcessGrid::coordinates(-1, dims); }), "rank -1 is outside the grid");
  EXPECT_CONTAINS(error_of([&] { ProcessGrid::rank_of(2, 0, dims); }),
                  "(dp_rank 2, tp_rank 0) is outside the grid dp 2 × tp 3");
  EXPECT_CONTAINS(error_of([&] { ProcessGrid::rank_of(0, 3, dims); }), "(dp_rank 0, tp_rank 3) is outside");
  EXPECT_CONTAINS(error_of([&] { ProcessGrid::coordinates(0, ParallelDims{.dp = 0, .tp = 2}); }),
                  "dp 0 × tp 2 has an axis below 1");
}

TEST(ParallelDims, FromWorldInfersDpAndChecksFit) {
  EXPECT_EQ(ParallelDims::from_world(8, 2).dp, 4);
  EXPECT_EQ(ParallelDims::from_world(8, 2).tp, 2);
  EXPECT_EQ(ParallelDims::from_world(3, 1).dp, 3);
  EXPECT_CONTAINS(error_of([] { ParallelDims::from_world(6, 4); }),
                  "world size 6 cannot be split into TP groups of 4. HINT:");
  EXPECT_CONTAINS(error_of([] { ParallelDims::from_world(6, 0); }), "TP groups of 0");

  EXPECT_EQ(error_of([] { ParallelDims{.dp = 3, .tp = 2}.check_fits(6); }), "(nothing thrown)");
  const std::string message = error_of([] { ParallelDims{.dp = 4, .tp = 2}.check_fits(6); });
  EXPECT_CONTAINS(message, "world size 6 is not dp 4 × tp 2 = 8. HINT: launch 8 ranks");
}

// Note [TP groups stay on one node]: tp must divide the ranks per node, when the launcher says how many.
TEST(ParallelDims, TpMustDivideTheRanksPerNode) {
  for (const auto& [tp, local] : std::vector<std::pair<int, int>>{{1, 1}, {1, 3}, {2, 2}, {2, 8}, {4, 8}}) {
    EXPECT_EQ(error_of([&] { ParallelDims{.dp = 2, .tp = tp}.check_tp_within_node(local); }),
              "(nothing thrown)")
        << "tp " << tp << ", local size " << local;
  }
  EXPECT_EQ(error_of([] { ParallelDims{.dp = 1, .tp = 16}.check_tp_within_node(std::nullopt); }),
            "(nothing thrown)")
      << "an unknown local size has nothing to check";

  const std::string larger = error_of([] { ParallelDims{.dp = 2, .tp = 4}.check_tp_within_node(2); });
  EXPECT_CONTAINS(larger,
                  "TP size 4 is larger than the local size 2 (ranks per node), so a TP group would "
                  "span two nodes");
  EXPECT_CONTAINS(larger,
                  "HINT: choose a TP size that divides 2 (1, 2), or launch a multiple of 4 ranks on "
                  "every node");
  const std::string uneven = error_of([] { ParallelDims{.dp = 4, .tp = 3}.check_tp_within_node(4); });
  EXPECT_CONTAINS(uneven, "TP size 3 does not divide the local size 4 (ranks per node)");
  EXPECT_CONTAINS(uneven, "HINT: choose a TP size that divides 4 (1, 2, 4), or launch a multiple of 3");
  EXPECT_CONTAINS(error_of([] { ParallelDims{.dp = 1, .tp = 2}.check_tp_within_node(0); }),
                  "the launcher reports 0 ranks per node");
}

// Every (dp, tp) with dp × tp == the world: 1 × N, N × 1, and 2 × 2 with 4 ranks.
std::vector<ParallelDims> shapes_of_the_world() {
  std::vector<ParallelDims> shapes;
  const int ranks = world()->size();
  for (int tp = 1; tp <= ranks; ++tp) {
    if (ranks % tp == 0) shapes.push_back(ParallelDims{.dp = ranks / tp, .tp = tp});
  }
  return shapes;
}

TEST(ProcessGrid, EveryShapeThatFitsTheWorldHasTheRightGroups) {
  const int rank = world()->rank();
  const std::vector<ParallelDims> shapes = shapes_of_the_world();
  ASSERT_GE(shapes.size(), 2u);
  for (const ParallelDims& dims : shapes) {
    SCOPED_TRACE(dims.describe());
    const ProcessGrid grid(world(), dims);
    const int dp_rank = rank / dims.tp, tp_rank = rank % dims.tp;
    EXPECT_EQ(grid.dp_rank(), dp_rank);
    EXPECT_EQ(grid.tp_rank(), tp_rank);
    EXPECT_EQ(grid.dp_size(), dims.dp);
    EXPECT_EQ(grid.tp_size(), dims.tp);
    EXPECT_EQ(grid.world().get(), world().get());

    // TP group: the contiguous ranks [dp_rank * tp, (dp_rank + 1) * tp), in order.
    std::vector<int64_t> tp_members(static_cast<size_t>(dims.tp));
    std::iota(tp_members.begin(), tp_members.end(), static_cast<int64_t>(dp_rank) * dims.tp);
    // DP group: the strided ranks tp_rank, tp_rank + tp, ..., in order.
    std::vector<int64_t> dp_members;
    for (int d = 0; d < dims.dp; ++d) dp_members.push_back(static_cast<int64_t>(d) * dims.tp + tp_rank);

    ASSERT_TRUE(grid.tp_group() && grid.dp_group());
    EXPECT_EQ(grid.tp_group()->size(), dims.tp);
    EXPECT_EQ(grid.tp_group()->rank(), tp_rank);
    EXPECT_EQ(grid.dp_group()->size(), dims.dp);
    EXPECT_EQ(grid.dp_group()->rank(), dp_rank);
    EXPECT_EQ(grid.tp_group()->backend_name(), vimo::testing::backend_under_test());

    EXPECT_EQ(sum_of_members(*grid.tp_group()),
              std::accumulate(tp_members.begin(), tp_members.end(), int64_t{0}));
    EXPECT_EQ(sum_of_members(*grid.dp_group()),
              std::accumulate(dp_members.begin(), dp_members.end(), int64_t{0}));
    EXPECT_EQ(members_in_order(*grid.tp_group()), tp_members);
    EXPECT_EQ(members_in_order(*grid.dp_group()), dp_members);
  }
  expect_still_usable();
}

TEST(ProcessGrid, ShapeThatDoesNotFitTheWorldFailsOnEveryRank) {
  const int ranks = world()->size(), rank = world()->rank();
  const ParallelDims too_big{.dp = ranks, .tp = 2};
  const std::string message = error_of([&] { ProcessGrid grid(world(), too_big); });
  EXPECT_CONTAINS(message, "[rank " + std::to_string(rank) + "] world size " + std::to_string(ranks) +
                               " is not dp " + std::to_string(ranks) +
                               " × tp 2 = " + std::to_string(2 * ranks) + ". HINT:");
  EXPECT_CONTAINS(error_of([&] { ProcessGrid grid(world(), ParallelDims{.dp = ranks, .tp = 0}); }),
                  "has an axis below 1");
  expect_still_usable();
}

// Under mpirun every rank of these tests is on this host, so the launcher's local size is the world: every
// shape fits, and the groups come out as without the check.
TEST(ProcessGrid, EveryShapeFitsTheLaunchersNode) {
  const std::optional<int> local_size = vimo::comm::launch_environment().local_size;
  ASSERT_EQ(local_size, world()->size()) << "mpirun started every rank on this host";
  for (const ParallelDims& dims : shapes_of_the_world()) {
    SCOPED_TRACE(dims.describe());
    const ProcessGrid grid(world(), dims, local_size);
    EXPECT_EQ(members_in_order(*grid.tp_group()).size(), static_cast<size_t>(dims.tp));
  }
  // Nodes of different sizes that tp divides (4 ranks: nodes of 2 and 2 with tp 2) are fine too.
  const int ranks = world()->size();
  if (ranks % 2 == 0) {
    const ProcessGrid grid(world(), ParallelDims::from_world(ranks, 2), 2);
    EXPECT_EQ(grid.tp_size(), 2);
  }
  expect_still_usable();
}

// A TP group across nodes: every rank fails, naming the node that does not fit, instead of some ranks
// splitting while others throw. First only the last rank's node is too small (nodes may differ: Slurm's
// "4,1"), then every node holds half the world while tp is the whole world.
TEST(ProcessGrid, TpGroupSpanningNodesFailsOnEveryRank) {
  const int ranks = world()->size(), rank = world()->rank(), last = ranks - 1;
  const ParallelDims whole_world_tp{.dp = 1, .tp = ranks};
  const std::string one_small_node =
      error_of([&] { ProcessGrid grid(world(), whole_world_tp, rank == last ? 1 : ranks); });
  EXPECT_CONTAINS(one_small_node, "[rank " + std::to_string(rank) + "] dp 1 × tp " + std::to_string(ranks) +
                                      " on the node of rank " + std::to_string(last) + ": TP size " +
                                      std::to_string(ranks) + " is larger than the local size 1");
  EXPECT_CONTAINS(one_small_node, "HINT:");
  expect_still_usable();

  const std::string half_nodes = error_of([&] { ProcessGrid grid(world(), whole_world_tp, ranks / 2); });
  EXPECT_CONTAINS(half_nodes, "on the node of rank 0: TP size " + std::to_string(ranks) +
                                  " is larger than the local size " + std::to_string(ranks / 2));
  expect_still_usable();
}

TEST(ProcessGrid, RanksAskingForDifferentGridsFailTogether) {
  const int ranks = world()->size(), rank = world()->rank();
  // Both shapes fit the world on their own: only comparing the ranks' dims can catch this.
  const ParallelDims mine =
      rank == 0 ? ParallelDims{.dp = ranks, .tp = 1} : ParallelDims{.dp = 1, .tp = ranks};
  const std::string message = error_of([&] { ProcessGrid grid(world(), mine); });
  EXPECT_CONTAINS(message, "[rank " + std::to_string(rank) + "] the ranks asked for different process grids");
  EXPECT_CONTAINS(
      message, "rank 0: dp " + std::to_string(ranks) + " × tp 1; rank 1: dp 1 × tp " + std::to_string(ranks));
  expect_still_usable();
}

TEST(CommunicatorSplit, SubsetOrderedByKey) {
  const int rank = world()->rank(), ranks = world()->size();
  // Even and odd ranks, each group in reversed order of world rank.
  const std::shared_ptr<Communicator> parity = world()->split(/*color=*/rank % 2, /*key=*/-rank);
  std::vector<int64_t> expected;
  for (int r = ranks - 1; r >= 0; --r) {
    if (r % 2 == rank % 2) expected.push_back(r);
  }
  ASSERT_TRUE(parity);
  EXPECT_EQ(parity->size(), static_cast<int>(expected.size()));
  EXPECT_EQ(members_in_order(*parity), expected);
  EXPECT_EQ(expected[static_cast<size_t>(parity->rank())], rank);
  EXPECT_EQ(sum_of_members(*parity), std::accumulate(expected.begin(), expected.end(), int64_t{0}));

  // Equal keys keep the parent's order; a split of a split works and outlives nothing it needs.
  const std::shared_ptr<Communicator> same = parity->split(/*color=*/0, /*key=*/0);
  EXPECT_EQ(members_in_order(*same), expected);
  std::vector<int64_t> everyone(static_cast<size_t>(ranks));
  std::iota(everyone.begin(), everyone.end(), int64_t{0});
  EXPECT_EQ(members_in_order(*world()->split(7, 0)), everyone);
}

TEST(CommunicatorSplit, NegativeColorFailsOnEveryRank) {
  const int rank = world()->rank(), last = world()->size() - 1;
  const std::string message = error_of([&] { world()->split(rank == last ? -1 : 0, rank); });
  if (rank == last) {
    EXPECT_CONTAINS(message,
                    "[rank " + std::to_string(last) + "] split got color -1, but colors must be >= 0");
  } else {
    EXPECT_CONTAINS(message, "split abandoned on every rank: rank(s) " + std::to_string(last));
  }
  expect_still_usable();
}

TEST(CommunicatorSplit, SplitAgainstAnotherCollectiveFailsTogether) {
  const std::string message = error_of([&] {
    if (world()->rank() == 0) {
      world()->split(0, 0);
    } else {
      world()->barrier();
    }
  });
  EXPECT_CONTAINS(message, "rank 0: split; rank 1: barrier");
  expect_still_usable();
}

}  // namespace
