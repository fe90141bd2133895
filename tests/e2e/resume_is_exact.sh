#!/usr/bin/env bash
# Two ranks train 16 steps straight; a second run stops after 8 (saving), resumes with --resume and
# finishes. Every loss after the resume must equal the straight run's bit for bit: CPU, fixed thread
# counts, the same reduction order, and the checkpoint restores parameters, AdamW moments, the step and
# the sampler position exactly. Ranks that see different checkpoints refuse to resume, naming the others.
source "$(dirname "$0")/common.sh"
config="$source_dir/configs/demo/retriever_action.yaml"
run_ranks 2 train "$config" $tiny train.steps=16 train.out_dir="$work/straight" train.eval_every=4
run_ranks 2 train "$config" $tiny train.steps=16 train.out_dir="$work/resumed" train.eval_every=4 train.stop_after=8
[ -f "$work/resumed/checkpoints/step_00000008/manifest.json" ] || fail "no checkpoint at the stop step"
[ "$(losses "$work/resumed/metrics.jsonl" | wc -l)" -eq 8 ] || fail "the stopped run did not stop after 8 steps"
run_ranks 2 train "$config" $tiny train.steps=16 train.out_dir="$work/resumed" train.eval_every=4 --resume |
  tee "$work/resume.log"
grep -q "resumed from .*step_00000008 (step 8" "$work/resume.log" || fail "the run did not resume from step 8"
diff <(losses "$work/straight/metrics.jsonl") <(losses "$work/resumed/metrics.jsonl") || fail "losses differ after resume"
# The evaluations too (steps 4, 8, 12), the one at the stop step included.
evals() { grep -o '"step": [0-9]*, "eval"' "$1" | tr -dc '0-9\n'; }
diff <(evals "$work/straight/metrics.jsonl") <(evals "$work/resumed/metrics.jsonl") || fail "evaluations differ after resume"
[ "$(evals "$work/straight/metrics.jsonl" | wc -l)" -eq 3 ] || fail "expected evaluations at steps 4, 8 and 12"
# A run that went on past its last checkpoint and died resumes from that checkpoint: its log then holds each
# step once, as the straight run's (the records after the checkpoint are dropped, not repeated).
died=(train "$config" $tiny train.steps=16 train.out_dir="$work/died" train.eval_every=4 train.checkpoint_every=4)
run_ranks 2 "${died[@]}" train.stop_after=6 > /dev/null
rm -rf "$work/died/checkpoints/step_00000006"  # as if it died after step 6, before saving
run_ranks 2 "${died[@]}" --resume | tee "$work/died.log"
grep -q "resumed from .*step_00000004 (step 4" "$work/died.log" || fail "the run did not resume from step 4"
diff <(losses "$work/straight/metrics.jsonl") <(losses "$work/died/metrics.jsonl") || fail "the log repeats steps"
diff <(evals "$work/straight/metrics.jsonl") <(evals "$work/died/metrics.jsonl") || fail "the log repeats evaluations"
[ "$(losses "$work/straight/metrics.jsonl" | wc -l)" -eq 16 ] || fail "expected 16 logged steps"
# Loss must fall (first vs last step of the straight run).
first=$(losses "$work/straight/metrics.jsonl" | head -1 | cut -d' ' -f2)
last=$(losses "$work/straight/metrics.jsonl" | tail -1 | cut -d' ' -f2)
python3 -c "import sys; sys.exit(0 if $last < $first else 1)" || fail "loss did not fall ($first -> $last)"
# A fresh run (no --resume) refuses an out_dir that holds checkpoints, which it would mix with.
if run_ranks 2 train "$config" $tiny train.steps=16 train.out_dir="$work/resumed" > "$work/fresh.log" 2>&1; then
  fail "a fresh run started beside another run's checkpoints"
fi
grep -q "already holds checkpoints (the newest: .*step_00000016). HINT: add --resume" "$work/fresh.log" ||
  fail "the refusal did not say why: $(tail -3 "$work/fresh.log")"
# Every rank resumes from the checkpoint rank 0 picks, or none does (Note [One checkpoint for every rank]):
# with a relative out_dir and each rank in a working directory of its own, as on node-local disks, only rank 0
# sees the checkpoint, and both ranks fail naming rank 1 instead of training from different steps.
mkdir -p "$work/node0" "$work/node1"
(cd "$work/node0" && run_ranks 2 train "$config" $tiny train.steps=16 train.out_dir=run train.stop_after=8 > /dev/null)
split=(train "$config" $tiny train.steps=16 train.out_dir=run --resume)
if mpirun --oversubscribe --bind-to none -np 1 -wdir "$work/node0" "$vimo" "${split[@]}" : \
    -np 1 -wdir "$work/node1" "$vimo" "${split[@]}" > "$work/split.log" 2>&1; then
  fail "ranks that see different checkpoints resumed"
fi
grep -q "rank 0 resumes from .*step_00000008, but rank(s) 1 cannot read it" "$work/split.log" ||
  fail "the split resume did not name rank 1: $(tail -5 "$work/split.log")"
# A resume with another model (a changed model.* key) is refused, naming the key, both values and the file.
if (cd "$work/node0" && run_ranks 2 "${split[@]}" model.action_scale=10 > "$work/other_model.log" 2>&1); then
  fail "a run resumed with another model"
fi
grep -q "step_00000008/config.yaml: the checkpoint was trained with another model: model.action_scale: 100" \
  "$work/other_model.log" || fail "the refusal did not name the key: $(tail -3 "$work/other_model.log")"
# Other optimizer settings on resume are allowed, and said: the key, both values and the checkpoint.
(cd "$work/node0" && run_ranks 2 "${split[@]}" optim.lr=0.0005 > "$work/other_lr.log")
grep -q "note: resuming with other optimizer settings than .*step_00000008 was saved with (optim.lr: 0.001 in the checkpoint, 5e-04 now)" \
  "$work/other_lr.log" || fail "the changed lr was not said: $(grep -m2 -i "resum" "$work/other_lr.log")"
echo "1 passed, 0 failed"
