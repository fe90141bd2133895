#!/usr/bin/env bash
# The three Gemini-MVR stages chained through train.init_from on 2 ranks, each a few steps: every stage
# starts from the previous one's weights, the router stage reports held-out metrics.
source "$(dirname "$0")/common.sh"
for stage in action object router; do
  run_ranks 2 train "$source_dir/configs/demo/retriever_$stage.yaml" $tiny train.steps=6 optim.warmup_steps=2 \
    train.out_dir="$work/$stage" ${previous:+train.init_from="$work/$previous"} | tee "$work/$stage.log"
  previous=$stage
done
grep -q "initialized model weights from $work/object/checkpoints/step_00000006" "$work/router.log" || fail "router did not start from the object stage"
grep -q "held-out retrieval, stage router: R@1 .* MnR" "$work/router.log" || fail "no held-out metrics"
echo "1 passed, 0 failed"
