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
# (A torchrun-style launch without mpirun trains over TCP: tests/e2e/torchrun_tcp.sh, with its errors.)
echo "1 passed, 0 failed"
