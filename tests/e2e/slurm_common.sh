# Shared by the e2e tests that submit a job script to a private single-node Slurm cluster (slurm_cluster.sh,
# slurm_srun_cluster.sh): starts munged, slurmctld and slurmd from Debian on free ports, with all state in the
# scratch directory and every daemon stopped on exit, and defines preempt_requeue_resume, the check they
# share. Runs as root (slurmd must); skips with status 77 otherwise.
# Note [A fast requeue]: Slurm holds a requeued job until its credentials expire (AuthInfo cred_expire, 120 s
# by default) and starts it at the next pass of the main scheduling loop (sched_interval, 60 s by default);
# this cluster sets them to 5 s (the least Slurm takes) and 1 s: a test takes about 20 s, not 3 minutes.
if [ "$(id -u)" -ne 0 ]; then  # ctest counts status 77 as skipped (SKIP_RETURN_CODE in CMakeLists.txt)
  echo "SKIPPED: a private Slurm cluster needs root (slurmd starts each job's processes as the job's user)"
  exit 77
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
for daemon in munged slurmctld slurmd; do
  [ -x "/usr/sbin/$daemon" ] ||
    fail "/usr/sbin/$daemon is missing. HINT: apt-get install --no-install-recommends slurmctld slurmd slurm-client munge (scripts/setup.sh does)"
done
for client in sbatch scontrol scancel sinfo squeue; do
  command -v "$client" > /dev/null || fail "$client is missing. HINT: apt-get install --no-install-recommends slurm-client"
done

cluster="$work/cluster"
mkdir -p "$cluster/state" "$cluster/spool"
# The daemons fork away from this shell: where nothing reaps them (a container's init may not), a stopped one
# stays a zombie, which `kill -0` still finds.
pid_alive() { [ -d "/proc/$1" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2> /dev/null; }
# Stops the cluster's jobs and daemons (by their pid files), then removes the scratch directory.
stop_cluster() {
  local daemon pid waited=0
  if [ -f "$cluster/slurmctld.pid" ] && scancel --quiet --user="$(id -un)" 2> /dev/null; then
    while [ -n "$(squeue -h 2> /dev/null)" ] && [ "$waited" -lt 100 ]; do sleep 0.1; waited=$((waited + 1)); done
  fi
  for daemon in slurmctld slurmd munged; do
    [ -f "$cluster/$daemon.pid" ] || continue
    pid=$(cat "$cluster/$daemon.pid")
    kill -TERM "$pid" 2> /dev/null || continue
    waited=0
    while pid_alive "$pid" && [ "$waited" -lt 100 ]; do sleep 0.1; waited=$((waited + 1)); done
    if pid_alive "$pid"; then kill -KILL "$pid" 2> /dev/null || true; fi
  done
  rm -rf "$work"
}
trap stop_cluster EXIT

# Three free TCP ports, from $$ onward: parallel runs and leftover clusters pick others. slurmctld's,
# slurmd's, and one for the rendezvous store of ranks that srun starts (its default, derived from the job id,
# would be the same in two clusters run at once: each numbers its jobs from 1).
port_free() { [ -z "$(ss -Hltn "sport = :$1")" ]; }
ports=()
port=$((20000 + ($$ * 3) % 20000))
while [ "${#ports[@]}" -lt 3 ]; do
  port_free "$port" && ports+=("$port")
  port=$((port + 1))
done

head -c 1024 /dev/urandom > "$cluster/munge.key"
chmod 600 "$cluster/munge.key"
/usr/sbin/munged --force --socket="$cluster/munge.socket" --key-file="$cluster/munge.key" \
  --pid-file="$cluster/munged.pid" --log-file="$cluster/munged.log" --seed-file="$cluster/munge.seed" ||
  fail "munged did not start: $(tail -3 "$cluster/munged.log" 2> /dev/null)"

host=$(hostname -s)
cat > "$cluster/slurm.conf" << CONF
ClusterName=vimotest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${ports[0]}
SlurmdPort=${ports[1]}
AuthType=auth/munge
CredType=cred/munge
# Note [A fast requeue]
AuthInfo=socket=$cluster/munge.socket,cred_expire=5
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
StateSaveLocation=$cluster/state
SlurmdSpoolDir=$cluster/spool
SlurmctldPidFile=$cluster/slurmctld.pid
SlurmdPidFile=$cluster/slurmd.pid
SlurmctldLogFile=$cluster/slurmctld.log
SlurmdLogFile=$cluster/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
# A machine with fewer cores than the 2 ranks' still registers its node.
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$cluster/slurm.conf"  # the job inherits it, and with it its `scontrol requeue`
/usr/sbin/slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start: $(tail -3 "$cluster/slurmctld.log")"
/usr/sbin/slurmd -f "$SLURM_CONF" || fail "slurmd did not start: $(tail -3 "$cluster/slurmd.log")"
# Polls `$1` (a command) every 0.1 s for up to `$2` seconds; fails with `$3` and the cluster's state if it
# never succeeds, or with `$3` as soon as `$4` (a command, optional) does and `$1` still does not: the job
# may have reached both between the two questions (COMPLETED after `completed` saw it RUNNING).
wait_until() {
  local tries=0
  until "$1"; do
    if [ -n "${4:-}" ] && "$4"; then
      "$1" && return 0
      fail "$3:"$'\n'"$(cluster_facts)"
    fi
    tries=$((tries + 1))
    [ "$tries" -lt $(($2 * 10)) ] || fail "$3 within $2 s:"$'\n'"$(cluster_facts)"
    sleep 0.1
  done
}
cluster_facts() {
  sinfo -h -N -o 'node %N %T %E'
  [ -z "${id:-}" ] || echo "job $id: $(scontrol show job "$id" | grep -o -E '\b(JobState|Reason|Restarts|ExitCode)=[^ ]*' | tr '\n' ' ')"
  tail -n 5 "$cluster/slurmctld.log" "$cluster/slurmd.log" ${out:+"$out"} 2> /dev/null
}
node_idle() { [ "$(sinfo -h -n "$host" -o %T 2> /dev/null)" = idle ]; }
wait_until node_idle 30 "the node did not become idle"

# The job's working directory, as on a cluster: build/vimo, runs/ for the output, the dataset.
job_dir="$work/job"
mkdir -p "$job_dir/build" "$job_dir/runs"
ln -s "$(realpath "$vimo")" "$job_dir/build/vimo"

job_field() { scontrol show job "$id" | grep -o "\b$1=[^ ]*" | head -1 | cut -d= -f2; }
three_steps_logged() { [ -f "$metrics" ] && [ "$(grep -c '"loss"' "$metrics")" -ge 3 ]; }
job_ended() { case "$(job_field JobState)" in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) ;; *) false ;; esac; }
requeued() { [ "$(job_field Restarts)" = 1 ]; }
completed() { [ "$(job_field JobState)" = COMPLETED ]; }

