#!/usr/bin/env bash
# Training launched without MPI, the way torchrun (or srun without PMI) starts ranks: each process gets RANK,
# WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, MPI sees each process alone, and the ranks meet through
# the rendezvous store and talk over TCP. Two ranks must log the same losses, bit for bit, as the same run
# under mpirun (with two ranks every sum is a + b, whichever backend adds), with the gradients all-reduced
# through shared memory (the default on one host) and through TCP itself. Without VIMO_RENDEZVOUS_TOKEN the
# run stops at once with an error naming it.
source "$(dirname "$0")/common.sh"
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

unset VIMO_RENDEZVOUS_TOKEN
if torchrun_like 2 no_token; then fail "a run without VIMO_RENDEZVOUS_TOKEN was accepted"; fi
grep -q "error: .*VIMO_RENDEZVOUS_TOKEN" "$work/no_token.rank0.log" || { cat "$work/no_token.rank0.log"; fail "no named error"; }
echo "PASS"
