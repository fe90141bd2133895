#!/usr/bin/env bash
# The `vimo bench` reports run end to end at small sizes and write their JSON (a smoke test of the report
# code; the figures in bench/README.md come from full-size runs, never from tests).
set -euo pipefail
vimo="$1"
work=$(mktemp -d "${TMPDIR:-/tmp}/vimo-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
"$vimo" bench kernels --quick --out "$work/kernels.json" > "$work/kernels.log"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r" "$work/kernels.json" || fail "bad kernels.json"
"$vimo" bench data --records 256 --repetitions 1 --out "$work/data.json" > "$work/data.log"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r" "$work/data.json" || fail "bad data.json"
mpirun --oversubscribe --bind-to none -np 2 "$vimo" bench comm --max-mib 1 --iters 2 --no-overlap \
  --out "$work/comm.json" > "$work/comm.log"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r" "$work/comm.json" || fail "bad comm.json"
echo "1 passed, 0 failed"
