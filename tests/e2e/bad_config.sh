#!/usr/bin/env bash
# A malformed config is an error naming the file, key and line (exit 2), never a crash; so is a bad override.
source "$(dirname "$0")/common.sh"
printf 'model:\n  width: 64\noptim:\n  lr: -1\n' > "$work/bad.yaml"
set +e
out=$(run_ranks 2 train "$work/bad.yaml" 2>&1); code=$?
set -e
[ "$code" -ne 0 ] || fail "a negative lr was accepted"
echo "$out" | grep -q "bad.yaml:4: optim.lr" || fail "error does not name file, line and key: $out"
set +e
out=$(run_ranks 2 train "$source_dir/configs/demo/retriever_action.yaml" optim.lrr=1 2>&1); code=$?
set -e
[ "$code" -ne 0 ] || fail "an unknown override key was accepted"
echo "$out" | grep -q "optim.lrr" || fail "error does not name the override key: $out"
echo "$out" | grep -qi "segmentation\|core dumped\|terminate called" && fail "crashed: $out"
# A model whose shapes do not fit the dataset is named before it trains (model.joints crashed in the forward).
set +e
out=$(run_ranks 2 train "$source_dir/configs/demo/retriever_action.yaml" $tiny model.joints=16 2>&1); code=$?
set -e
[ "$code" -ne 0 ] || fail "a model of 16 joints trained on 17-joint keypoints"
echo "$out" | grep -q "does not fit the model config: keypoints have 17 joints, model.joints is 16" ||
  fail "the joints mismatch was not named: $(echo "$out" | tail -3)"
# A run that diverges stops at the first step whose loss is not finite, on every rank, saying so and saving
# nothing of it (it trained on with NaN, and its evaluation then reported R@1 100 %).
set +e
out=$(run_ranks 2 train "$source_dir/configs/demo/retriever_action.yaml" $tiny train.steps=6 optim.warmup_steps=1 \
  optim.lr=1e4 optim.grad_clip=0 train.checkpoint_every=1 train.out_dir="$work/diverged" 2>&1); code=$?
set -e
[ "$code" -ne 0 ] || fail "a diverged run succeeded: $(echo "$out" | tail -3)"
echo "$out" | grep -q "error: the loss is -\?nan at step [0-9]*: the model diverged. HINT: lower optim.lr" ||
  fail "the divergence was not named: $(echo "$out" | tail -3)"
if grep -q '"loss": null\|nan' "$work/diverged/metrics.jsonl"; then fail "a non-finite step was logged"; fi
# A refused run leaves the config.yaml of the run whose out_dir it named as it was.
run_ranks 2 train "$source_dir/configs/demo/retriever_action.yaml" $tiny train.steps=4 train.out_dir="$work/kept" \
  > /dev/null
cp "$work/kept/config.yaml" "$work/kept.yaml"
if run_ranks 2 train "$source_dir/configs/demo/retriever_action.yaml" $tiny train.steps=4 optim.lr=0.5 \
  train.out_dir="$work/kept" > /dev/null 2>&1; then
  fail "a fresh run started beside another run's checkpoints"
fi
diff "$work/kept.yaml" "$work/kept/config.yaml" || fail "a refused run rewrote the config.yaml of the run it named"
# (A torchrun-style launch without mpirun trains over TCP: tests/e2e/torchrun_tcp.sh, with its errors.)
echo "1 passed, 0 failed"
