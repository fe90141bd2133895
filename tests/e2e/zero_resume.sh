#!/usr/bin/env bash
# ZeRO-1 in training (optim.zero_stage=1). Two ranks train 16 steps with it and without it: the losses agree
# to 1e-4 relative (the averaged gradients are the same sums; only the clipping norm is summed in another
# order, which moves float32 values by an ulp now and then), and rank 0 holds about half of AdamW's moments.
# Each rank of a ZeRO run writes its own moments into its checkpoint file (Note [Every rank writes its own
# part]): rank 1's file holds only pieces of moments, about half of them. A ZeRO run stopped after 8 steps
# resumes on 4 ranks without ZeRO (reading whole moments from both files) and ends with the losses of the
# straight ZeRO run, to 1e-4 relative (4 ranks average in another order); so does one resumed with ZeRO on 4
# ranks (each reading its quarter across the 2 files).
source "$(dirname "$0")/common.sh"
config="$source_dir/configs/demo/retriever_action.yaml"
run_ranks 2 train "$config" $tiny train.steps=16 train.out_dir="$work/adamw" | tee "$work/adamw.log"
run_ranks 2 train "$config" $tiny train.steps=16 train.out_dir="$work/zero" optim.zero_stage=1 | tee "$work/zero.log"
grep -q "optimizer: ZeRO-1 AdamW over 2 ranks" "$work/zero.log" || fail "the ZeRO run did not say it shards"
mib() { grep -o '[0-9.]* MiB of moments on rank 0' "$1" | cut -d' ' -f1; }
python3 -c "import sys; a, z = float(sys.argv[1]), float(sys.argv[2]); sys.exit(0 if 0.45 <= z / a <= 0.55 else 1)" \
  "$(mib "$work/adamw.log")" "$(mib "$work/zero.log")" ||
  fail "rank 0's moments: $(mib "$work/zero.log") MiB with ZeRO-1, $(mib "$work/adamw.log") MiB without (expected about half)"
python3 - "$work/zero/checkpoints/step_00000016" <<'PY' || fail "the ZeRO checkpoint's rank files are not each rank's own moments"
import json, os, struct, sys
def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    meta = h.pop("__metadata__", {})
    return {k: v["shape"] for k, v in h.items()}, meta
manifest = json.load(open(os.path.join(sys.argv[1], "manifest.json")))
assert manifest["rank_files"] == 2 and "rank_00001.safetensors" in manifest["files"], manifest
files = [header(os.path.join(sys.argv[1], f"rank_{r:05d}.safetensors")) for r in range(2)]
moments = {r: sum(s[0] for k, s in files[r][0].items() if k.startswith("optim.")) for r in range(2)}
assert all(k.startswith("optim.") and "piece:" + k in files[1][1] for k in files[1][0]), "rank 1 holds other than pieces"
assert any(k.startswith("model.") for k in files[0][0]), "rank 0 holds no model"
assert 0.45 <= moments[1] / (moments[0] + moments[1]) <= 0.55, moments
PY
# Every logged loss of $2 within 1e-4 relative of $1's, and as many of them.
close() {
  python3 - "$1" "$2" <<'PY'
import sys
read = lambda f: [tuple(map(float, line.split())) for line in open(f)]
a, b = read(sys.argv[1]), read(sys.argv[2])
assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
for (sa, la), (sb, lb) in zip(a, b):
    assert sa == sb and abs(la - lb) <= 1e-4 * abs(la), ("step", sa, la, lb)
PY
}
losses "$work/adamw/metrics.jsonl" > "$work/adamw.losses"
losses "$work/zero/metrics.jsonl" > "$work/zero.losses"
close "$work/adamw.losses" "$work/zero.losses" || fail "ZeRO-1 losses differ from AdamW's"
run_ranks 2 train "$config" $tiny train.steps=16 train.out_dir="$work/moved" optim.zero_stage=1 train.stop_after=8
run_ranks 4 train "$config" $tiny train.steps=16 train.out_dir="$work/moved" --resume | tee "$work/moved.log"
grep -q "resumed from .*step_00000008 (step 8, now on 4 ranks)" "$work/moved.log" || fail "no resume on 4 ranks"
losses "$work/moved/metrics.jsonl" > "$work/moved.losses"
close "$work/zero.losses" "$work/moved.losses" || fail "losses after moving the ZeRO checkpoint to 4 ranks differ"
# A ZeRO run stopped after 8 steps resumes with ZeRO on 4 ranks and ends with the straight ZeRO run's losses:
# each rank reads its quarter across the 2 ranks' pieces, and the resumed optimizer must update the loaded
# weights (it once updated the ones it had copied when it was made, before the checkpoint was loaded).
run_ranks 2 train "$config" $tiny train.steps=16 train.out_dir="$work/again" optim.zero_stage=1 train.stop_after=8
run_ranks 4 train "$config" $tiny train.steps=16 train.out_dir="$work/again" optim.zero_stage=1 --resume |
  tee "$work/again.log"
grep -q "resumed from .*step_00000008 (step 8, now on 4 ranks)" "$work/again.log" ||
  fail "no resume of the ZeRO run with ZeRO on 4 ranks"
losses "$work/again/metrics.jsonl" > "$work/again.losses"
close "$work/zero.losses" "$work/again.losses" || fail "losses after resuming with ZeRO differ from the straight run"
echo "1 passed, 0 failed"
