// The CUDA twin of the fused symmetric InfoNCE (kernels/cuda/fused_contrastive.cu) against the CPU kernel
// (itself tested against the eager composition in test_fused_contrastive.cpp): the same fresh random inputs
// on both devices, loss and every gradient, single branch (one process and data parallel) and the Gemini
// router form, in float64, float32 and bfloat16; logits of ±1e4. Built only with CUDA; skips where no device
// is visible.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kernels/fused_contrastive.h"
#include "tests/random_seed.h"

namespace {

using vimo::kernels::fused_gemini_infonce;
using vimo::kernels::fused_symmetric_infonce;
using vimo::kernels::GeminiInfoNCEInputs;

#define SKIP_WITHOUT_CUDA_DEVICE() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device: the CUDA kernels were compiled but cannot run here"

// n local rows at `offset` among N gathered ones; one_process: n = N and the same tensors are local and all.
struct Problem {
  int64_t n, N, D, offset, tile;
  bool one_process;
};

std::string describe(const Problem& p, at::ScalarType dtype) {
  return "n=" + std::to_string(p.n) + " N=" + std::to_string(p.N) + " D=" + std::to_string(p.D) +
         " offset=" + std::to_string(p.offset) + " tile=" + std::to_string(p.tile) +
         (p.one_process ? " one process " : " ") + c10::toString(dtype);
}

at::Tensor unit_rows(int64_t rows, int64_t D) {
  at::Tensor x = at::randn({rows, D}, at::kDouble);
  return x / x.norm(2, 1, true);
}

// max |got − want| / max(max |want|, floor), on the CPU in float64.
double relative_error(const at::Tensor& got, const at::Tensor& want, double floor) {
  const at::Tensor g = got.cpu().to(at::kDouble), w = want.cpu().to(at::kDouble);
  const double magnitude = std::max(w.abs().max().item<double>(), floor);
  return (g - w).abs().max().item<double>() / magnitude;
}

// Float64 values of every input; leaves of a dtype on a device are made from them (scales stay float64).
struct Values {
  std::vector<at::Tensor> tensors;  // in the public function's parameter order
  int scales = 1;                   // how many trailing entries are scales
};

Values single_values(const Problem& p, double scale) {
  const at::Tensor texts = unit_rows(p.N, p.D), videos = unit_rows(p.N, p.D);
  if (p.one_process) return {{texts, videos, at::scalar_tensor(scale, at::kDouble)}, 1};
  return {{texts.narrow(0, p.offset, p.n) + 0.01 * at::randn({p.n, p.D}, at::kDouble), texts,
           videos.narrow(0, p.offset, p.n) + 0.01 * at::randn({p.n, p.D}, at::kDouble), videos,
           at::scalar_tensor(scale, at::kDouble)},
          1};
}

std::vector<at::Tensor> make_leaves(const Values& v, at::ScalarType dtype, at::Device device) {
  std::vector<at::Tensor> out;
  for (size_t k = 0; k < v.tensors.size(); ++k) {
    const bool scale = k + v.scales >= v.tensors.size();
    out.push_back(v.tensors[k].to(device, scale ? at::kDouble : dtype).clone().requires_grad_());
  }
  return out;
}

// Loss and the gradient of every leaf, on the CPU in float64.
std::vector<at::Tensor> run_single(const Values& v, const Problem& p, at::ScalarType dtype,
                                   at::Device device) {
  std::vector<at::Tensor> x = make_leaves(v, dtype, device);
  at::Tensor loss = p.one_process ? fused_symmetric_infonce(x[0], x[0], x[1], x[1], x[2], 0, p.tile)
                                  : fused_symmetric_infonce(x[0], x[1], x[2], x[3], x[4], p.offset, p.tile);
  EXPECT_EQ(loss.device(), device);
  EXPECT_EQ(loss.scalar_type(), dtype);
  loss.backward();
  std::vector<at::Tensor> out = {loss.detach().cpu().to(at::kDouble)};
  for (const at::Tensor& t : x) out.push_back(t.grad().cpu().to(at::kDouble));
  return out;
}

// CUDA against CPU: float64 and float32 within 1e-10 and 1e-5 of the CPU result (relative to each tensor's
// largest entry, loss and scales to max(·, 1)); the two devices sum in different orders, nothing more.
// bfloat16 converts to float32 on both devices, so it is held to 1e-2, the bfloat16 rounding of the results.
double tolerance_for(at::ScalarType dtype) {
  return dtype == at::kDouble ? 1e-10 : dtype == at::kFloat ? 1e-5 : 1e-2;
}

void expect_same(const std::vector<at::Tensor>& cuda, const std::vector<at::Tensor>& cpu, const Problem& p,
                 at::ScalarType dtype, double embedding_unit, size_t scales) {
  ASSERT_EQ(cuda.size(), cpu.size());
  for (size_t k = 0; k < cuda.size(); ++k) {
    const bool unit_one = k == 0 || k + scales >= cuda.size();  // the loss and the scales
    EXPECT_LE(relative_error(cuda[k], cpu[k], unit_one ? 1 : embedding_unit), tolerance_for(dtype))
        << describe(p, dtype) << (k == 0 ? ": loss" : ": gradient of input " + std::to_string(k - 1));
  }
}

const std::vector<Problem> kCases = {
    {1, 9, 8, 4, 4, false},        // n = 1 among 9
    {4, 12, 16, 8, 1, false},      // tile 1, rank 2 of 3
    {16, 64, 32, 16, 16, false},   // rank 1 of 4
    {11, 11, 16, 0, 3, true},      // one process, strips of 3
    {300, 300, 64, 0, 128, true},  // one process, several blocks per strip row
    {96, 384, 64, 96, 1000, false},
    {300, 300, 64, 0, 0, true},  // tile 0: strips chosen for CUDA (Note [Strips on CUDA]), one here
};

TEST(FusedContrastiveCuda, SingleBranchMatchesCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  vimo::testing::seed_torch();
  const double scale = 1 / 0.07;
  for (const Problem& p : kCases) {
    const Values v = single_values(p, scale);
    for (const at::ScalarType dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
      expect_same(run_single(v, p, dtype, at::Device(at::kCUDA, 0)),
                  run_single(v, p, dtype, at::Device(at::kCPU)), p, dtype, scale / (2.0 * p.n), 1);
    }
  }
}

// Inputs on a device other than the current one: the element kernels must run on the inputs' device (they
// launched on the current device before, reading another GPU's memory). Needs two GPUs.
TEST(FusedContrastiveCuda, InputsOnAnotherDeviceThanTheCurrentOne) {
  SKIP_WITHOUT_CUDA_DEVICE();
  if (torch::cuda::device_count() < 2) GTEST_SKIP() << "needs two GPUs (this machine has one)";
  vimo::testing::seed_torch();
  const at::Device other(at::kCUDA, static_cast<c10::DeviceIndex>(torch::cuda::device_count() - 1));
  ASSERT_EQ(c10::cuda::current_device(), 0);
  for (const Problem& p : {kCases[2], kCases[4]}) {
    const Values v = single_values(p, 1 / 0.07);
    expect_same(run_single(v, p, at::kDouble, other), run_single(v, p, at::kDouble, at::Device(at::kCPU)), p,
                at::kDouble, 1 / 0.07 / (2.0 * p.n), 1);
  }
}

// Logits of ±1e4 (scale 1e4 on unit vectors), far beyond exp's range in any dtype: both devices subtract
// the max first, and on the CPU nearly every column of the one-process matrix takes the far-column path
// (Note [Shared exponentials] in kernels/fused_contrastive.cpp), which CUDA does not have. float64 within
// 1e-10. float32: a logit carries an absolute error δ ≈ 1e4·u ≈ 1e-3 on each device, differently rounded, so
// the loss (O(1e2..1e4), against max(|loss|, 1)) agrees within 1e-5 but a gradient entry whose logit lies
// within a few units of its row's max moves relatively by δ: 1e-2, the bound the CPU test
// (LogitsOfTenThousandStayFiniteAndExact) holds the CPU kernel to against float64.
TEST(FusedContrastiveCuda, LogitsOfTenThousandMatchCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  vimo::testing::seed_torch();
  const double scale = 1e4;
  for (const Problem& p : {Problem{8, 24, 16, 8, 5, false}, Problem{24, 24, 16, 0, 5, true}}) {
    const Values v = single_values(p, scale);
    for (const at::ScalarType dtype : {at::kDouble, at::kFloat}) {
      const std::vector<at::Tensor> cuda = run_single(v, p, dtype, at::Device(at::kCUDA, 0));
      const std::vector<at::Tensor> cpu = run_single(v, p, dtype, at::Device(at::kCPU));
      for (const at::Tensor& t : cuda) {
        EXPECT_TRUE(at::isfinite(t).all().item<bool>()) << describe(p, dtype) << ": logits of 1e4";
      }
      if (dtype == at::kDouble) {
        expect_same(cuda, cpu, p, dtype, scale / (2.0 * p.n), 1);
        continue;
      }
      EXPECT_LE(relative_error(cuda[0], cpu[0], 1), 1e-5) << describe(p, dtype) << ": loss";
      for (size_t k = 1; k < cuda.size(); ++k) {
        const double floor = k + 1 == cuda.size() ? 1 : scale / (2.0 * p.n);  // the scale, or an embedding
        EXPECT_LE(relative_error(cuda[k], cpu[k], floor), 1e-2)
            << describe(p, dtype) << ": gradient of input " << k - 1;
      }
    }
  }
}

TEST(FusedContrastiveCuda, GeminiRouterFormMatchesCpu) {
  SKIP_WITHOUT_CUDA_DEVICE();
  vimo::testing::seed_torch();
  for (const Problem& p : kCases) {
    // Twelve inputs in GeminiInfoNCEInputs order; the object branch 8 wider than the action branch.
    Values v;
    v.scales = 2;
    for (const int64_t width : {p.D, p.D + 8, p.D, p.D + 8}) {
      const at::Tensor all = unit_rows(p.N, width);
      v.tensors.push_back(
          p.one_process ? all : all.narrow(0, p.offset, p.n) + 0.01 * at::randn({p.n, width}, at::kDouble));
      v.tensors.push_back(all);
    }
    const at::Tensor router_all = at::softmax(at::randn({p.N, 2}, at::kDouble), 1);
    v.tensors.push_back(p.one_process ? router_all : router_all.narrow(0, p.offset, p.n).clone());
    v.tensors.push_back(router_all);
    v.tensors.push_back(at::scalar_tensor(100.0, at::kDouble));
    v.tensors.push_back(at::scalar_tensor(1 / 0.07, at::kDouble));
    auto run = [&](at::ScalarType dtype, at::Device device) {
      std::vector<at::Tensor> x = make_leaves(v, dtype, device);
      if (p.one_process) {
        for (int k = 0; k < 10; k += 2) x[k + 1] = x[k];  // the same tensor as local and all
      }
      GeminiInfoNCEInputs in{x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8], x[9], x[10], x[11]};
      at::Tensor loss = fused_gemini_infonce(in, p.offset, p.tile);
      loss.backward();
      std::vector<at::Tensor> out = {loss.detach().cpu().to(at::kDouble)};
      for (size_t k = 0; k < x.size(); ++k) {
        if (p.one_process && k < 10 && k % 2 == 1) continue;  // the same leaf as k − 1
        out.push_back(x[k].grad().cpu().to(at::kDouble));
      }
      return out;
    };
    for (const at::ScalarType dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
      expect_same(run(dtype, at::Device(at::kCUDA, 0)), run(dtype, at::Device(at::kCPU)), p, dtype,
                  (100 + 1 / 0.07) / (2.0 * p.n), 2);
    }
  }
}

}  // namespace
