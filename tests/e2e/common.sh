# Shared by the e2e scripts: arguments, a scratch directory, a tiny synthetic dataset, and helpers.
set -euo pipefail
vimo="$1"; source_dir="$2"
work=$(mktemp -d "${TMPDIR:-/tmp}/vimo-e2e.XXXXXX")
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
run_ranks() { local n="$1"; shift; mpirun --oversubscribe --bind-to none -np "$n" "$vimo" "$@"; }
# The losses of metrics.jsonl as printed (%.17g), one "step loss" per line.
losses() { grep -o '"step": [0-9]*, "loss": [^,]*' "$1" | sed 's/"step": \([0-9]*\), "loss": \(.*\)/\1 \2/'; }
"$vimo" data synth --out "$work/data" --train 256 --test 64 --records-per-shard 100 > /dev/null
tiny="data.dir=$work/data data.global_batch=32 optim.warmup_steps=4 train.log_every=4 train.checkpoint_every=100"
