// The `vimo` command line: train, data (synth, import, pack, verify), version. Run under mpirun for several
// ranks.
#include <fmt/format.h>
#include <mpi.h>
#include <torch/version.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <optional>

#include "build_info.h"
#include "comm/communicator.h"
#include "comm/world.h"
#include "trainer/bench_comm.h"
#include "trainer/bench_data.h"
#include "trainer/bench_kernels.h"
#include "trainer/config.h"
#include "trainer/data_cli.h"
#include "trainer/preemption.h"
#include "trainer/retriever_trainer.h"
#ifdef VIMO_HAVE_CUDA
#include "comm/nccl_communicator.h"
#include "kernels/cuda/cuda_probe.h"
#endif

namespace {

int run_train(const std::string& config_path, const std::vector<std::string>& overrides, bool resume,
              const vimo::trainer::PreemptionSignals& preemption) {
  using namespace vimo;
  // mpirun's ranks are MPI's world; torchrun's or srun's (without an MPI built for Slurm) meet through the
  // rendezvous store and talk over TCP.
  comm::World world;
  try {
    world = comm::make_world_communicator();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  const std::shared_ptr<comm::Communicator> comm = world.comm;
  const bool main_rank = comm->rank() == 0;
  const comm::WorldInfo launched = comm::world_from_environment();
  trainer::Config config;
  try {
    config = trainer::load_config(config_path, overrides);
  } catch (const trainer::ConfigError& e) {
    // Every rank reads the same file and fails the same way; rank 0 speaks for all.
    if (main_rank) std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  const std::string yaml = trainer::to_yaml(config);
  if (main_rank) {
    std::printf(
        "vimo %s | %d ranks (launcher %s, communication %s) | config %s\n--- resolved config "
        "---\n%s\n-----------------------\n",
        VIMO_VERSION, comm->size(), launched.launcher.c_str(), world.how.c_str(), config_path.c_str(),
        yaml.c_str());
    std::fflush(stdout);
  }
  const trainer::TrainResult result = trainer::train_retriever(config, resume, comm, &preemption);
  return result.preempted ? trainer::kExitPreempted : 0;
}

void print_version() {
  std::printf("vimo %s\n", VIMO_VERSION);
  std::printf("LibTorch %s (built against %s, CUDA %s)\n", TORCH_VERSION, VIMO_TORCH_VERSION_BUILT,
              *VIMO_TORCH_CUDA_BUILT ? VIMO_TORCH_CUDA_BUILT : "none");
  std::printf("CUDA kernels: %s\n", VIMO_CUDA_STATUS_BUILT);
  std::printf("MPI: %s (MPI standard %s)\n", vimo::comm::mpi_library_version().c_str(),
              VIMO_MPI_VERSION_BUILT);
#ifdef VIMO_HAVE_CUDA
  std::printf("NCCL: %s (built against %s)\n", vimo::comm::nccl_library_version().c_str(),
              VIMO_NCCL_VERSION_BUILT);
  std::printf("devices: %s\n", vimo::kernels::describe_cuda_devices().c_str());
#else
  std::printf("NCCL: not built (CPU-only build)\n");
#endif
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vimo: distributed training for video-retrieval-augmented 3D motion generation (VimoRAG)"};
  app.require_subcommand(1);

  auto* train =
      app.add_subcommand("train", "Train one stage from a YAML config (run under mpirun for DP ranks)");
  std::string config_path;
  std::vector<std::string> overrides;
  bool resume = false;
  train->add_option("config", config_path, "YAML config, e.g. configs/demo/retriever_action.yaml")
      ->required()
      ->check(CLI::ExistingFile);
  train->add_option("overrides", overrides, "key.path=value overrides, e.g. optim.lr=3e-4 train.steps=500");
  train->add_flag("--resume", resume, "Continue from the newest valid checkpoint under train.out_dir");

  auto* data = app.add_subcommand("data", "Dataset tools");
  data->require_subcommand(1);
  const vimo::trainer::DataCommands data_commands(*data);
  // `vimo bench data` (BenchCommands adds `bench`), `vimo bench kernels`.
  const vimo::trainer::BenchCommands bench_commands(app);
  CLI::App* bench = app.get_subcommand("bench");
  auto* bench_kernels =
      bench->add_subcommand("kernels", "Fused losses vs their eager compositions: time, peak memory, goals");
  std::string bench_kernels_out = "runs/bench/kernels.json";
  bool bench_kernels_quick = false;
  bench_kernels->add_option("--out", bench_kernels_out, "JSON report")->capture_default_str();
  bench_kernels->add_flag("--quick", bench_kernels_quick, "Small sizes: a run of seconds (smoke test)");
  int bench_kernels_repetitions = 0;
  bench_kernels
      ->add_option("--repetitions", bench_kernels_repetitions,
                   "Timed rounds per row (default 5, --quick 3); each implementation runs once per round")
      ->check(CLI::PositiveNumber);
  int64_t bench_kernels_tile = 0, bench_kernels_chunk = 0;
  bench_kernels
      ->add_option(
          "--contrastive-tile", bench_kernels_tile,
          "Rows per strip of the fused contrastive loss (default: chosen by device, 256 on CPU; --quick 128)")
      ->check(CLI::PositiveNumber);
  bench_kernels
      ->add_option("--dpo-chunk", bench_kernels_chunk,
                   "Tokens per chunk of the fused McDPO loss (default 1024)")
      ->check(CLI::PositiveNumber);
  std::string bench_kernels_device = "cpu";
  bench_kernels
      ->add_option(
          "--device", bench_kernels_device,
          "cpu, or cuda / cuda:K in a CUDA build (times: wall time after a device synchronize; peak: "
          "LibTorch's CUDA allocator)")
      ->capture_default_str();
  auto* bench_comm = bench->add_subcommand(
      "comm",
      "Collectives through our Communicator against raw MPI (algbw, busbw, 4 KiB-256 MiB) and the share of "
      "gradient reduction hidden behind backward; run under mpirun");
  const vimo::trainer::CommBenchCommand comm_bench(*bench_comm);

  auto* version = app.add_subcommand("version", "Print the versions of vimo, LibTorch, CUDA, NCCL and MPI");

  CLI11_PARSE(app, argc, argv);
  // `vimo train` takes SIGTERM / SIGUSR1 as a request to save and stop (trainer/preemption.h) from before MPI
  // starts until the process ends: one arriving while the ranks start, or rendezvous, stops the run after its
  // first step; one after the last step is ignored. Elsewhere the default action (end the process) stays.
  std::optional<vimo::trainer::PreemptionSignals> preemption;
  if (*train) preemption.emplace();
  vimo::comm::MpiRuntime mpi(&argc, &argv);
  try {
    if (*train) return run_train(config_path, overrides, resume, *preemption);
    if (const std::optional<int> code = data_commands.run()) return *code;
    if (const std::optional<int> code = bench_commands.run()) return *code;
    if (*bench_comm) return comm_bench.run();
    if (*bench_kernels) {
      vimo::trainer::KernelBenchOptions options = bench_kernels_quick
                                                      ? vimo::trainer::KernelBenchOptions::quick()
                                                      : vimo::trainer::KernelBenchOptions{};
      options.out = bench_kernels_out;
      if (bench_kernels_repetitions > 0) options.repetitions = bench_kernels_repetitions;
      options.device = bench_kernels_device;
      if (bench_kernels_tile > 0) options.contrastive_tile = bench_kernels_tile;
      if (bench_kernels_chunk > 0) options.dpo_chunk_tokens = bench_kernels_chunk;
      vimo::trainer::print_kernel_bench(vimo::trainer::run_kernel_bench(options));
      std::printf("\nwrote %s\n", options.out.c_str());
      return 0;
    }
    if (*version) print_version();
    return 0;
  } catch (const std::exception& e) {
    // The launcher's rank: under torchrun, MPI sees each process as rank 0 of 1.
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    try {
      rank = vimo::comm::world_from_environment().rank;
    } catch (const std::exception&) {
      // a malformed launcher variable: keep MPI's rank
    }
    std::fprintf(stderr, "[rank %d] error: %s\n", rank, e.what());
    std::fflush(stderr);
    // Peers may be blocked in a collective this rank will never join: take the whole job down. (Over TCP
    // they see this rank's connections close when it exits, and fail naming it.)
    int size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
}
