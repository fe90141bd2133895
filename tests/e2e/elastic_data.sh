#!/usr/bin/env bash
# The data path end to end: `vimo data pack` re-shards the dataset with zstd and `vimo data verify` checks
# it, and re-shards it by size (--max-shard-mb), checked record for record against the source; a run on 2 ranks is interrupted, resumed on 4 ranks, interrupted again and finished on 1 rank, and
# every step's global batch (its batch_hash in metrics.jsonl) equals the uninterrupted run's. Then a
# corrupt record stops training with a named error by default and is skipped and counted with
# data.skip_corrupt=true.
source "$(dirname "$0")/common.sh"
config="$source_dir/configs/demo/retriever_action.yaml"
# "step hash" per training step of a metrics.jsonl (evaluation lines have no batch_hash).
hashes() { grep '"batch_hash"' "$1" | sed 's/.*"step": \([0-9]*\),.*"batch_hash": "\([0-9a-f]*\)".*/\1 \2/'; }

"$vimo" data pack "$work/data" "$work/packed" --zstd --max-shard-records 60 > /dev/null
"$vimo" data verify "$work/packed" 2> /dev/null | grep -q "every xxh3 matches" || fail "the packed dataset does not verify"
[ "$(ls "$work/packed/train" | wc -l)" -eq 5 ] || fail "expected 5 train shards of at most 60 records"
# --max-shard-mb: a shard closes at the first record that takes it to 0.25 MiB, and the records are the
# source's, byte for byte and in order (both datasets read by hand from FORMAT.md: uncompressed shards).
"$vimo" data pack "$work/data" "$work/by_size" --max-shard-mb 0.25 > /dev/null
python3 - "$work/data" "$work/by_size" $((256 * 1024)) <<'PY' || fail "pack --max-shard-mb"
import json, struct, sys
def splits(root):
    manifest = json.load(open(f"{root}/manifest.json"))
    out = {}
    for name, split in manifest["splits"].items():
        out[name] = []
        for shard in split["shards"]:
            data = open(f"{root}/{name}/{shard['file']}", "rb").read()
            assert data[12:14] == b"\0\0", "compressed"
            n, index = struct.unpack_from("<QQ", data, len(data) - 24)
            offsets = list(struct.unpack_from(f"<{n}Q", data, index)) + [index]
            out[name].append((index, offsets[-2], [data[a:b] for a, b in zip(offsets, offsets[1:])]))
    return out
source, packed, limit = splits(sys.argv[1]), splits(sys.argv[2]), int(sys.argv[3])
for name, shards in packed.items():
    for i, (records_end, last_record, _) in enumerate(shards):
        assert last_record < limit, f"{name} shard {i}: its last record starts at {last_record}"
        assert i == len(shards) - 1 or records_end >= limit, f"{name} shard {i} closed at {records_end}"
    flat = lambda s: [r for shard in s for r in shard[2]]
    assert flat(shards) == flat(source[name]), f"{name}: the records differ"
PY
[ "$(ls "$work/by_size/train" | wc -l)" -gt 1 ] || fail "--max-shard-mb made one train shard"

packed="$tiny data.dir=$work/packed train.steps=12"  # 8 batches per epoch: the runs cross an epoch

run_ranks 2 train "$config" $packed train.out_dir="$work/straight" > /dev/null
run_ranks 2 train "$config" $packed train.out_dir="$work/elastic" train.stop_after=5 > /dev/null
run_ranks 4 train "$config" $packed train.out_dir="$work/elastic" train.stop_after=9 --resume > /dev/null
run_ranks 1 train "$config" $packed train.out_dir="$work/elastic" --resume | tee "$work/elastic.log" > /dev/null
grep -q "resumed from .*step_00000009 (step 9, now on 1 ranks)" "$work/elastic.log" || fail "no resume on 1 rank"
[ "$(hashes "$work/straight/metrics.jsonl" | wc -l)" -eq 12 ] || fail "expected 12 logged steps"
diff <(hashes "$work/straight/metrics.jsonl") <(hashes "$work/elastic/metrics.jsonl") \
  || fail "the resumed runs read other batches than the uninterrupted run"
# Data-wait time is logged for every step.
[ "$(grep -c '"data_seconds"' "$work/straight/metrics.jsonl")" -eq 12 ] || fail "data_seconds missing"

# Resuming with another shuffle block would silently change the remaining batches: it is an error.
if run_ranks 1 train "$config" $packed train.steps=14 train.out_dir="$work/elastic" data.shuffle_block=5 --resume \
  > "$work/reorder.log" 2>&1; then
  fail "a resume with another data.shuffle_block was accepted"
fi
grep -q "data.shuffle_block differ" "$work/reorder.log" || { cat "$work/reorder.log"; fail "no named error"; }

# One flipped byte inside a record of the second train shard.
shard="$work/packed/train/shard_00001.bin"
python3 - "$shard" <<'PY'
import sys
path = sys.argv[1]
with open(path, "r+b") as f:
    f.seek(40)  # inside the shard's first record (the header is 16 bytes)
    b = f.read(1)
    f.seek(40)
    f.write(bytes([b[0] ^ 0x5A]))
PY
if run_ranks 2 train "$config" $packed train.out_dir="$work/corrupt" > "$work/corrupt.log" 2>&1; then
  fail "training on a corrupt shard succeeded"
fi
grep -q "shard_00001.bin: record 0 at offset 16: checksum mismatch" "$work/corrupt.log" \
  || { cat "$work/corrupt.log"; fail "the error does not name the shard, record and offset"; }
run_ranks 2 train "$config" $packed train.out_dir="$work/skipping" data.skip_corrupt=true > "$work/skip.log" 2>&1 \
  || { cat "$work/skip.log"; fail "skip_corrupt did not skip"; }
grep -q '"corrupt_skipped": [1-9]' "$work/skipping/metrics.jsonl" || fail "skipped records are not counted"
echo "1 passed, 0 failed"
