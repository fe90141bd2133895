#!/usr/bin/env bash
# Launches vimo on N ranks of this machine with OpenMPI: `launch/mpirun.sh N build/vimo train CONFIG ...`.
# For several nodes, call mpirun yourself with a hostfile (see README.md, "Launching"); vimo reads its rank
# and world size from OpenMPI's environment.
set -euo pipefail
ranks="$1"; shift
# Running as root (containers, CI) needs OpenMPI's explicit consent.
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
# --oversubscribe: more ranks than cores is fine for CPU demos; --bind-to none: each rank sets its own
# thread count (train.threads), so binding would only pile ranks onto one core.
exec mpirun --oversubscribe --bind-to none -np "$ranks" "$@"
