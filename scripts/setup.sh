#!/usr/bin/env bash
# Installs everything vimo needs on a fresh Debian machine, idempotently.
#   - Debian packages (skipped when all are already installed)
#   - LibTorch from the pinned PyPI `torch` wheel, into a cache outside the checkout keyed by version
# Prints the lines `VIMO_TORCH_PREFIX=...` for the build to consume (scripts/build.sh sources this).
set -euo pipefail

# Note [Torch pin]: torch 2.14.1's wheel requires nvidia-cuda-runtime 13.0.x (read from the wheel's
# metadata with `pip install --dry-run --report`), which matches the CUDA 13.0 toolkit (nvcc) that builds our
# kernels: the CUDA major (and here also the minor) of our kernels equals LibTorch's. 2.15.0 moved to 13.2.
VIMO_TORCH_VERSION="${VIMO_TORCH_VERSION:-2.14.1}"
VIMO_CACHE="${VIMO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vimo}"
TORCH_VENV="$VIMO_CACHE/torch-$VIMO_TORCH_VERSION"

DEBIAN_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git python3-venv
  openmpi-bin libopenmpi-dev
  libyaml-cpp-dev libboost-dev libboost-system-dev
  libcli11-dev libspdlog-dev libfmt-dev nlohmann-json3-dev
  libxxhash-dev libzstd-dev libsentencepiece-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  clang-14 libclang-rt-14-dev  # libFuzzer and ASan for tests/fuzz/run_fuzz.sh
)
# Only for the tests (scripts/test.sh sets VIMO_SETUP_TESTS=1): the private Slurm cluster of
# tests/e2e/slurm_common.sh. A build or the demo does not need Slurm daemons on the machine.
if [ "${VIMO_SETUP_TESTS:-0}" = 1 ]; then
  DEBIAN_PACKAGES+=(slurmctld slurmd slurm-client munge)
fi

log() { echo "[setup] $*" >&2; }

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # Installing slurmd, slurmctld and munge would start them as system services (munged with the machine's
  # key, slurmd failing without /etc/slurm/slurm.conf); the test starts its own. A policy-rc.d that answers
  # 101 ("action forbidden") stops invoke-rc.d and deb-systemd-invoke from starting any; Docker images ship
  # one, so it is written only where there is none, and removed after.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    trap '$SUDO rm -f "$policy"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM  # through the EXIT trap: an interrupted install must not leave the policy behind
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
  fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$policy" ]; then $SUDO rm -f "$policy"; trap - EXIT INT TERM; fi
else
  log "Debian packages present"
fi

# LibTorch from the wheel. The marker file is written only after a complete install, so an interrupted
# install is redone rather than trusted.
if [ ! -f "$TORCH_VENV/.vimo-complete" ]; then
  log "installing torch==$VIMO_TORCH_VERSION from PyPI into $TORCH_VENV (one time, several GB)"
  rm -rf "$TORCH_VENV"
  mkdir -p "$VIMO_CACHE"
  python3 -m venv "$TORCH_VENV"
  "$TORCH_VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$VIMO_TORCH_VERSION"
  touch "$TORCH_VENV/.vimo-complete"
else
  log "torch $VIMO_TORCH_VERSION present in $TORCH_VENV"
fi

TORCH_DIR=$("$TORCH_VENV/bin/python" -W ignore -c 'import torch, os; print(os.path.dirname(torch.__file__))')
TORCH_ABI=$("$TORCH_VENV/bin/python" -W ignore -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
TORCH_CUDA=$("$TORCH_VENV/bin/python" -W ignore -c 'import torch; print(torch.version.cuda or "")')
echo "VIMO_TORCH_PREFIX=$TORCH_DIR/share/cmake"
echo "VIMO_TORCH_LIB=$TORCH_DIR/lib"
echo "VIMO_TORCH_CXX11_ABI=$TORCH_ABI"
echo "VIMO_TORCH_CUDA=$TORCH_CUDA"
