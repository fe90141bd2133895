#!/usr/bin/env bash
# Two ranks train 16 steps straight; a second run stops after 8 (saving), resumes with --resume and
# finishes. Every loss after the resume must equal the straight run's bit for bit: CPU, fixed thread
# counts, the same reduction order, and the checkpoint restores parameters, AdamW moments, the step and
# the sampler position exactly. Ranks that see different checkpoints refuse to resume, naming the others.
source "$(dirname "$0")/common.sh"
config="$source_dir/configs/demo/retriever_action.yaml"
run_ranks 2 train "$config" $tiny train.steps=16 train.out_dir="$work/straight"
run_ranks 2 train "$config" $tiny train.steps=16 train.out_dir="$work/resumed" train.stop_after=8
[ -f "$work/resumed/checkpoints/step_00000008/manifest.json" ] || fail "no checkpoint at the stop step"
[ "$(losses "$work/resumed/metrics.jsonl" | wc -l)" -eq 8 ] || fail "the stopped run did not stop after 8 steps"
run_ranks 2 train "$config" $tiny train.steps=16 train.out_dir="$work/resumed" --resume | tee "$work/resume.log"
grep -q "resumed from .*step_00000008 (step 8" "$work/resume.log" || fail "the run did not resume from step 8"
diff <(losses "$work/straight/metrics.jsonl") <(losses "$work/resumed/metrics.jsonl") || fail "losses differ after resume"
[ "$(losses "$work/straight/metrics.jsonl" | wc -l)" -eq 16 ] || fail "expected 16 logged steps"
# Loss must fall (first vs last step of the straight run).
first=$(losses "$work/straight/metrics.jsonl" | head -1 | cut -d' ' -f2)
last=$(losses "$work/straight/metrics.jsonl" | tail -1 | cut -d' ' -f2)
python3 -c "import sys; sys.exit(0 if $last < $first else 1)" || fail "loss did not fall ($first -> $last)"
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
echo "1 passed, 0 failed"
