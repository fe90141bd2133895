#!/usr/bin/env bash
# The `vimo bench` reports run end to end at small sizes and write their JSON (a smoke test of the report
# code; the figures in bench/README.md come from full-size runs, never from tests).
set -euo pipefail
vimo="$1"
work=$(mktemp -d "${TMPDIR:-/tmp}/vimo-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
"$vimo" bench kernels --quick --out "$work/kernels.json" > "$work/kernels.log"
# Every row of each report, with its measured figures and ratios (times and ratios positive: they were measured).
python3 - "$work/kernels.json" <<'PY' || fail "bad kernels.json"
import json, os, sys
r = json.load(open(sys.argv[1]))
assert [row["loss"] for row in r["rows"]] == ["mcdpo", "mcdpo", "contrastive", "contrastive"], r["rows"]
for row in r["rows"]:
    for who in ["fused", "eager"] + (["bare_products", "eager_answer_positions"] if row["loss"] == "mcdpo" else []):
        assert len(row[who]["cpu_ms_runs"]) == r["options"]["repetitions"], (who, row[who])
        assert row[who]["cpu_ms"] > 0 and row[who]["peak_MiB"] > 0, (who, row[who])
    assert row["eager_over_fused_cpu_time"] > 0 and row["eager_over_fused_memory"] > 0, row
    assert all("met" in goal for goal in row["goals"]), row["goals"]
    if row["loss"] == "contrastive":  # the two-product reference row, and both eager losses checked against fused
        assert row["eager_separate_products"]["cpu_ms"] > 0 and row["separate_products_over_fused_cpu_time"] > 0, row
        assert 0 <= row["largest_relative_difference_to_fused"] <= 1e-3, row
assert r["options"]["device"] == "cpu", r["options"]
assert r["machine"]["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "unset"), r["machine"]
PY
# A device that is not cpu / cuda[:K] is refused by name (a CUDA device where none is visible: the same path).
if "$vimo" bench kernels --quick --device tpu --out "$work/tpu.json" > "$work/tpu.log" 2>&1; then
  fail "bench kernels accepted --device tpu"
fi
grep -q "device must be cpu, cuda or cuda:K, got 'tpu'" "$work/tpu.log" || fail "no device error: $(cat "$work/tpu.log")"
"$vimo" bench data --records 256 --repetitions 1 --out "$work/data.json" > "$work/data.log"
python3 - "$work/data.json" <<'PY' || fail "bad data.json"
import json, sys
r = json.load(open(sys.argv[1]))
assert [d["compression"] for d in r["datasets"]] == ["none", "zstd"], r["datasets"]
for d in r["datasets"]:
    assert d["rows"][0]["name"] == "raw read()" and d["rows"][-1]["name"].startswith("loader"), d["rows"]
    assert all(row["mb_per_s"] > 0 and row["ratio_to_raw"] > 0 for row in d["rows"]), d["rows"]
    floors = [row for row in d["rows"] if row["name"].startswith("floor: shuffled xxh3 + copy, 2 threads")]
    assert len(floors) == (1 if d["compression"] == "none" else 0), d["rows"]
PY
mpirun --oversubscribe --bind-to none -np 2 "$vimo" bench comm --max-mib 1 --iters 2 --no-overlap \
  --out "$work/comm.json" > "$work/comm.log"
python3 - "$work/comm.json" <<'PY' || fail "bad comm.json"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["ranks"] == 2, r["ranks"]
rows = r["collectives"]
assert {row["collective"] for row in rows} == {"allreduce", "allgather", "reduce_scatter"}, rows
assert {row["bytes"] for row in rows} == {4096, 16384, 65536, 262144, 1048576}, rows  # 4 KiB to 1 MiB
for row in rows:
    assert row["ours"]["time_us"] > 0 and row["raw"]["time_us"] > 0 and row["ours_over_raw"] > 0, row
PY
# The same sweep with the TCP backend as ours (raw stays MPI), and its overlap row through TCP.
mpirun --oversubscribe --bind-to none -np 2 "$vimo" bench comm --backend tcp --max-mib 0.25 --iters 2 \
  --no-shm --overlap-steps 1 --overlap-depth 2 --overlap-width 64 --out "$work/comm_tcp.json" > "$work/comm_tcp.log"
python3 - "$work/comm_tcp.json" <<'PY' || fail "bad comm_tcp.json"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["backend"] == "tcp", r["backend"]
assert all(row["ours"]["time_us"] > 0 and row["ours_over_raw"] > 0 for row in r["collectives"]), r["collectives"]
assert r["overlap"]["transport"].startswith("tcp"), r["overlap"]["transport"]
PY
echo "1 passed, 0 failed"
