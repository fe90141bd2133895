#!/usr/bin/env bash
# Builds a libFuzzer target standalone with clang-14 (-fsanitize=fuzzer,address) into build-fuzz/ and runs it
# for SECONDS seconds on a seed corpus of valid inputs it generates. Needs clang-14 and libclang-rt-14-dev.
#   tests/fuzz/run_fuzz.sh TARGET SECONDS      e.g. tests/fuzz/run_fuzz.sh fuzz_npy 60
# Crashes are written to build-fuzz/TARGET-artifacts/; the script exits non-zero when the fuzzer found one.
set -euo pipefail
cd "$(dirname "$0")/../.."
target="${1:?usage: $0 TARGET SECONDS}"
seconds="${2:?usage: $0 TARGET SECONDS}"
CXX="${CXX_FUZZ:-clang++-14}"
out=build-fuzz
mkdir -p "$out"

flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -I.)
case "$target" in
  fuzz_npy)
    sources=(data/npy.cpp)
    seeder=tests/fuzz/make_npy_seeds.cpp
    ;;
  *)
    echo "unknown fuzz target '$target' (known: fuzz_npy)" >&2
    exit 2
    ;;
esac

echo "[fuzz] building $out/$target with $CXX" >&2
"$CXX" "${flags[@]}" -fsanitize=fuzzer,address "tests/fuzz/$target.cpp" "${sources[@]}" -lfmt -o "$out/$target"
"$CXX" "${flags[@]}" "$seeder" "${sources[@]}" -lfmt -o "$out/${target}_seeds"

corpus="$out/$target-corpus"
artifacts="$out/$target-artifacts"
mkdir -p "$corpus" "$artifacts"
"$out/${target}_seeds" "$corpus"
echo "[fuzz] running $target for ${seconds}s on $(ls "$corpus" | wc -l) corpus files" >&2
# -rss_limit_mb keeps the parser honest about allocations bounded by the input size.
"$out/$target" -max_total_time="$seconds" -rss_limit_mb=512 -malloc_limit_mb=64 -max_len=4096 \
  -artifact_prefix="$artifacts/" -print_final_stats=1 "$corpus"
