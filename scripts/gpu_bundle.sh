#!/usr/bin/env bash
# Packs vimo's GPU checks for a machine that has a GPU and a python3 with torch but none of vimo's build
# dependencies (a lent or shared GPU box): builds vimo here against that machine's torch version, then writes
# DIR with the stripped binaries, the shared libraries they need that LibTorch and CUDA do not provide (the
# Open MPI runtime apart, for machines without one), and run.sh, which runs the CUDA and NCCL tests and the
# CUDA kernel benchmark there against that machine's LibTorch and NCCL.
#
#   VIMO_TORCH_VERSION=2.11.0 bash scripts/gpu_bundle.sh DIR    # here; the version must equal the GPU machine's
#   bash DIR/run.sh [OUT]                                       # there, from the checkout's root
#
# LibTorch has no stable C++ ABI across versions, so the build must use the very wheel the GPU machine holds
# (`python3 -c 'import torch; print(torch.__version__)'` there). Needs nvcc here (VIMO_CUDA=ON).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 1 ] || { echo "usage: VIMO_TORCH_VERSION=X bash scripts/gpu_bundle.sh DIR" >&2; exit 2; }
out=$1
version=${VIMO_TORCH_VERSION:-2.11.0}
build_dir=${VIMO_BUILD_DIR:-build-gpu-$version}
binaries=(vimo tests/comm/test_comm_nccl tests/comm/test_comm_mpi tests/comm/test_comm_collectives
          tests/comm/test_comm_async tests/kernels/test_fused_contrastive_cuda
          tests/kernels/test_fused_linear_dpo_cuda)

VIMO_TORCH_VERSION=$version VIMO_BUILD_DIR=$build_dir VIMO_CUDA=ON \
  VIMO_TARGETS="vimo test_comm_nccl test_comm_mpi test_comm_collectives test_comm_async
                test_fused_contrastive_cuda test_fused_linear_dpo_cuda" \
  bash scripts/build.sh

rm -rf "${out:?}/bin" "${out:?}/lib" "${out:?}/mpilib" "${out:?}/root"
mkdir -p "$out/bin" "$out/lib" "$out/mpilib" "$out/root/usr/lib/x86_64-linux-gnu" "$out/root/usr/share" \
  "$out/root/usr/bin" "$out/root/etc"
for b in "${binaries[@]}"; do cp "$build_dir/$b" "$out/bin/"; done
strip --strip-debug "$out"/bin/*

# Every library the binaries load except LibTorch's, CUDA's and the C/C++ runtime's (the GPU machine's own
# are newer or the same). Open MPI and what only it needs go to mpilib/, used only where MPI is missing.
system='libc\.so|libm\.so|libpthread|libdl\.so|librt\.so|ld-linux|libgcc_s|libstdc\+\+|libutil\.so'
for b in "$out"/bin/*; do ldd "$b"; done | awk '/=>/ {print $3}' | sort -u |
  grep -v -E "torch-$version|/usr/local/cuda|$system" | while read -r lib; do cp -L "$lib" "$out/lib/"; done
cp -a /usr/lib/x86_64-linux-gnu/openmpi "$out/root/usr/lib/x86_64-linux-gnu/"
cp -a /usr/share/openmpi "$out/root/usr/share/"
cp -a /etc/openmpi "$out/root/etc/"
cp -a /usr/bin/orterun /usr/bin/orted "$out/root/usr/bin/"
for c in /usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3/*.so; do ldd "$c"; done | awk '/=>/ {print $3}' |
  sort -u | grep -v -E "$system" | while read -r lib; do
    [ -f "$out/lib/$(basename "$lib")" ] || cp -L "$lib" "$out/lib/"
  done
for f in "$out"/lib/*; do
  case $(basename "$f") in
    libmpi* | libopen-* | libmca_* | liboshmem* | libpmix* | libhwloc* | libevent* | libuc[mpst]* | \
      libfabric* | libpsm* | libinfinipath* | libibverbs* | librdmacm* | libefa* | libnl-* | libmunge* | \
      libnuma* | libatomic*) mv "$f" "$out/mpilib/" ;;
  esac
done
cp scripts/gpu_bundle_run.sh "$out/run.sh"
echo "$version" > "$out/torch_version"
du -sh "$out"
echo "wrote $out: on the GPU machine, from the checkout's root: bash $out/run.sh [OUT]"
