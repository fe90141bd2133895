#!/usr/bin/env bash
# Three ranks step through allreduces; rank 2 is SIGSTOPped mid-run. mpirun sees nothing wrong (the process
# lives), so the heartbeat watchdog must end the survivors: each exits non-zero within its timeout (3 s) plus a
# margin, printing a message that names rank 2, its host and its last collective. mpirun must then end too:
# the first survivor's exit status 3 makes it abort the job, which kills the stopped rank (Note [Watchdog
# under mpirun] in comm/watchdog.cpp).
#   watchdog_stop.sh WATCHDOG_DRIVER
source "$(dirname "$0")/watchdog_common.sh"
run_and_signal STOP 2
echo "survivors gone ${elapsed} s after SIGSTOP; mpirun exit status ${code}"
[ "$code" -ne 0 ] || fail "mpirun exited 0"
[ "$mpirun_hung" -eq 0 ] || fail "mpirun did not end after the survivors (the stopped rank had to be killed)"
expect_watchdog_message 0 2
expect_watchdog_message 1 2
grep -q "Exit code: *3" <<< "$out" || fail "mpirun does not report the watchdog's exit status 3"
echo "1 passed, 0 failed"
