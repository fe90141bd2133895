#!/usr/bin/env bash
# Runs vimo's GPU checks from a bundle made by scripts/gpu_bundle.sh (copied there as run.sh), on a machine
# with a GPU and a python3 whose torch is the bundle's version: the NCCL suite and the collective suites on
# NCCL at one rank (and at two, where mpirun exists: they skip, naming why, without a GPU per rank), the
# CUDA-vs-CPU kernel tests, compute-sanitizer's memcheck over them where it is installed, and `vimo bench
# kernels --device cuda`. Writes the log and the JSON reports to OUT (default gpu-checks); exits non-zero when
# a test failed.
#   bash BUNDLE/run.sh [OUT]      from the checkout's root
set -uo pipefail
bundle=$(cd "$(dirname "$0")" && pwd)
out=${1:-gpu-checks}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
step() { echo; echo "=== $* ($(date +%T))"; }

step machine
nvidia-smi -L || { echo "no NVIDIA GPU visible (nvidia-smi failed)"; exit 1; }
site=$(python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))') ||
  { echo "python3 has no torch: the bundle runs against python3's LibTorch"; exit 1; }
have=$(python3 -c 'import torch; print(torch.__version__.split("+")[0])')
want=$(cat "$bundle/torch_version")
if [ "$have" != "$want" ]; then
  echo "this machine's torch is $have but the bundle was built against $want; HINT: rebuild it with" \
       "VIMO_TORCH_VERSION=$have bash scripts/gpu_bundle.sh"
  exit 1
fi
echo "torch $have at $site"

mpilibs=""
if ! command -v mpirun > /dev/null || [ ! -e /usr/lib/x86_64-linux-gnu/libmpi_cxx.so.40 ]; then
  echo "no Open MPI 4 here: using the bundle's (its runtime files are copied to /, nothing overwritten)"
  cp -rn "$bundle/root/." / 2> /dev/null || echo "cannot write to /: only the one-rank runs will work"
  mpilibs="$bundle/mpilib:"
fi
nvidia_libs=$(find "$site/nvidia" -mindepth 1 -maxdepth 2 -name lib -type d 2> /dev/null | tr "\n" ":")
export LD_LIBRARY_PATH="$bundle/lib:$mpilibs$site/torch/lib:${nvidia_libs}/usr/local/cuda/lib64"
# One process without mpirun: Open MPI's singleton, kept from starting a daemon.
export OMPI_MCA_ess_singleton_isolated=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for b in "$bundle"/bin/*; do
  missing=$(ldd "$b" | grep "not found" || true)
  [ -z "$missing" ] || echo "$(basename "$b") cannot load: $missing"
done

failed=()
run() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  step "$name"
  local start=$SECONDS
  timeout "$limit" "$@"
  local code=$?
  echo "--- $name: exit $code in $((SECONDS - start)) s"
  [ "$code" -eq 0 ] || failed+=("$name")
}
run version 60 "$bundle/bin/vimo" version
run nccl_np1 300 "$bundle/bin/test_comm_nccl" --gtest_output="json:$out/nccl_np1.json"
if command -v mpirun > /dev/null; then
  run nccl_np2 300 mpirun --allow-run-as-root --oversubscribe --bind-to none -x LD_LIBRARY_PATH -np 2 \
    "$bundle/bin/test_comm_nccl"
fi
# The collective suites every backend runs, on CUDA tensors over NCCL (tests/comm/collective_reference.h).
for suite in test_comm_mpi test_comm_collectives test_comm_async; do
  if ! command -v mpirun > /dev/null; then  # one process alone: an Open MPI singleton
    run "${suite}_nccl_np1" 300 env VIMO_TEST_COMM_BACKEND=nccl "$bundle/bin/$suite" \
      --gtest_output="json:$out/${suite}_nccl_np1.json"
    continue
  fi
  nccl_mpirun=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x LD_LIBRARY_PATH
               -x VIMO_TEST_COMM_BACKEND=nccl)
  run "${suite}_nccl_np1" 300 "${nccl_mpirun[@]}" -np 1 "$bundle/bin/$suite" \
    --gtest_output="json:$out/${suite}_nccl_np1.json"
  run "${suite}_nccl_np2" 300 "${nccl_mpirun[@]}" -np 2 "$bundle/bin/$suite"  # one JSON writer only
done
run contrastive_cuda 300 "$bundle/bin/test_fused_contrastive_cuda" --gtest_output="json:$out/contrastive.json"
run dpo_cuda 300 "$bundle/bin/test_fused_linear_dpo_cuda" --gtest_output="json:$out/dpo.json"
if command -v compute-sanitizer > /dev/null; then
  for t in test_fused_contrastive_cuda test_fused_linear_dpo_cuda; do
    run "memcheck_$t" 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$bundle/bin/$t"
  done
fi
run bench_kernels_cuda 300 "$bundle/bin/vimo" bench kernels --device cuda --repetitions 9 \
  --out "$out/kernels_cuda.json"

step finished
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "every check passed; log and reports in $out"
