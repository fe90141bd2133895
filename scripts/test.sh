#!/usr/bin/env bash
# Sets up, builds everything, and runs the whole ctest suite (unit, multi-rank under mpirun, end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
VIMO_SETUP_TESTS=1 bash scripts/build.sh  # the tests' own packages too (scripts/setup.sh)
cd "${VIMO_BUILD_DIR:-build}"
# Multi-rank tests declare PROCESSORS, so -j never runs more ranks at once than the machine has cores.
ctest --output-on-failure -j "$(nproc)" --timeout 900
