#!/usr/bin/env bash
# launch/slurm/retriever.sbatch submitted with sbatch to a private single-node Slurm cluster
# (slurm_common.sh): once the job has logged 3 steps it gets the SIGUSR1 that --signal=B:USR1@180 sends the
# batch shell, which passes it to mpirun, which passes it to both ranks; the ranks save and exit with status
# 75, the script runs `scontrol requeue`, and Slurm runs it again; the second run resumes from that checkpoint
# and the job ends COMPLETED with exit code 0:0, one restart and 40 logged steps. Runs as root (slurmd must).
source "$(dirname "$0")/slurm_common.sh"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
preempt_requeue_resume retriever.sbatch
echo "1 passed, 0 failed"
