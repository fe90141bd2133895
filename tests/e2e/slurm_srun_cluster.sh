#!/usr/bin/env bash
# launch/slurm/retriever_srun.sbatch submitted with sbatch to a private single-node Slurm cluster
# (slurm_common.sh): srun starts 2 ranks, which meet through vimo's rendezvous store and talk over TCP. Once
# the job has logged 3 steps it gets the SIGUSR1 that --signal=USR1@180 sends every task of the job's steps,
# and not the batch shell (`scancel --signal=USR1`); both ranks save and exit with status 75, and so does
# srun; the script runs `scontrol requeue`, and Slurm runs it again; the second run resumes from that
# checkpoint and the job ends COMPLETED with exit code 0:0, one restart and 40 logged steps. Runs as root
# (slurmd must).
source "$(dirname "$0")/slurm_common.sh"
export VIMO_RENDEZVOUS_PORT="${ports[2]}"
preempt_requeue_resume retriever_srun.sbatch
grep -q "2 ranks (launcher slurm, communication TCP" "$out" ||
  fail "the ranks were not started by srun, or do not talk over TCP: $(grep -m1 "ranks (launcher" "$out")"
for rank in 0 1; do
  grep -q "\[rank $rank\] received SIGUSR1 by the end of step" "$out" ||
    fail "rank $rank received no SIGUSR1 from Slurm: $(grep -m1 "received" "$out")"
done
echo "1 passed, 0 failed"
