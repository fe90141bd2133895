#!/usr/bin/env bash
# Hang detection in training itself: `vimo train` on 3 ranks under mpirun, rank 2 SIGSTOPped mid-run. mpirun
# sees nothing wrong (the process lives), so the heartbeat watchdog must end both survivors: each exits with
# status 3 within the watchdog timeout (3 s) plus a margin, printing a message that names rank 2, its host and
# its last collective, and mpirun then ends the job. (watchdog_stop.sh checks the same on a driver that only
# steps through allreduces; this one runs the trainer's loop: loader, model, gradient reducer, checkpoints.)
source "$(dirname "$0")/common.sh"
config="$source_dir/configs/demo/retriever_action.yaml"
timeout_s=3; margin_s=12
pids=()
cleanup_ranks() {
  for f in "$work"/rank*.pid; do
    [ -f "$f" ] || continue
    kill -CONT "$(cat "$f")" 2>/dev/null || true
    kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
  [ -n "${mpirun_pid:-}" ] && kill -KILL "$mpirun_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup_ranks EXIT
alive() { kill -0 "$1" 2>/dev/null && ! grep -q '^State:\s*Z' "/proc/$1/status" 2>/dev/null; }
show() { echo "--- mpirun output:" >&2; cat "$work/out.log" >&2; }

# Each rank records its pid and exit status (the shell stays as the rank's parent to write the status).
# shellcheck disable=SC2016  # expanded by the rank's shell
mpirun --oversubscribe --bind-to none -np 3 sh -c \
  'w=$1; shift; echo $$ > "$w/rank$OMPI_COMM_WORLD_RANK.pid"; "$@"; code=$?; echo $code > "$w/rank$OMPI_COMM_WORLD_RANK.exit"; exit $code' \
  sh "$work" "$vimo" train "$config" $tiny data.global_batch=48 train.steps=1000000 train.eval_every=0 \
  train.log_every=5 train.checkpoint_every=20 train.watchdog_timeout_s=$timeout_s train.out_dir="$work/run" \
  > "$work/out.log" 2>&1 &
mpirun_pid=$!

# Mid-run: after step 25, so that a checkpoint has been written and buckets have been all-reduced.
deadline=$((SECONDS + 90))
until grep -q "step *25/" "$work/out.log"; do
  [ $SECONDS -lt $deadline ] || { show; fail "no step 25 within 90 s"; }
  alive "$mpirun_pid" || { show; fail "mpirun ended before step 25"; }
  sleep 0.1
done
# The shell of each rank is the parent of `vimo`: stop the trainer itself.
victim=$(pgrep -P "$(cat "$work/rank2.pid")" -f "$vimo")
survivors=($(pgrep -P "$(cat "$work/rank0.pid")" -f "$vimo") $(pgrep -P "$(cat "$work/rank1.pid")" -f "$vimo"))
[ -n "$victim" ] && [ "${#survivors[@]}" -eq 2 ] || { show; fail "cannot find the ranks' processes"; }
start=$(date +%s.%N)
kill -STOP "$victim"
limit=$((timeout_s + margin_s))
while :; do
  any=0
  for p in "${survivors[@]}"; do alive "$p" && any=1; done
  elapsed=$(python3 -c "print(round($(date +%s.%N) - $start, 2))")
  [ "$any" -eq 1 ] || break
  python3 -c "import sys; sys.exit(0 if $elapsed < $limit else 1)" || { show; fail "survivors still running after ${elapsed} s"; }
  sleep 0.05
done
deadline=$((SECONDS + 15))
while alive "$mpirun_pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
alive "$mpirun_pid" && { show; fail "mpirun did not end after the survivors"; }
set +e; wait "$mpirun_pid"; code=$?; set -e
mpirun_pid=""
echo "survivors gone ${elapsed} s after SIGSTOP; mpirun exit status ${code}"
[ "$code" -ne 0 ] || { show; fail "mpirun exited 0"; }
out=$(cat "$work/out.log")
host=$(hostname)
for r in 0 1; do
  # mpirun may kill the second survivor once the first has exited; one of them must have exited 3 itself.
  line=$(grep "^vimo watchdog \[rank $r on " <<< "$out" | head -1) || { show; fail "rank $r printed no watchdog message"; }
  grep -q "rank 2 (host $host) sent no heartbeat for [0-9.]* s; its last collective: [a-z_]* #[0-9]* of " <<< "$line" \
    || { show; fail "rank $r's message does not name rank 2, its host and its last collective: $line"; }
done
[ "$(cat "$work/rank0.exit" 2>/dev/null)" = 3 ] || [ "$(cat "$work/rank1.exit" 2>/dev/null)" = 3 ] \
  || { show; fail "no survivor exited with the watchdog's status 3 (rank 0: $(cat "$work/rank0.exit" 2>/dev/null), rank 1: $(cat "$work/rank1.exit" 2>/dev/null))"; }
echo "PASS"
