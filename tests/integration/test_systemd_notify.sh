#!/usr/bin/env bash
# systemd's notify protocol (Type=notify), with a listener playing systemd:
# READY=1 once listening, STATUS= with the hit rate every --stats-interval,
# WATCHDOG=1 pings when WATCHDOG_USEC is meant for us, STOPPING=1 on SIGTERM;
# abstract (@name) sockets; children never see NOTIFY_SOCKET.
source "$(dirname "$0")/lib.sh"
here=$(dirname "$0")
py=/usr/bin/python3

# wait_for_line FILE REGEX [SECONDS]
wait_for_line() {
  for _ in $(seq $((${3:-30} * 20))); do
    grep -qE "$2" "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  cat "$1" >&2
  fail "no line matching '$2' in $1"
}
start_listener() {  # SOCKET OUTFILE
  $py "$here/notify_listener.py" "$1" "$2" &
  PIDS+=($!)
  wait_for_line "$2" '^LISTENING$' 20
}

start_nbdkit up memory 64M

# A long-running service with a watchdog: WATCHDOG_PID names bscache itself
# (the shell's PID, which exec hands on).
start_listener "$T/notify.sock" "$T/notify.out"
NOTIFY_SOCKET=$T/notify.sock WATCHDOG_USEC=400000 sh -c 'export WATCHDOG_PID=$$; exec "$@"' sh \
  "$BSCACHE" --upstream "$(uri up)" --unix "$T/bs.sock" --pidfile "$T/bs.pid" --stats-interval 1s >"$T/bs.log" 2>&1 &
PIDS+=($!)
wait_for_line "$T/notify.out" '^READY=1$'
[[ -s $T/bs.pid ]] || fail "READY=1 came before the pidfile: not yet listening"
grep -q "^STATUS=listening on nbd+unix" "$T/notify.out" || fail "no STATUS with READY=1"
qemu-img map --output=json "$(uri bs)" >/dev/null
qemu-img map --output=json "$(uri bs)" >/dev/null
wait_for_line "$T/notify.out" '^STATUS=hit rate [0-9.]+%, [0-9-]+ upstream calls saved'
wait_for_line "$T/notify.out" '^WATCHDOG=1$'
pings=$(grep -c '^WATCHDOG=1$' "$T/notify.out")
pass "READY=1 once listening, STATUS with the hit rate, $pings WATCHDOG=1 pings so far"

pid=$(cat "$T/bs.pid")
kill -TERM "$pid"
rc=0; wait "$pid" || rc=$?
((rc == 0)) || fail "exit status $rc after SIGTERM"
grep -q '^STOPPING=1$' "$T/notify.out" || fail "no STOPPING=1 at shutdown"
[[ $(grep -n '^READY=1$' "$T/notify.out" | cut -d: -f1) -lt $(grep -n '^STOPPING=1$' "$T/notify.out" | cut -d: -f1) ]] \
  || fail "STOPPING=1 before READY=1"
pass "STOPPING=1 on SIGTERM"

# An abstract socket, a watchdog meant for another process (no pings), and a
# --run child that must not inherit any of it.
name="@bscache-test-$$-$RANDOM"
start_listener "$name" "$T/abstract.out"
NOTIFY_SOCKET=$name WATCHDOG_USEC=100000 WATCHDOG_PID=1 "$BSCACHE" --upstream "$(uri up)" \
  --run 'test -z "${NOTIFY_SOCKET+x}${WATCHDOG_USEC+x}${WATCHDOG_PID+x}"' >"$T/run.log" 2>&1 \
  || fail "the --run child saw NOTIFY_SOCKET or WATCHDOG_* (or bscache failed)"
wait_for_line "$T/abstract.out" '^STOPPING=1$'
grep -q '^READY=1$' "$T/abstract.out" || fail "no READY=1 on the abstract socket"
! grep -q '^WATCHDOG=1$' "$T/abstract.out" || fail "pinged a watchdog meant for PID 1"
pass "abstract socket; WATCHDOG_PID of another process ignored; children see no NOTIFY_SOCKET"
