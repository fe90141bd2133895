// The contrastive loss composition against an element-by-element float64 reference written with plain
// loops (an independent formulation: explicit log-sum-exp per row), on fresh random inputs.
#include <gtest/gtest.h>
#include <torch/csrc/autograd/function.h>

#include <cmath>
#include <set>
#include <string>
#include <vector>

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

// The matrix products in the autograd graph of `loss` (each node once).
int count_products(const at::Tensor& loss) {
  std::set<torch::autograd::Node*> seen;
  std::vector<torch::autograd::Node*> stack = {loss.grad_fn().get()};
  int products = 0;
  while (!stack.empty()) {
    torch::autograd::Node* node = stack.back();
    stack.pop_back();
    if (node == nullptr || !seen.insert(node).second) continue;
    if (node->name().rfind("MmBackward", 0) == 0) ++products;
    for (const torch::autograd::Edge& edge : node->next_edges()) stack.push_back(edge.function.get());
  }
  return products;
}

// Note [The eager baseline computes S once] in kernels/contrastive_loss.cpp: in one process the
// video→text scores are Sᵀ (one product), in data parallelism a product of their own; both equal the
// composition with the two directions as separate products, loss and gradients.
TEST(ContrastiveLoss, EagerFromEmbeddingsComputesTheScoresOnceInOneProcess) {
  vimo::testing::seed_torch();
  for (const bool one_process : {true, false}) {
    const int64_t n = one_process ? 9 : 3, N = 9, D = 5, offset = one_process ? 0 : 6;
    const auto leaf = [](const at::Tensor& t) { return t.detach().clone().requires_grad_(); };
    const at::Tensor texts = at::randn({N, D}, at::kDouble), videos = at::randn({N, D}, at::kDouble);
    at::Tensor text_all = leaf(texts), video_all = leaf(videos);
    at::Tensor text_local = one_process ? text_all : leaf(texts.narrow(0, offset, n));
    at::Tensor video_local = one_process ? video_all : leaf(videos.narrow(0, offset, n));
    at::Tensor scale = at::scalar_tensor(1 / 0.07, at::kDouble).requires_grad_();
    const std::vector<at::Tensor> leaves =
        one_process ? std::vector<at::Tensor>{text_all, video_all, scale}
                    : std::vector<at::Tensor>{text_local, text_all, video_local, video_all, scale};

    const at::Tensor got =
        vimo::kernels::eager_symmetric_infonce(text_local, text_all, video_local, video_all, scale, offset);
    EXPECT_EQ(count_products(got), one_process ? 1 : 2) << (one_process ? "one process" : "data parallel");
    got.backward();
    std::vector<at::Tensor> got_grads;
    for (at::Tensor t : leaves) {
      got_grads.push_back(t.grad().clone());
      t.mutable_grad().reset();
    }
    const at::Tensor want = vimo::kernels::symmetric_infonce(
        scale * at::mm(text_local, video_all.t()), scale * at::mm(video_local, text_all.t()), offset);
    EXPECT_NEAR(got.item<double>(), want.item<double>(), 1e-12);
    want.backward();
    for (size_t i = 0; i < leaves.size(); ++i) {
      EXPECT_TRUE(at::allclose(got_grads[i], leaves[i].grad(), 1e-12, 1e-12))
          << (one_process ? "one process" : "data parallel") << ", leaf " << i;
    }
  }
}

TEST(ContrastiveLoss, RejectsPositivesOutsideTheColumns) {
  EXPECT_THROW(vimo::kernels::infonce_rows(at::zeros({4, 6}), 3), std::invalid_argument);
}

}  // namespace
