// Defines the fused-kernel benchmark behind `vimo bench kernels`: forward + backward of each fused loss and
// of its eager LibTorch composition, side by side in one process (McDPO: fused linear kernel vs eager logits
// + log_softmax + autograd, plus the bare LM-head products as the floor; Gemini-MVR contrastive: the tiled
// symmetric InfoNCE vs the eager composition with S computed once, plus the composition that computes both
// directions as separate products as a reference), with time (median of the repetitions, wall and process
// CPU) and peak memory measured by a counting CPU allocator, the ratios, and issue 4's goals met or not. See
// Note [What the kernel benchmark measures] in bench_kernels.cpp.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace vimo::trainer {

struct KernelBenchOptions {
  // McDPO: B pairs (2B rows) of T positions, the first `dpo_prompt` of each row a prompt, the rest the
  // answer; hidden H, one row per vocabulary size V. float32.
  int64_t dpo_pairs = 4, dpo_positions = 256, dpo_hidden = 512, dpo_prompt = 64;
  std::vector<int64_t> dpo_vocabularies = {8192, 32768};
  int64_t dpo_chunk_tokens = 1024;  // LmHeadChunking::tokens of the fused kernel
  // Contrastive: one row per batch size N (n = N, single process), embedding width D, column tile. float32.
  std::vector<int64_t> contrastive_sizes = {1024, 4096};
  // contrastive_tile 0: chosen for the device (256 rows on CPU; Note [Strips on CUDA] in the kernel).
  int64_t contrastive_dim = 768, contrastive_tile = 0;
  int repetitions = 5;  // timed rounds per row after one warm-up (every implementation once per round)
  int threads = 0;      // LibTorch intra-op threads for the run; 0 keeps the current setting
  // "cpu", or "cuda" / "cuda:K" in a CUDA build: where the inputs live and the losses run. On CUDA the
  // times are wall times around a device synchronize and the peaks come from LibTorch's CUDA allocator.
  std::string device = "cpu";
  std::string out;  // JSON report path; empty: none

  // Small sizes for a run of a few seconds (smoke tests, CI): V ∈ {1024, 2048}, T = 64, H = 128; N ∈ {256,
  // 512}, D = 128.
  static KernelBenchOptions quick();
};

// Runs every row and returns the report: per row the fused and eager (and, for McDPO, bare-product) median
// wall and CPU times, peak MiB, the ratios (medians of per-round ratios, Note [What the kernel benchmark
// measures]) and the goals (McDPO: ≥ 1.5× faster and ≥ 3× less peak memory than eager, within 1.3× of the
// bare products on the same tokens; contrastive: ≥ 2× faster than eager, the one-product composition), with
// the options and the machine (threads, OMP_WAIT_POLICY, nproc, load average). Writes it to options.out when
// set (parent directories created). Installs the counting allocator (c10::SetCPUAllocator) on first use.
// Throws std::invalid_argument for a device that is not "cpu" or "cuda[:K]", and when CUDA was asked for but
// is not built in or not visible.
nlohmann::json run_kernel_bench(const KernelBenchOptions& options);

// Prints the report as tables on stdout.
void print_kernel_bench(const nlohmann::json& report);

}  // namespace vimo::trainer
