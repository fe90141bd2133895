// Data parallelism for real under mpirun: the loss with negatives gathered from every rank and the
// averaged gradients equal one process's on the whole global batch (float64), for every stage; a few
// AdamW steps keep replicas identical and equal to the single-process run.
#include <gtest/gtest.h>
#include <mpi.h>

#include <random>

#include "comm/communicator.h"
#include "comm/gradient_reducer.h"
#include "models/gemini_mvr.h"
#include "tests/test_support.h"
#include "trainer/data_parallel.h"
#include "trainer/optimizer.h"

namespace {
using namespace vimo;

std::shared_ptr<comm::Communicator> world() {
  static auto c = comm::make_mpi_communicator();
  return c;
}

models::GeminiConfig tiny() { return vimo::testing::tiny_gemini_config(); }

// A seed fresh per run, agreed by all ranks (rank 0 draws it).
uint64_t shared_seed() {
  uint64_t seed = std::random_device{}();
  MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  if (world()->rank() == 0) std::printf("[ seed     ] %llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

struct Batch {
  at::Tensor text_ids, text_mask, frames, keypoints, frame_mask;
  Batch rows(int64_t begin, int64_t count) const {
    return {text_ids.narrow(0, begin, count), text_mask.narrow(0, begin, count),
            frames.narrow(0, begin, count), keypoints.narrow(0, begin, count),
            frame_mask.narrow(0, begin, count)};
  }
};

Batch global_batch(int64_t n, const models::GeminiConfig& c) {
  Batch b;
  b.text_mask = at::arange(c.max_text_len, at::kLong).unsqueeze(0) <
                at::randint(2, c.max_text_len + 1, {n, 1}, at::kLong);
  b.text_ids = at::randint(3, c.vocab_size, {n, c.max_text_len}, at::kLong) * b.text_mask;
  b.frame_mask =
      at::arange(c.frames, at::kLong).unsqueeze(0) < at::randint(2, c.frames + 1, {n, 1}, at::kLong);
  b.frames = at::randn({n, c.frames, c.feature_dim}, at::kDouble);
  b.keypoints = at::randn({n, c.frames, c.joints, 3}, at::kDouble);
  return b;
}

at::Tensor loss_of(models::GeminiMVR& model, const Batch& b,
                   const std::shared_ptr<comm::Communicator>& comm) {
  auto texts = model->encode_texts(b.text_ids, b.text_mask);
  auto videos = model->encode_videos(b.frames, b.keypoints, b.frame_mask);
  return model->contrastive_loss(texts, videos, comm);
}

models::GeminiMVR make_model(uint64_t seed, models::GeminiStage stage) {
  at::manual_seed(seed);
  models::GeminiMVR model(tiny());
  model->to(at::kDouble);
  model->set_stage(stage);
  return model;
}

class DataParallel : public ::testing::TestWithParam<models::GeminiStage> {};

TEST_P(DataParallel, GatheredNegativesAndAveragedGradientsEqualOneProcess) {
  const uint64_t seed = shared_seed();
  const int ranks = world()->size(), rank = world()->rank();
  const int64_t per_rank = 3;
  at::manual_seed(seed + 1);
  const Batch batch = global_batch(per_rank * ranks, tiny());

  models::GeminiMVR distributed = make_model(seed, GetParam());
  std::vector<at::Tensor> params;
  for (auto& [name, p] : distributed->trainable_parameters()) params.push_back(p);
  // Buckets of ~1 KiB: many buckets, launched during backward, as in training at scale.
  comm::GradientReducer reducer(params, world(), {0.001, 0.0005});
  at::Tensor loss = loss_of(distributed, batch.rows(rank * per_rank, per_rank), world());
  loss.backward();
  reducer.finalize();
  at::Tensor mean_loss = loss.detach().reshape({1}).clone();
  world()->allreduce(mean_loss, comm::ReduceOp::Avg);

  models::GeminiMVR single = make_model(seed, GetParam());
  at::Tensor full_loss = loss_of(single, batch, nullptr);
  full_loss.backward();

  // float64 throughout; the only differences are summation orders: relative 1e-10 is ample.
  EXPECT_NEAR(mean_loss.item<double>(), full_loss.item<double>(), 1e-10 * std::abs(full_loss.item<double>()));
  auto reference = single->trainable_parameters();
  auto ours = distributed->trainable_parameters();
  ASSERT_EQ(ours.size(), reference.size());
  for (size_t i = 0; i < ours.size(); ++i) {
    const at::Tensor& g = ours[i].second.grad();
    const at::Tensor& expected = reference[i].second.grad();
    EXPECT_TRUE(at::allclose(g, expected, 1e-8, 1e-11))
        << ours[i].first << " max |diff| " << (g - expected).abs().max().item<double>();
  }
}

INSTANTIATE_TEST_SUITE_P(Stages, DataParallel,
                         ::testing::Values(models::GeminiStage::Action, models::GeminiStage::Object,
                                           models::GeminiStage::Router),
                         [](const auto& info) { return std::string(models::stage_name(info.param)); });

TEST(DataParallelTraining, ReplicasStayIdenticalAndMatchOneProcess) {
  const uint64_t seed = shared_seed();
  const int ranks = world()->size(), rank = world()->rank();
  const int64_t per_rank = 2;
  models::GeminiMVR distributed = make_model(seed, models::GeminiStage::Action);
  models::GeminiMVR single = make_model(seed, models::GeminiStage::Action);
  trainer::AdamW dp_opt(distributed->trainable_parameters(), {}),
      single_opt(single->trainable_parameters(), {});
  std::vector<at::Tensor> params;
  for (auto& [name, p] : distributed->trainable_parameters()) params.push_back(p);
  comm::GradientReducer reducer(params, world(), {0.002, 0.001});
  for (int step = 1; step <= 3; ++step) {
    at::manual_seed(seed + 100 + step);
    const Batch batch = global_batch(per_rank * ranks, tiny());
    loss_of(distributed, batch.rows(rank * per_rank, per_rank), world()).backward();
    reducer.finalize();
    dp_opt.step(1e-2);
    dp_opt.zero_grad();
    loss_of(single, batch, nullptr).backward();
    single_opt.step(1e-2);
    single_opt.zero_grad();
    ASSERT_NO_THROW(trainer::check_replicas_agree(distributed, world(), step));
  }
  auto a = distributed->named_parameters(), b = single->named_parameters();
  for (const auto& item : a) {
    // Adam divides by sqrt(v): tiny gradient differences can grow, so the bound is looser than above.
    EXPECT_TRUE(at::allclose(item.value(), b[item.key()], 1e-7, 1e-9)) << item.key();
  }
}

TEST(DataParallelTraining, DivergedReplicaIsDetected) {
  models::GeminiMVR model = make_model(shared_seed(), models::GeminiStage::Action);
  if (world()->rank() == world()->size() - 1) {
    at::NoGradGuard no_grad;
    model->parameters()[0].add_(1e-6);
  }
  EXPECT_THROW(trainer::check_replicas_agree(model, world(), 1), std::runtime_error);
}

}  // namespace
