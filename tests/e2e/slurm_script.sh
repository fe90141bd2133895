#!/usr/bin/env bash
# launch/slurm/retriever.sbatch run as Slurm would run it, with the real mpirun and vimo and a stand-in
# `scontrol` that records its arguments: the SIGUSR1 Slurm sends the script before the time limit
# (--signal=B:USR1@180) reaches every rank through mpirun, the ranks save and exit with status 75, and the
# script requeues the job; the requeued job resumes from that checkpoint and finishes with status 0.
source "$(dirname "$0")/common.sh"
mkdir -p "$work/job/build" "$work/bin"
ln -s "$(realpath "$vimo")" "$work/job/build/vimo"  # the script runs build/vimo from the job's working directory
printf '#!/bin/sh\necho "$@" >> "%s"\n' "$work/scontrol.log" > "$work/bin/scontrol"
chmod +x "$work/bin/scontrol"
export PATH="$work/bin:$PATH" SLURM_JOB_ID=4242 SLURM_CPUS_PER_TASK=1
job=("$source_dir/launch/slurm/retriever.sbatch" "$source_dir/configs/demo/retriever_action.yaml" $tiny
  train.steps=40 train.out_dir=run)
# mpirun inside the script starts one rank per core here: ask it to allow more where there are few.
export OMPI_MCA_rmaps_base_oversubscribe=1
(cd "$work/job" && exec bash "${job[@]}" > "$work/job1.log" 2>&1) &
pid=$!
waited=0
until [ -f "$work/job/run/metrics.jsonl" ] && [ "$(grep -c '"loss"' "$work/job/run/metrics.jsonl")" -ge 3 ]; do
  sleep 0.05
  waited=$((waited + 1))
  [ "$waited" -lt 1200 ] || fail "no step logged within 60 s: $(tail -3 "$work/job1.log")"
done
kill -USR1 "$pid"  # what Slurm's --signal=B:USR1@180 does
status=0
wait "$pid" || status=$?
[ "$status" -eq 75 ] || fail "the job script exited with status $status, not 75: $(tail -5 "$work/job1.log")"
grep -qx "requeue 4242" "$work/scontrol.log" || fail "the job script did not requeue the job"
grep -q "preempted: a SIGTERM or SIGUSR1 reached .* ranks by the end of step" "$work/job1.log" ||
  fail "no preemption message: $(tail -5 "$work/job1.log")"
step=$(losses "$work/job/run/metrics.jsonl" | tail -1 | cut -d' ' -f1)
[ "$step" -lt 40 ] || fail "the run finished before the signal took effect"
# The requeued job: the same script, which passes --resume.
(cd "$work/job" && bash "${job[@]}" > "$work/job2.log" 2>&1) || fail "the requeued job failed: $(tail -5 "$work/job2.log")"
grep -q "resumed from .*step_$(printf %08d "$step") (step $step" "$work/job2.log" ||
  fail "the requeued job did not resume from step $step: $(grep -m1 resum "$work/job2.log")"
[ "$(losses "$work/job/run/metrics.jsonl" | wc -l)" -eq 40 ] || fail "expected 40 logged steps in all"
[ "$(wc -l < "$work/scontrol.log")" -eq 1 ] || fail "the finished job requeued itself"
echo "stopped after step $step, requeued, resumed and finished"
echo "1 passed, 0 failed"
