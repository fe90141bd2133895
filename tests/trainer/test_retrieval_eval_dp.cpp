// Held-out evaluation spread over the ranks under mpirun equals one process's: captions and distinct videos
// are encoded in contiguous chunks per rank, padded to equal shapes and cut after the gather (Note [Spreading
// the evaluation over ranks]). The splits' caption and video counts divide by neither 2 nor 3 ranks, and one
// has fewer videos than ranks.
#include <gtest/gtest.h>
#include <mpi.h>

#include <random>

#include "comm/communicator.h"
#include "data/retrieval_dataset.h"
#include "models/gemini_mvr.h"
#include "tests/test_support.h"
#include "tests/trainer/retrieval_corpus.h"
#include "trainer/retrieval_eval.h"

namespace vimo::trainer {
namespace {

using models::GeminiStage;

std::shared_ptr<comm::Communicator> world() {
  static auto c = comm::make_mpi_communicator();
  return c;
}

// A seed fresh per run, agreed by all ranks (rank 0 draws it).
uint64_t shared_seed() {
  uint64_t seed = std::random_device{}();
  MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  if (world()->rank() == 0) std::printf("[ seed     ] %llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

class DistributedEvaluation : public ::testing::TestWithParam<GeminiStage> {};

TEST_P(DistributedEvaluation, EqualsOneProcess) {
  const uint64_t seed = shared_seed();
  // 13 captions of 7 videos; 5 captions of 2 videos (fewer videos than ranks at 3).
  for (const std::vector<int64_t>& captions_per_video :
       {std::vector<int64_t>{1, 3, 2, 1, 2, 3, 1}, std::vector<int64_t>{2, 3}}) {
    const auto [record_videos, record_captions] = vimo::testing::grouped_records(captions_per_video, seed);
    // Each rank writes its own copy (the directory is per process).
    const auto dir = vimo::testing::fresh_test_dir("retrieval_eval_dp", "split");
    vimo::testing::write_retrieval_corpus(dir, vimo::testing::tiny_gemini_config(), record_videos,
                                          record_captions, seed);
    const data::RetrievalDataset split(dir.string(), "test");
    ASSERT_EQ(split.num_videos(), static_cast<int64_t>(captions_per_video.size()));

    at::manual_seed(seed);
    models::GeminiMVR model(vimo::testing::tiny_gemini_config());
    model->set_stage(GetParam());
    // Batches of one encode each row alike wherever it is; batches of 2 also split a rank's chunk into
    // several batches with a short last one.
    for (const int64_t batch_size : {1, 2}) {
      const RetrievalMetrics alone = evaluate_retrieval(model, split, nullptr, batch_size);
      const RetrievalMetrics spread = evaluate_retrieval(model, split, world(), batch_size);
      EXPECT_EQ(spread.queries, split.size());
      EXPECT_EQ(spread.videos, split.num_videos());
      EXPECT_EQ(spread.json(), alone.json())
          << "batch size " << batch_size << " on " << world()->size() << " ranks";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Stages, DistributedEvaluation,
                         ::testing::Values(GeminiStage::Action, GeminiStage::Object, GeminiStage::Router));

}  // namespace
}  // namespace vimo::trainer
