// Tests held-out retrieval evaluation: ranks among the distinct videos of a split (a video with several
// captions counts once), against plain loops written from the definition; duplicated caption lines change
// nothing but the caption count; a split without video ids is one video per record; non-finite scores are
// refused. DP > 1 against one process is test_retrieval_eval_dp (under mpirun).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <vector>

#include "data/retrieval_dataset.h"
#include "data/synthetic.h"
#include "models/gemini_mvr.h"
#include "tests/random_seed.h"
#include "tests/test_support.h"
#include "tests/trainer/retrieval_corpus.h"
#include "trainer/retrieval_eval.h"

namespace vimo::trainer {
namespace {

namespace fs = std::filesystem;
using models::GeminiEmbeddings;
using models::GeminiStage;
using vimo::testing::expect_error;
using vimo::testing::tiny_gemini_config;
using vimo::testing::write_retrieval_corpus;

fs::path test_dir(const std::string& name) { return vimo::testing::fresh_test_dir("retrieval_eval", name); }

// The metrics from the definition: caption i's rank is 1 + the number of videos v with
// scores[i][v] > scores[i][target[i]].
RetrievalMetrics naive_metrics(const std::vector<std::vector<double>>& scores,
                               const std::vector<int64_t>& target) {
  std::vector<double> ranks;
  for (size_t i = 0; i < scores.size(); ++i) {
    int64_t higher = 0;
    for (const double s : scores[i]) higher += s > scores[i][static_cast<size_t>(target[i])] ? 1 : 0;
    ranks.push_back(1.0 + static_cast<double>(higher));
  }
  RetrievalMetrics m;
  m.queries = static_cast<int64_t>(scores.size());
  m.videos = static_cast<int64_t>(scores.front().size());
  auto within = [&](double k) {
    return 100.0 *
           static_cast<double>(std::count_if(ranks.begin(), ranks.end(), [&](double r) { return r <= k; })) /
           static_cast<double>(ranks.size());
  };
  m.r1 = within(1);
  m.r5 = within(5);
  m.r10 = within(10);
  double sum = 0;
  for (const double r : ranks) sum += r;
  m.mean_rank = sum / static_cast<double>(ranks.size());
  std::sort(ranks.begin(), ranks.end());
  const size_t n = ranks.size();
  m.median_rank = n % 2 ? ranks[n / 2] : 0.5 * (ranks[n / 2 - 1] + ranks[n / 2]);
  return m;
}

std::vector<std::vector<double>> rows_of(const at::Tensor& scores) {
  const at::Tensor s = scores.to(at::kDouble).contiguous();
  std::vector<std::vector<double>> rows(static_cast<size_t>(s.size(0)));
  for (int64_t i = 0; i < s.size(0); ++i) {
    const double* row = s[i].data_ptr<double>();
    rows[static_cast<size_t>(i)].assign(row, row + s.size(1));
  }
  return rows;
}

void expect_same(const RetrievalMetrics& actual, const RetrievalMetrics& expected) {
  EXPECT_EQ(actual.queries, expected.queries);
  EXPECT_EQ(actual.videos, expected.videos);
  EXPECT_DOUBLE_EQ(actual.r1, expected.r1);
  EXPECT_DOUBLE_EQ(actual.r5, expected.r5);
  EXPECT_DOUBLE_EQ(actual.r10, expected.r10);
  EXPECT_DOUBLE_EQ(actual.median_rank, expected.median_rank);
  EXPECT_DOUBLE_EQ(actual.mean_rank, expected.mean_rank);
}

TEST(RetrievalMetrics, RanksAmongVideosEqualANaiveLoop) {
  vimo::testing::seed_torch();
  for (const int64_t videos : {1, 4, 9, 31}) {
    const int64_t captions = 2 * videos + 3;
    // Scores on a coarse grid, so ties (which do not count as higher) occur.
    const at::Tensor scores = at::randint(-4, 5, {captions, videos}, at::kLong).to(at::kFloat) * 0.5;
    const at::Tensor target = at::randint(0, videos, {captions}, at::kLong);
    const std::vector<int64_t> target_vector(target.data_ptr<int64_t>(),
                                             target.data_ptr<int64_t>() + captions);
    expect_same(retrieval_metrics(scores, target), naive_metrics(rows_of(scores), target_vector));
  }
  // Without targets: a square matrix, one video per caption, the match on the diagonal.
  const at::Tensor square = at::randn({12, 12});
  std::vector<int64_t> diagonal(12);
  std::iota(diagonal.begin(), diagonal.end(), 0);
  expect_same(retrieval_metrics(square), naive_metrics(rows_of(square), diagonal));
}

TEST(RetrievalMetrics, NonFiniteScoresAreRefusedNamingTheRow) {
  for (const double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                           -std::numeric_limits<double>::infinity()}) {
    at::Tensor scores = at::randn({6, 4}, at::kDouble);
    scores[3][2] = bad;
    scores[5][0] = bad;
    expect_error(
        [&] {
          retrieval_metrics(scores, at::tensor({0, 1, 2, 3, 0, 1}, at::kLong));
        },
        {"caption row 3 of 6", "video 2", "HINT: the model diverged", "optim.lr"});
  }
  // All NaN, the audit's case: ranked as R@1 100% before.
  expect_error(
      [] {
        retrieval_metrics(at::full({37, 37}, std::numeric_limits<float>::quiet_NaN()));
      },
      {"caption row 0 of 37", "nan", "HINT"});
}

TEST(RetrievalMetrics, ShapesAndTargetsAreChecked) {
  expect_error([] { retrieval_metrics(at::zeros({3, 4})); }, {"[3, 4] without target videos must be square"});
  expect_error(
      [] {
        retrieval_metrics(at::zeros({3, 4}), at::tensor({0, 4, 1}, at::kLong));
      },
      {"target videos must be [3] in [0, 4)"});
  expect_error([] { retrieval_metrics(at::zeros({0, 4})); }, {"both > 0"});
}

GeminiEmbeddings concatenated(const std::vector<GeminiEmbeddings>& parts) {
  auto cat = [&](at::Tensor GeminiEmbeddings::*field) {
    if (!(parts.front().*field).defined()) return at::Tensor();
    std::vector<at::Tensor> pieces;
    for (const GeminiEmbeddings& p : parts) pieces.push_back(p.*field);
    return at::cat(pieces, 0);
  };
  using E = GeminiEmbeddings;
  return {cat(&E::text_action), cat(&E::text_object), cat(&E::video_action), cat(&E::video_object),
          cat(&E::router_weights)};
}

// The evaluation by hand: every caption encoded alone; each video, known by the index the corpus was written
// with, encoded alone from its first record; ranks and metrics by naive_metrics.
RetrievalMetrics naive_evaluation(models::GeminiMVR& model, const data::RetrievalDataset& split,
                                  const std::vector<int64_t>& record_videos) {
  at::NoGradGuard no_grad;
  std::map<int64_t, int64_t> column_of_video;  // corpus video index → score column
  std::vector<GeminiEmbeddings> texts, videos;
  std::vector<int64_t> target;
  for (int64_t i = 0; i < split.size(); ++i) {
    const data::RetrievalBatch one = split.batch({i});
    texts.push_back(model->encode_texts(one.text_ids, one.text_mask));
    const int64_t video = record_videos[static_cast<size_t>(i)];
    if (!column_of_video.count(video)) {
      column_of_video[video] = static_cast<int64_t>(videos.size());
      videos.push_back(model->encode_videos(one.frames, one.keypoints, one.frame_mask));
    }
    target.push_back(column_of_video[video]);
  }
  return naive_metrics(rows_of(model->score(concatenated(texts), concatenated(videos))), target);
}

models::GeminiMVR tiny_model(GeminiStage stage) {
  models::GeminiMVR model(tiny_gemini_config());
  model->set_stage(stage);
  return model;
}

class GroupedEvaluation : public ::testing::TestWithParam<GeminiStage> {};

TEST_P(GroupedEvaluation, RanksEachCaptionAmongDistinctVideosAsANaiveLoop) {
  const uint64_t seed = vimo::testing::seed_torch();
  std::mt19937_64 rng(seed);
  std::vector<int64_t> captions_per_video(11);
  for (int64_t& k : captions_per_video) k = std::uniform_int_distribution<int64_t>(1, 4)(rng);
  const auto [record_videos, record_captions] = vimo::testing::grouped_records(captions_per_video, seed);
  const fs::path dir = test_dir("grouped");
  write_retrieval_corpus(dir, tiny_gemini_config(), record_videos, record_captions, seed);
  const data::RetrievalDataset split(dir.string(), "test");
  ASSERT_EQ(split.num_videos(), 11);
  ASSERT_EQ(split.size(), static_cast<int64_t>(record_videos.size()));

  models::GeminiMVR model = tiny_model(GetParam());
  const RetrievalMetrics expected = naive_evaluation(model, split, record_videos);
  // Batches of one encode every row exactly as the naive loop does; larger batches may round differently.
  const RetrievalMetrics m = evaluate_retrieval(model, split, nullptr, /*batch_size=*/1);
  expect_same(m, expected);
  EXPECT_EQ(m.videos, 11);
  EXPECT_NE(m.summary().find(fmt::format("({} captions, 11 videos; chance R@1 9.09%)", split.size())),
            std::string::npos)
      << m.summary();
  EXPECT_NE(m.json().find("\"videos\": 11"), std::string::npos) << m.json();
}

INSTANTIATE_TEST_SUITE_P(Stages, GroupedEvaluation,
                         ::testing::Values(GeminiStage::Action, GeminiStage::Object, GeminiStage::Router));

// The audit's case: the same videos with each caption line once or twice. Ranks are among videos, so the
// metrics are the same (a competing video's second caption added 1 to the rank, and R@5 fell from 30% to
// 15%).
TEST(GroupedEvaluation, DuplicatedCaptionLinesLeaveTheMetricsUnchanged) {
  const uint64_t seed = vimo::testing::seed_torch();
  const int64_t videos = 20;
  const auto [once_videos, once_captions] =
      vimo::testing::grouped_records(std::vector<int64_t>(videos, 1), seed);
  std::vector<int64_t> twice_videos = once_videos, twice_captions = once_captions;
  twice_videos.insert(twice_videos.end(), once_videos.rbegin(), once_videos.rend());
  twice_captions.insert(twice_captions.end(), once_captions.rbegin(), once_captions.rend());
  const fs::path once = test_dir("once"), twice = test_dir("twice");
  write_retrieval_corpus(once, tiny_gemini_config(), once_videos, once_captions, seed);
  write_retrieval_corpus(twice, tiny_gemini_config(), twice_videos, twice_captions, seed);

  models::GeminiMVR model = tiny_model(GeminiStage::Router);
  const RetrievalMetrics a =
      evaluate_retrieval(model, data::RetrievalDataset(once.string(), "test"), nullptr, 1);
  RetrievalMetrics b = evaluate_retrieval(model, data::RetrievalDataset(twice.string(), "test"), nullptr, 1);
  EXPECT_EQ(b.queries, 2 * videos);
  EXPECT_EQ(b.videos, videos);
  EXPECT_NE(b.summary().find("(40 captions, 20 videos; chance R@1 5.00%)"), std::string::npos) << b.summary();
  b.queries = a.queries;
  expect_same(b, a);
  // A random model ranks some captions below first: the case where counting records differs.
  EXPECT_GT(a.mean_rank, 1.0);
}

// The synthetic generator writes no `video` field: each record is a video of its own, and the metrics are
// the square matrix's (the match on the diagonal).
TEST(GroupedEvaluation, RecordsWithoutAVideoIdAreEachAVideo) {
  const uint64_t seed = vimo::testing::seed_torch();
  const auto [record_videos, record_captions] = vimo::testing::grouped_records({2, 1, 3, 1}, seed);
  const fs::path dir = test_dir("unnamed");
  write_retrieval_corpus(dir, tiny_gemini_config(), record_videos, record_captions, seed,
                         /*name_videos=*/false);
  const data::RetrievalDataset split(dir.string(), "test");
  EXPECT_EQ(split.num_videos(), 7);
  std::vector<int64_t> each(7);
  std::iota(each.begin(), each.end(), 0);
  EXPECT_TRUE(at::equal(split.record_videos(), at::tensor(each, at::kLong)));
  models::GeminiMVR model = tiny_model(GeminiStage::Action);
  expect_same(evaluate_retrieval(model, split, nullptr, 1), naive_evaluation(model, split, each));

  data::SynthOptions options;
  options.num_train = 3;
  options.num_test = 9;
  options.frames = 4;
  options.feature_dim = 5;
  options.seed = seed;
  const fs::path synthetic = test_dir("synthetic");
  data::write_synthetic_dataset(options, synthetic.string());
  const data::RetrievalDataset synthetic_split(synthetic.string(), "test");
  EXPECT_EQ(synthetic_split.num_videos(), 9);
  EXPECT_EQ(synthetic_split.video_records(), (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8}));
}

