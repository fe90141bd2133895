#!/usr/bin/env bash
# Three ranks step through allreduces; rank 1 is SIGKILLed mid-run, twice (Note [Watchdog under mpirun] in
# comm/watchdog.cpp):
#   1. Under plain mpirun, which notices the death itself and kills the survivors within a second or two: they
#      must be gone within the watchdog timeout (3 s) plus a margin, and mpirun must fail naming rank 1.
#   2. Under mpirun with orte_enable_recovery, which leaves the survivors running, as a launcher that does not
#      watch its processes would: the watchdog must end them, each with exit status 3 and a message naming
#      rank 1, its host and its last collective, within the timeout plus the margin.
#   watchdog_kill.sh WATCHDOG_DRIVER
source "$(dirname "$0")/watchdog_common.sh"
run_and_signal KILL 1
echo "plain mpirun: survivors gone ${elapsed} s after SIGKILL; mpirun exit status ${code}"
[ "$code" -ne 0 ] || fail "mpirun exited 0"
[ "$mpirun_hung" -eq 0 ] || fail "mpirun did not end"
grep -q "process rank 1 with PID [0-9]* on node [^ ]* exited on signal 9" <<< "$out" ||
  fail "mpirun did not name the killed rank"
# Where the watchdog got there before mpirun, its message must be right.
if grep -q "^vimo watchdog" <<< "$out"; then
  for r in 0 2; do grep -q "^vimo watchdog \[rank $r on " <<< "$out" && expect_watchdog_message "$r" 1; done
fi

rm -f "$work"/rank*
record_exit=1 run_and_signal KILL 1 --mca orte_enable_recovery 1
echo "mpirun with recovery: survivors gone ${elapsed} s after SIGKILL; exit statuses $(exit_status 0) $(exit_status 2)"
[ "$mpirun_hung" -eq 0 ] || fail "mpirun did not end"
for r in 0 2; do
  [ "$(exit_status $r)" = 3 ] || fail "rank $r exited with status $(exit_status $r), not the watchdog's 3"
  expect_watchdog_message "$r" 1
done
echo "1 passed, 0 failed"
