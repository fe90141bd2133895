// The contrastive loss composition against an element-by-element float64 reference written with plain
// loops (an independent formulation: explicit log-sum-exp per row), on fresh random inputs.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/contrastive_loss.h"
#include "tests/random_seed.h"

namespace {

// -mean_i log softmax(scores[i])[offset + i], with a max-shifted log-sum-exp per row.
double reference_rows(const at::Tensor& scores, int64_t offset) {
  const at::Tensor s = scores.to(at::kDouble).contiguous();
  const int64_t n = s.size(0), N = s.size(1);
  const double* p = s.data_ptr<double>();
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    double high = -INFINITY;
    for (int64_t j = 0; j < N; ++j) high = std::max(high, p[i * N + j]);
    double sum = 0;
    for (int64_t j = 0; j < N; ++j) sum += std::exp(p[i * N + j] - high);
    total += high + std::log(sum) - p[i * N + offset + i];
  }
  return total / static_cast<double>(n);
}

TEST(ContrastiveLoss, RowsMatchLoopReference) {
  vimo::testing::seed_torch();
  for (auto [n, N, offset] : {std::tuple{1, 1, 0}, {4, 16, 8}, {7, 7, 0}, {5, 20, 15}}) {
    at::Tensor scores = at::randn({n, N}, at::kDouble) * 10;
    const double got = vimo::kernels::infonce_rows(scores, offset).item<double>();
    EXPECT_NEAR(got, reference_rows(scores, offset), 1e-12 * (1 + std::abs(got)))
        << n << "x" << N << "+" << offset;
  }
}

TEST(ContrastiveLoss, LargeLogitsStayFinite) {
  vimo::testing::seed_torch();
  at::Tensor scores = at::randn({6, 12}) * 1e4;  // float32, far beyond exp's range
  const double got = vimo::kernels::infonce_rows(scores, 3).item<double>();
  ASSERT_TRUE(std::isfinite(got));
  // float32 inputs: relative 1e-5 of the magnitude (scores ~1e4) is the attainable accuracy.
  EXPECT_NEAR(got, reference_rows(scores, 3), 1e-5 * 4e4);
}

TEST(ContrastiveLoss, SymmetricIsMeanOfBothDirectionsAndGradientsMatch) {
  vimo::testing::seed_torch();
  at::Tensor t2v = (at::randn({4, 12}, at::kDouble) * 3).requires_grad_();
  at::Tensor v2t = (at::randn({4, 12}, at::kDouble) * 3).requires_grad_();
  at::Tensor loss = vimo::kernels::symmetric_infonce(t2v, v2t, 4);
  EXPECT_NEAR(loss.item<double>(), (reference_rows(t2v, 4) + reference_rows(v2t, 4)) / 2, 1e-12);
  loss.backward();
  // d/ds[i, j] of mean CE = (softmax(s[i])[j] - [j == 4 + i]) / n, halved by the symmetric mean.
  at::Tensor expected = (at::softmax(t2v.detach(), 1) - at::eye(4, 12, at::kDouble).roll(4, 1)) / 4 / 2;
  EXPECT_TRUE(at::allclose(t2v.grad(), expected, 1e-12, 1e-12));
}

TEST(ContrastiveLoss, FuseScoresWeighsEachVideo) {
  vimo::testing::seed_torch();
  at::Tensor s_act = at::randn({3, 5}, at::kDouble), s_obj = at::randn({3, 5}, at::kDouble);
  at::Tensor w_cols = at::softmax(at::randn({5, 2}, at::kDouble), 1),
             w_rows = at::softmax(at::randn({3, 2}, at::kDouble), 1);
  at::Tensor by_column = vimo::kernels::fuse_scores(s_act, s_obj, w_cols, false);
  at::Tensor by_row = vimo::kernels::fuse_scores(s_act, s_obj, w_rows, true);
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 5; ++j) {
      const double a = s_act[i][j].item<double>(), o = s_obj[i][j].item<double>();
      EXPECT_NEAR(by_column[i][j].item<double>(),
                  w_cols[j][0].item<double>() * a + w_cols[j][1].item<double>() * o, 1e-14);
      EXPECT_NEAR(by_row[i][j].item<double>(),
                  w_rows[i][0].item<double>() * a + w_rows[i][1].item<double>() * o, 1e-14);
    }
  }
}

TEST(ContrastiveLoss, RejectsPositivesOutsideTheColumns) {
  EXPECT_THROW(vimo::kernels::infonce_rows(at::zeros({4, 6}), 3), std::invalid_argument);
}

}  // namespace