# Submits launch/slurm/$1 with 2 tasks on the one node. Once the job has logged 3 steps, sends it the signal
# its `#SBATCH --signal=[B:]SIG@SECONDS` line asks Slurm to send before the time limit, to the process that
# line names (with B:, the batch shell alone; without, every task of the job's steps, and not the shell).
# Then checks that both ranks saved that step and stopped, the script requeued the job, Slurm ran it once
# more, and the second run resumed from the saved step and completed (exit code 0:0, 40 logged steps in
# all). Leaves the job's id in `id` and its output, both runs appended (--open-mode=append), in `out`.
preempt_requeue_resume() {
  local script="$source_dir/launch/slurm/$1" spec step
  spec=$(sed -n 's/^#SBATCH --signal=\([^ ]*\).*/\1/p' "$script")
  [ -n "$spec" ] || fail "$script has no '#SBATCH --signal=' line"
  local signal="${spec#*:}" to=()
  signal="${signal%@*}"
  case "$spec" in *B*:*) to=(--batch) ;; esac
  # The script asks for 2 nodes of 8 GPUs: this cluster has one node, 2 cores and no GPU.
  id=$(cd "$job_dir" && sbatch --parsable --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 \
    "$script" "$source_dir/configs/demo/retriever_action.yaml" $tiny train.steps=40 train.out_dir=run) ||
    fail "sbatch refused the job"
  out="$job_dir/runs/slurm-$id.out"
  metrics="$job_dir/run/metrics.jsonl"
  wait_until three_steps_logged 60 "the job logged no 3 steps" job_ended
  scancel "${to[@]}" --signal="$signal" "$id"  # what --signal=$spec does before the time limit
  wait_until requeued 30 "Slurm did not requeue the job" job_ended
  wait_until completed 120 "the requeued job did not complete" job_ended
  cluster_facts | grep "^job"
  [ "$(job_field ExitCode)" = 0:0 ] || fail "the job completed with exit code $(job_field ExitCode), not 0:0"
  [ "$(job_field Restarts)" = 1 ] || fail "the job ran $(job_field Restarts) times more, not once"

  step=$(grep -o "preempted: a SIGTERM or SIGUSR1 reached 2 of 2 ranks by the end of step [0-9]*" "$out" | grep -o '[0-9]*$') ||
    fail "no preemption message for both ranks in $out: $(grep -m1 preempt "$out")"
  [ "$step" -lt 40 ] || fail "the run finished before the signal took effect"
  grep -q "preempted: .* by the end of step $step; checkpoint .*step_$(printf %08d "$step") holds it" "$out" ||
    fail "the preemption message names no checkpoint of step $step: $(grep -m1 preempted "$out")"
  grep -q "requeueing job $id" "$out" || fail "the job script did not say it requeues job $id: $(tail -3 "$out")"
  grep -q "resumed from .*step_$(printf %08d "$step") (step $step" "$out" ||
    fail "the requeued job did not resume from step $step: $(grep -m1 resum "$out")"
  [ "$(losses "$metrics" | wc -l)" -eq 40 ] || fail "expected 40 logged steps in all, found $(losses "$metrics" | wc -l)"
  echo "$1: preempted after step $step (scancel ${to[*]:+${to[*]} }--signal=$signal), requeued by Slurm," \
    "resumed and completed"
}
