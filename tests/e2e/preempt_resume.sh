#!/usr/bin/env bash
# Preemption (Note [Preemption at a step boundary] in trainer/preemption.h): a SIGUSR1 sent to mpirun, which
# passes it to every rank (as launch/slurm/retriever.sbatch passes on Slurm's), and two SIGTERMs sent to one rank
# only (the second is ignored). Each time every rank saves a checkpoint of the step it was in and exits with status 75, and the run
# resumed with --resume logs the straight run's losses and evaluations bit for bit.
source "$(dirname "$0")/common.sh"
config="$source_dir/configs/demo/retriever_action.yaml"
args=(train "$config" $tiny train.steps=40 train.eval_every=8)
run_ranks 2 "${args[@]}" train.out_dir="$work/straight" > /dev/null
logged_steps() { if [ -f "$1" ]; then grep -c '"loss"' "$1" || true; else echo 0; fi; }
# Starts a 2-rank run in `$work/$1`; once it has logged 3 steps, `$2` sends the signal; checks the run stopped
# with a checkpoint of its last logged step, naming `$3` signalled ranks; then resumes it and compares.
preempt_and_resume() {
  local name="$1" send="$2" ranks="$3" out="$work/$1"
  mpirun --oversubscribe --bind-to none -np 2 "$vimo" "${args[@]}" train.out_dir="$out" > "$work/$name.log" 2>&1 &
  local pid=$! waited=0
  while [ "$(logged_steps "$out/metrics.jsonl")" -lt 3 ]; do
    sleep 0.05
    waited=$((waited + 1))
    [ "$waited" -lt 1200 ] || fail "$name: no step logged within 60 s: $(tail -3 "$work/$name.log")"
  done
  "$send" "$pid"
  local status=0
  wait "$pid" || status=$?
  [ "$status" -eq 75 ] || fail "$name: mpirun exited with status $status, not 75: $(tail -5 "$work/$name.log")"
  local step
  step=$(losses "$out/metrics.jsonl" | tail -1 | cut -d' ' -f1)
  [ "$step" -lt 40 ] || fail "$name: the run finished before the signal took effect"
  grep -q "preempted: a SIGTERM or SIGUSR1 reached $ranks of 2 ranks by the end of step $step; checkpoint .*step_$(printf %08d "$step") holds it" \
    "$work/$name.log" || fail "$name: no preemption message for step $step: $(tail -5 "$work/$name.log")"
  [ -f "$out/checkpoints/step_$(printf %08d "$step")/manifest.json" ] || fail "$name: no checkpoint of step $step"
  run_ranks 2 "${args[@]}" train.out_dir="$out" --resume > "$work/$name.resumed.log"
  grep -q "resumed from .*step_$(printf %08d "$step") (step $step" "$work/$name.resumed.log" ||
    fail "$name: the run did not resume from step $step"
  diff <(losses "$work/straight/metrics.jsonl") <(losses "$out/metrics.jsonl") || fail "$name: losses differ"
  evals() { grep -o '"step": [0-9]*, "eval"' "$1" | tr -dc '0-9\n'; }
  diff <(evals "$work/straight/metrics.jsonl") <(evals "$out/metrics.jsonl") || fail "$name: evaluations differ"
  echo "$name: stopped after step $step with status 75, resumed to step 40 with the straight run's losses"
}
usr1_to_mpirun() { kill -USR1 "$1"; }
# Rank 1's process: the child of mpirun whose environment says OMPI_COMM_WORLD_RANK=1.
term_to_rank_1() {
  local child
  for child in $(pgrep -P "$1"); do
    if tr '\0' '\n' < "/proc/$child/environ" | grep -qx OMPI_COMM_WORLD_RANK=1; then
      kill -TERM "$child"
      kill -TERM "$child"  # the same signal again, as from a scheduler and then a launcher: ignored
      return
    fi
  done
  fail "rank 1's process not found among mpirun's children"
}
preempt_and_resume usr1 usr1_to_mpirun 2
preempt_and_resume term term_to_rank_1 1
# A signal before the first step (here once the ranks have read the config) stops the run after step 1, with
# its checkpoint. (`vimo train` takes the signals from before MPI starts; that earlier window is not timed here.)
mpirun --oversubscribe --bind-to none -np 2 "$vimo" "${args[@]}" train.out_dir="$work/early" > "$work/early.log" 2>&1 &
pid=$!
waited=0
until grep -q "^vimo .* | 2 ranks" "$work/early.log" 2> /dev/null; do
  sleep 0.01
  waited=$((waited + 1))
  [ "$waited" -lt 6000 ] || fail "early: the run did not start within 60 s"
done
kill -USR1 "$pid"
status=0
wait "$pid" || status=$?
[ "$status" -eq 75 ] || fail "early: mpirun exited with status $status, not 75: $(tail -5 "$work/early.log")"
[ -f "$work/early/checkpoints/step_00000001/manifest.json" ] || fail "early: no checkpoint of step 1"
echo "early: a signal during start-up stopped the run after step 1 with status 75"
echo "1 passed, 0 failed"
