#!/usr/bin/env bash
# The main job on the embedded default: set up, build, synthesize the deterministic dataset, train the three
# Gemini-MVR stages (action, object, router) on VIMO_RANKS MPI ranks on CPU, and print held-out R@1/5/10, MnR.
#   VIMO_RANKS (default 2)   VIMO_BUILD_DIR (default build)   extra arguments go to every `vimo train`
set -euo pipefail
cd "$(dirname "$0")/.."
ranks="${VIMO_RANKS:-2}"
VIMO_TARGETS=vimo bash scripts/build.sh
vimo="${VIMO_BUILD_DIR:-build}/vimo"

"$vimo" data synth --out runs/data/demo
rm -rf runs/demo  # a fresh run each time; `vimo train ... --resume` continues an interrupted one
for stage in action object router; do
  echo "=== stage $stage: mpirun -np $ranks $vimo train configs/demo/retriever_$stage.yaml $* ==="
  bash launch/mpirun.sh "$ranks" "$vimo" train "configs/demo/retriever_$stage.yaml" "$@"
done
echo "=== done: checkpoints under runs/demo/*/checkpoints, metrics in runs/demo/*/metrics.jsonl ==="
