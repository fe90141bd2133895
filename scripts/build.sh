#!/usr/bin/env bash
# Sets up dependencies (scripts/setup.sh), configures with CMake + Ninja + ccache, and builds.
#   VIMO_BUILD_DIR  build directory (default: build)       VIMO_CUDA  AUTO | ON | OFF (default AUTO)
#   VIMO_TARGETS    targets to build (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${VIMO_BUILD_DIR:-build}"

eval "$(bash scripts/setup.sh)"

# A cold build of every target leaves about 3.2 GiB in the build directory (RelWithDebInfo: debug information
# in each static library and test binary, a 0.8 GiB precompiled header). Stop before compiling for minutes
# when the disk cannot hold it, instead of failing later in the linker or ar with ENOSPC.
mkdir -p "$build_dir"
free_kib=$(df -Pk "$build_dir" | awk 'NR == 2 { print $4 }')
need_kib=$((3584 * 1024))
if [ -f "$build_dir/build.ninja" ]; then need_kib=$((512 * 1024)); fi
if [ -n "$free_kib" ] && [ "$free_kib" -lt "$need_kib" ]; then
  msg="only $((free_kib / 1024)) MiB free on the filesystem of $(cd "$build_dir" && pwd); this build needs about $((need_kib / 1024)) MiB there (old build directories and fresh clones in /tmp are the usual culprits)"
  if [ -z "${VIMO_TARGETS:-}" ]; then echo "scripts/build.sh: error: $msg" >&2; exit 1; fi
  echo "scripts/build.sh: warning: $msg" >&2
fi
export CCACHE_DIR="${CCACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vimo/ccache}"
export CCACHE_MAXSIZE="${CCACHE_MAXSIZE:-8G}"  # room for a few builds with debug information
# Paths under the checkout are hashed relative to it, so a fresh clone elsewhere reuses the cache.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}"
# ...and the working directory of a compile with debug information is not hashed either: C++ objects name the
# checkout "." (-fdebug-prefix-map in CMakeLists.txt), and CUDA objects' host debug information may name
# another clone's directory, which only a debugger reads.
export CCACHE_NOHASHDIR="${CCACHE_NOHASHDIR:-1}"
# Precompiled headers and ccache work together only when ccache may trust the PCH's timestamps.
export CCACHE_SLOPPINESS="${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}"

if [ ! -f "$build_dir/build.ninja" ] || [ "$build_dir/.vimo-torch" -ot scripts/setup.sh ] \
    || [ "$(cat "$build_dir/.vimo-torch" 2>/dev/null)" != "$VIMO_TORCH_PREFIX" ]; then
  cmake -S . -B "$build_dir" -G Ninja \
    -DVIMO_TORCH_PREFIX="$VIMO_TORCH_PREFIX" -DVIMO_TORCH_CXX11_ABI="$VIMO_TORCH_CXX11_ABI" \
    -DVIMO_TORCH_CUDA="$VIMO_TORCH_CUDA" -DVIMO_CUDA="${VIMO_CUDA:-AUTO}"
  echo "$VIMO_TORCH_PREFIX" > "$build_dir/.vimo-torch"
fi
# shellcheck disable=SC2086
cmake --build "$build_dir" -j "$(nproc)" ${VIMO_TARGETS:+--target $VIMO_TARGETS}
