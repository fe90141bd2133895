#!/usr/bin/env bash
# Two ranks train 16 steps straight; a second run stops after 8 (saving), resumes with --resume and
# finishes. Every loss after the resume must equal the straight run's bit for bit: CPU, fixed thread
# counts, the same reduction order, and the checkpoint restores parameters, AdamW moments, the step and
# the sampler position exactly.
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
echo "1 passed, 0 failed"