// The first record of a video stands for it, so records naming one video must hold the same one.
TEST(GroupedEvaluation, RecordsOfOneVideoIdThatDifferAreRefused) {
  const fs::path dir = test_dir("conflict");
  write_retrieval_corpus(dir, tiny_gemini_config(), {0, 1, 2}, {0, 1, 2}, 7, true, {"a", "b", "a"});
  expect_error([&] { data::RetrievalDataset(dir.string(), "test"); },
               {"split 'test'", "record 0 at offset", "record 2 at offset", "name the same video", "HINT"});
}

TEST(GroupedEvaluation, ADivergedModelIsRefused) {
  const uint64_t seed = vimo::testing::seed_torch();
  const fs::path dir = test_dir("diverged");
  write_retrieval_corpus(dir, tiny_gemini_config(), {0, 0, 1, 2}, {0, 1, 2, 3}, seed);
  const data::RetrievalDataset split(dir.string(), "test");
  for (const GeminiStage stage : {GeminiStage::Action, GeminiStage::Object, GeminiStage::Router}) {
    models::GeminiMVR model = tiny_model(stage);
    {
      at::NoGradGuard no_grad;
      for (at::Tensor& p : model->parameters()) p.fill_(std::numeric_limits<float>::quiet_NaN());
    }
    expect_error([&] { evaluate_retrieval(model, split, nullptr); }, {"caption row 0 of 4", "HINT"});
  }
}

}  // namespace
}  // namespace vimo::trainer
