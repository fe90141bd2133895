#!/usr/bin/env bash
# A preemption signal during start-up reaches launch/slurm/retriever.sbatch (run with a stand-in scontrol, as
# in slurm_script.sh): once mpirun exists but has started no rank ("mpirun_starting"), and once its rank
# processes exist but are still loading LibTorch ("ranks_loading"), 3 times each. Each time the run must stop
# with status 75 and the script requeue the job. Before, the first was lost (the run went on to its end) and
# the second killed the rank by the signal's default action (status 138, no requeue).
source "$(dirname "$0")/common.sh"
export OMPI_MCA_rmaps_base_oversubscribe=1
mkdir -p "$work/job/build" "$work/bin"
ln -s "$(realpath "$vimo")" "$work/job/build/vimo"
printf '#!/bin/sh\necho "$@" >> "%s"\n' "$work/scontrol.log" > "$work/bin/scontrol"
chmod +x "$work/bin/scontrol"
export PATH="$work/bin:$PATH" SLURM_JOB_ID=4242 SLURM_CPUS_PER_TASK=1
config="$source_dir/configs/demo/retriever_action.yaml"
bad=0
# Polls `$1` (a command) every millisecond for up to 20 s.
poll() { local n=0; until "$@"; do sleep 0.001; n=$((n + 1)); [ "$n" -lt 20000 ] || return 1; done; }
report() {  # name, run, status, requeued?, expected status, expect requeue?
  local verdict=ok
  if [ "$3" -ne "$5" ] || [ "$4" != "$6" ]; then verdict=WRONG; bad=$((bad + 1)); fi
  echo "$1 run $2: status $3 (expected $5), requeued: $4 (expected $6) -> $verdict"
}
is_vimo() { [ "$(readlink "/proc/$1/exe" 2> /dev/null)" = "$(realpath "$vimo")" ]; }
for run in 1 2 3; do
  for case in mpirun_starting ranks_loading; do
    rm -rf "$work/job/run" "$work/scontrol.log"
    (cd "$work/job" && exec bash "$source_dir/launch/slurm/retriever.sbatch" "$config" $tiny train.steps=400 \
      train.out_dir=run > "$work/$case.log" 2>&1) &
    pid=$!
    mpirun_pid() { pgrep -P "$pid" > /dev/null; }
    ranks_exist() { local m; m=$(pgrep -P "$pid") && pgrep -P "$m" > /dev/null; }
    if [ "$case" = mpirun_starting ]; then poll mpirun_pid; else poll ranks_exist; fi || fail "$case: no mpirun"
    kill -USR1 "$pid"  # what Slurm's --signal=B:USR1@180 does
    status=0; wait "$pid" || status=$?
    requeued=no; grep -qx "requeue 4242" "$work/scontrol.log" 2> /dev/null && requeued=yes
    report "$case" "$run" "$status" "$requeued" 75 yes
    [ "$status" -eq 75 ] || echo "    $(grep -h -E 'Forwarding|exited on signal|step +[0-9]+/400|held-out' "$work/$case.log" | tail -3 | tr '\n' '|')"
  done
done
[ "$bad" -eq 0 ] || fail "$bad of 6 runs did not stop with status 75 (and a requeue) for a signal during start-up"
echo "1 passed, 0 failed"
