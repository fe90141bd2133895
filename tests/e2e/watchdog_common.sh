# Shared by watchdog_kill.sh and watchdog_stop.sh: runs tests/comm/watchdog_driver under mpirun, signals one
# rank mid-run, and measures how the survivors end. Usage (sourced): run_and_signal SIGNAL VICTIM [MPIRUN
# OPTION...]; it sets
# $out (everything mpirun printed), $code (mpirun's exit status), $elapsed (seconds from the signal until the
# last survivor was gone) and $victim_host. Every process it started is killed on exit, whatever happens.
set -euo pipefail
driver="$1"
ranks=3; timeout_s=3; interval_s=0.25; run_s=60; margin_s=10
work=$(mktemp -d "${TMPDIR:-/tmp}/vimo-watchdog.XXXXXX")
mpirun_pid=""
cleanup() {
  for f in "$work"/rank*.pid; do
    [ -f "$f" ] || continue
    kill -CONT "$(cat "$f")" 2>/dev/null || true
    kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
  [ -n "$mpirun_pid" ] && kill -KILL "$mpirun_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; echo "--- mpirun output:" >&2; cat "$work/out.log" >&2 || true; exit 1; }
alive() { kill -0 "$1" 2>/dev/null && ! grep -q '^State:\s*Z' "/proc/$1/status" 2>/dev/null; }

run_and_signal() {
  local signal="$1" victim="$2"
  shift 2
  local command=("$driver" "$work" "$timeout_s" "$interval_s" "$run_s")
  if [ "${record_exit:-0}" -eq 1 ]; then
    # shellcheck disable=SC2016  # expanded by the rank's shell
    command=(sh -c '"$@"; code=$?; echo $code > "$2/rank$OMPI_COMM_WORLD_RANK.exit"; exit $code' sh "${command[@]}")
  fi
  mpirun --oversubscribe --bind-to none "$@" -np "$ranks" "${command[@]}" > "$work/out.log" 2>&1 &
  mpirun_pid=$!
  # Wait until every rank has done 20 steps (its watchdog is running by then).
  local deadline=$((SECONDS + 60))
  until [ "$(grep -c '^rank [0-9]* step 20$' "$work/out.log")" -ge "$ranks" ]; do
    [ $SECONDS -lt $deadline ] || fail "the ranks did not start stepping within 60 s"
    alive "$mpirun_pid" || fail "mpirun ended before the ranks started stepping"
    sleep 0.1
  done
  local victim_pid survivors=() r
  victim_pid=$(cat "$work/rank$victim.pid")
  for r in $(seq 0 $((ranks - 1))); do [ "$r" -eq "$victim" ] || survivors+=("$(cat "$work/rank$r.pid")"); done
  victim_host=$(hostname)
  local start; start=$(date +%s.%N)
  kill -"$signal" "$victim_pid"
  # Every survivor must be gone within the watchdog's timeout plus the margin.
  local limit; limit=$(python3 -c "print($timeout_s + $margin_s)")
  while :; do
    local any=0 p
    for p in "${survivors[@]}"; do alive "$p" && any=1; done
    elapsed=$(python3 -c "print(round($(date +%s.%N) - $start, 2))")
    [ "$any" -eq 1 ] || break
    python3 -c "import sys; sys.exit(0 if $elapsed < $limit else 1)" || fail "survivors still running after ${elapsed} s"
    sleep 0.05
  done
  # mpirun must end too (it may need the stopped victim killed: see Note [Watchdog under mpirun] in comm/watchdog.cpp).
  deadline=$((SECONDS + 15))
  while alive "$mpirun_pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  if alive "$mpirun_pid"; then
    mpirun_hung=1
    kill -CONT "$victim_pid" 2>/dev/null || true
    kill -KILL "$victim_pid" 2>/dev/null || true
  else
    mpirun_hung=0
  fi
  set +e
  wait "$mpirun_pid"; code=$?
  set -e
  mpirun_pid=""
  out=$(cat "$work/out.log")
}

exit_status() { cat "$work/rank$1.exit" 2>/dev/null || echo "none"; }

# Checks that survivor $1 printed the watchdog's message naming rank $2 (on this host) and its last collective.
expect_watchdog_message() {
  local line
  line=$(grep "^vimo watchdog \[rank $1 on " <<< "$out" | head -1) || fail "rank $1 printed no watchdog message"
  grep -q "rank $2 (host $victim_host) sent no heartbeat for [0-9.]* s; its last collective: allreduce #[0-9]* of 4.0 KiB" \
    <<< "$line" || fail "rank $1's message does not name rank $2, its host and its last collective: $line"
  grep -q "Exiting so the job does not hang. HINT: " <<< "$line" || fail "rank $1's message: $line"
}
