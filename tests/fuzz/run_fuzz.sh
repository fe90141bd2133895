#!/usr/bin/env bash
# Builds a libFuzzer target standalone with clang-14 (-fsanitize=fuzzer,address) and runs it for SECONDS
# seconds on a seed corpus of valid inputs it generates. Needs clang-14 and libclang-rt-14-dev (the fuzzer
# runtime), plus the fmt, xxhash and zstd development libraries. Works from any directory.
#   tests/fuzz/run_fuzz.sh TARGET SECONDS      e.g. tests/fuzz/run_fuzz.sh fuzz_shard 60
# Environment:
#   VIMO_FUZZ_BUILD_DIR  where binaries, corpus and crash artifacts go (default: <repo>/build-fuzz; ctest passes
#                        its own build directory, so parallel runs and fresh clones do not collide)
#   CXX_FUZZ             the compiler (default: clang++-14)
# Crashes are written to $VIMO_FUZZ_BUILD_DIR/TARGET-artifacts/. Exit status: 0 clean, 1 the fuzzer found a
# bug (or the build failed), 2 usage, 77 skipped because the toolchain is missing (ctest SKIP_RETURN_CODE).
set -euo pipefail
target="${1:?usage: $0 TARGET SECONDS}"
seconds="${2:?usage: $0 TARGET SECONDS}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${VIMO_FUZZ_BUILD_DIR:-$repo/build-fuzz}"
CXX="${CXX_FUZZ:-clang++-14}"

flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer "-I$repo")
case "$target" in
  fuzz_npy)
    sources=("$repo/data/npy.cpp")
    libs=(-lfmt)
    seeder="$repo/tests/fuzz/make_npy_seeds.cpp"
    max_len=4096
    malloc_limit_mb=64  # a .npy's data is never larger than the file
    ;;
  fuzz_shard)
    sources=("$repo/data/shard.cpp" "$repo/data/shard_reader.cpp" "$repo/data/shard_writer.cpp" "$repo/data/shard_mapping.cpp")
    libs=(-lfmt -lxxhash -lzstd)
    seeder="$repo/tests/fuzz/make_shard_seeds.cpp"
    max_len=4096
    # zstd legitimately expands up to 2^15x (a 4-byte RLE block decodes to 128 KiB): 4 KiB -> 128 MiB.
    malloc_limit_mb=160
    ;;
  *)
    echo "unknown fuzz target '$target' (known: fuzz_npy, fuzz_shard)" >&2
    exit 2
    ;;
esac

if ! command -v "$CXX" > /dev/null; then
  echo "[fuzz] SKIPPED: $CXX not found. HINT: apt-get install clang-14 libclang-rt-14-dev, or set CXX_FUZZ" >&2
  exit 77
fi
runtime="$("$CXX" -print-resource-dir)/lib/linux/libclang_rt.fuzzer-$(uname -m).a"
if [ ! -f "$runtime" ]; then
  echo "[fuzz] SKIPPED: the libFuzzer runtime $runtime is missing. HINT: apt-get install libclang-rt-14-dev" >&2
  exit 77
fi

mkdir -p "$out"
harness="$repo/tests/fuzz/$target.cpp"
# Rebuilds only when a source or header it reads is newer than the binary.
stale() {
  local binary="$1"
  shift
  [ ! -x "$binary" ] && return 0
  [ -n "$(find "$@" "$repo/data" -newer "$binary" \( -name '*.cpp' -o -name '*.h' \) -print -quit)" ]
}
if stale "$out/$target" "$harness" "${sources[@]}"; then
  echo "[fuzz] building $out/$target with $CXX" >&2
  "$CXX" "${flags[@]}" -fsanitize=fuzzer,address "$harness" "${sources[@]}" "${libs[@]}" -o "$out/$target"
fi
if stale "$out/${target}_seeds" "$seeder" "${sources[@]}"; then
  "$CXX" "${flags[@]}" "$seeder" "${sources[@]}" "${libs[@]}" -o "$out/${target}_seeds"
fi

corpus="$out/$target-corpus"
artifacts="$out/$target-artifacts"
mkdir -p "$corpus" "$artifacts"
"$out/${target}_seeds" "$corpus"
# Crashing inputs saved as regression seeds (tests/fuzz/regressions/TARGET/*) are replayed first.
regressions="$repo/tests/fuzz/regressions/$target"
dirs=("$corpus")
[ -d "$regressions" ] && dirs+=("$regressions")
echo "[fuzz] running $target for ${seconds}s on $(ls "$corpus" | wc -l) corpus files" >&2
# -rss_limit_mb/-malloc_limit_mb keep the parser honest about allocations bounded by the input size.
# -error_exitcode=1: libFuzzer's default (77) would read as "skipped" to ctest.
if ! "$out/$target" -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb="$malloc_limit_mb" -max_len="$max_len" \
    -error_exitcode=1 -timeout_exitcode=1 -artifact_prefix="$artifacts/" -print_final_stats=1 "${dirs[@]}"; then
  echo "[fuzz] $target found a bug: see the report above and the input in $artifacts/" >&2
  exit 1
fi
