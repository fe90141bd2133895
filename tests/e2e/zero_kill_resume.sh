#!/usr/bin/env bash
# A rank SIGKILLed while ZeRO-1 checkpoints are being written (Note [Every rank writes its own part] in
# checkpoints/checkpoint.h): with a checkpoint every step, each of 2 ranks writing its own moments in the
# background, one rank is killed at a random moment and mpirun ends the other. Whatever the kill cut short, the
# newest checkpoint that verifies is whole: the run resumed from it with --resume ends with the straight run's
# losses, bit for bit. Three kills, of rank 1, rank 0 and rank 1, at different moments.
source "$(dirname "$0")/common.sh"
config="$source_dir/configs/demo/retriever_action.yaml"
args=(train "$config" $tiny train.steps=40 optim.zero_stage=1 train.checkpoint_every=1 train.keep_checkpoints=2)
run_ranks 2 "${args[@]}" train.out_dir="$work/straight" > /dev/null
logged_steps() { if [ -f "$1" ]; then grep -c '"loss"' "$1" || true; else echo 0; fi; }
# The pid of rank $2 of the mpirun $1 (its child whose environment says so).
rank_pid() {
  local child
  for child in $(pgrep -P "$1"); do
    if tr '\0' '\n' < "/proc/$child/environ" 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then
      echo "$child"
      return
    fi
  done
}

for trial in 1 2 3; do
  victim=$((trial % 2))
  out="$work/killed$trial"
  mpirun --oversubscribe --bind-to none -np 2 "$vimo" "${args[@]}" train.out_dir="$out" > "$work/killed$trial.log" 2>&1 &
  pid=$!
  waited=0
  while [ "$(logged_steps "$out/metrics.jsonl")" -lt $((2 + 3 * trial)) ]; do
    sleep 0.02
    waited=$((waited + 1))
    [ "$waited" -lt 3000 ] || fail "trial $trial: too few steps logged within 60 s: $(tail -3 "$work/killed$trial.log")"
  done
  sleep "0.0$((RANDOM % 10))"
  victim_pid=$(rank_pid "$pid" "$victim")
  [ -n "$victim_pid" ] || fail "trial $trial: no rank $victim under mpirun $pid"
  kill -KILL "$victim_pid"
  status=0
  wait "$pid" || status=$?
  [ "$status" -ne 0 ] || fail "trial $trial: mpirun exited with status 0 after rank $victim was killed"
  run_ranks 2 "${args[@]}" train.out_dir="$out" --resume > "$work/killed$trial.resumed.log" 2>&1 ||
    fail "trial $trial: the resumed run failed: $(tail -5 "$work/killed$trial.resumed.log")"
  step=$(grep -o 'resumed from .*step_[0-9]* (step [0-9]*' "$work/killed$trial.resumed.log" | grep -o '[0-9]*$') ||
    fail "trial $trial: the run did not resume: $(head -20 "$work/killed$trial.resumed.log")"
  diff <(losses "$work/straight/metrics.jsonl") <(losses "$out/metrics.jsonl") ||
    fail "trial $trial: losses after resuming from step $step differ from the straight run's"
  left=$(grep -c "left by a crashed checkpoint save" "$work/killed$trial.resumed.log" || true)
  echo "trial $trial: rank $victim killed ($left save(s) cut short), resumed from step $step, losses equal to the straight run's"
done
echo "1 passed, 0 failed"
