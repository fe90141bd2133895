#!/usr/bin/env bash
# Training launched without MPI, the way torchrun (or srun without PMI) starts ranks: each process gets RANK,
# WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (or srun's SLURM_* variables), MPI sees each process
# alone, and the ranks meet through the rendezvous store and talk over TCP. Two ranks must log the same
# losses, bit for bit, as the same run under mpirun (with two ranks every sum is a + b, whichever backend
# adds), with the gradients all-reduced through shared memory (the default on one host) and through TCP
# itself. A rank stopped or killed mid-run ends the other with an error naming it. Without
# VIMO_RENDEZVOUS_TOKEN the run stops at once with an error naming it.
source "$(dirname "$0")/common.sh"
export VIMO_COMM_TIMEOUT_S=60  # a rank that never comes fails the test in a minute, not ten
config="$source_dir/configs/demo/retriever_action.yaml"
args="$tiny train.steps=8 train.eval_every=0"

# Starts `vimo train` as $1 ranks with torchrun's variables and waits for all of them; the rest are arguments
# of `vimo train`. Logs go to $work/<out>.rank<r>.log; returns non-zero if any rank failed.
torchrun_like() {
  local n="$1" out="$2"; shift 2
  local port; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  local pids=() r status=0
  for ((r = 0; r < n; r++)); do
    env -u OMPI_COMM_WORLD_RANK -u OMPI_COMM_WORLD_SIZE RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r LOCAL_WORLD_SIZE=$n \
      MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$vimo" train "$config" $args train.out_dir="$work/$out" "$@" \
      > "$work/$out.rank$r.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  return $status
}

run_ranks 2 train "$config" $args train.out_dir="$work/mpi" > /dev/null
export VIMO_RENDEZVOUS_TOKEN="e2e-$$-$RANDOM"
torchrun_like 2 shm || { cat "$work"/shm.rank*.log; fail "the torchrun-style run failed"; }
torchrun_like 2 tcp train.shared_memory_allreduce=false || { cat "$work"/tcp.rank*.log; fail "the TCP run failed"; }
grep -q "2 ranks (launcher torchrun, communication TCP" "$work/shm.rank0.log" \
  || { cat "$work/shm.rank0.log"; fail "rank 0 does not log that it runs over TCP"; }
grep -q "all-reduced through shared memory" "$work/shm.rank0.log" || fail "the first run did not use shared memory"
grep -q "all-reduced through tcp" "$work/tcp.rank0.log" || { cat "$work/tcp.rank0.log"; fail "the second run did not all-reduce over TCP"; }
[ "$(losses "$work/mpi/metrics.jsonl" | wc -l)" -ge 2 ] || fail "the mpirun run logged no losses"
for run in shm tcp; do
  diff <(losses "$work/mpi/metrics.jsonl") <(losses "$work/$run/metrics.jsonl") \
    || fail "the torchrun-style run ($run) logged other losses than the same run under mpirun"
done

# Slurm's srun without PMI: the same, from SLURM_* variables (the store on the job's first host, its port
# derived from the job id). SLURM_JOBID, SLURM_NODELIST and SLURM_STEP_ID, which srun sets too, make Open MPI 4
# abort a process that vimo did not shield (Note [srun without PMI] in comm/launcher_env.cpp).
job=$((RANDOM + 1))
pids=()
for r in 0 1; do
  env -u OMPI_COMM_WORLD_RANK -u OMPI_COMM_WORLD_SIZE SLURM_PROCID=$r SLURM_NTASKS=2 SLURM_LOCALID=$r SLURM_NODEID=0 \
    SLURM_NTASKS_PER_NODE=2 SLURM_JOB_NODELIST="$(hostname)" SLURM_STEP_NODELIST="$(hostname)" SLURM_JOB_ID=$job \
    SLURM_JOBID=$job SLURM_NODELIST="$(hostname)" SLURM_STEP_ID=0 \
    "$vimo" train "$config" $args train.steps=4 train.out_dir="$work/srun" > "$work/srun.rank$r.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { cat "$work"/srun.rank*.log; fail "the srun-style run failed"; }; done
grep -q "2 ranks (launcher slurm, communication TCP" "$work/srun.rank0.log" \
  || { cat "$work/srun.rank0.log"; fail "the srun-style run does not log TCP"; }

# Hang detection over TCP: a long run, rank 1 stopped (SIGSTOP: its connections stay open) or killed mid-run;
# rank 0 must exit non-zero within the watchdog timeout plus a margin, naming rank 1.
for signal in STOP KILL; do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  pids=()
  for r in 0 1; do
    env -u OMPI_COMM_WORLD_RANK -u OMPI_COMM_WORLD_SIZE RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 \
      MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$vimo" train "$config" $tiny train.steps=1000000 train.eval_every=0 \
      train.log_every=20 train.checkpoint_every=1000000 train.watchdog_timeout_s=3 train.out_dir="$work/$signal" \
      > "$work/$signal.rank$r.log" 2>&1 &
    pids+=($!)
  done
  deadline=$((SECONDS + 60))
  until grep -q "step *20/" "$work/$signal.rank0.log"; do
    [ $SECONDS -lt $deadline ] || { kill -9 "${pids[@]}"; fail "no step 20 within 60 s ($signal)"; }
    sleep 0.2
  done
  kill -$signal "${pids[1]}"
  start=$SECONDS
  while kill -0 "${pids[0]}" 2>/dev/null && [ $((SECONDS - start)) -lt 30 ]; do sleep 0.2; done
  kill -0 "${pids[0]}" 2>/dev/null && { kill -9 "${pids[@]}"; fail "rank 0 still runs 30 s after rank 1 got SIG$signal"; }
  set +e; wait "${pids[0]}"; code=$?; set -e
  kill -CONT "${pids[1]}" 2>/dev/null || true
  kill -9 "${pids[1]}" 2>/dev/null || true
  wait "${pids[1]}" 2>/dev/null || true
  [ "$code" -ne 0 ] || fail "rank 0 exited 0 after rank 1 got SIG$signal"
  grep -q "rank 1" "$work/$signal.rank0.log" || { cat "$work/$signal.rank0.log"; fail "rank 0 does not name rank 1 (SIG$signal)"; }
done
grep -q "vimo watchdog \[rank 0 on .*\]: rank 1 (host .*) sent no heartbeat" "$work/STOP.rank0.log" \
  || { cat "$work/STOP.rank0.log"; fail "no watchdog message for the stopped rank"; }

unset VIMO_RENDEZVOUS_TOKEN
if torchrun_like 2 no_token; then fail "a run without VIMO_RENDEZVOUS_TOKEN was accepted"; fi
grep -q "error: .*VIMO_RENDEZVOUS_TOKEN" "$work/no_token.rank0.log" || { cat "$work/no_token.rank0.log"; fail "no named error"; }
echo "PASS"
