#!/usr/bin/env bash
# --reconnect-max D: once no upstream connection has been up for D, bscache
# logs why and exits with status 3 (for systemd's Restart=); without it (0,
# the default) it keeps reconnecting.
source "$(dirname "$0")/lib.sh"

start_nbdkit up memory 16M
start_bscache giver --upstream "$(uri up)" --reconnect-max 1s
start_bscache stayer --upstream "$(uri up)"
[[ $(nbdinfo --size "$(uri giver)") == 16777216 ]] || fail "not serving before the upstream dies"
giver=$(cat "$T/giver.pid")

# SIGKILL: nbdkit waits for its clients on SIGTERM.
up=$(cat "$T/up.pid")
kill -KILL "$up"
for _ in $(seq 200); do kill -0 "$up" 2>/dev/null || break; sleep 0.05; done
for _ in $(seq 1200); do kill -0 "$giver" 2>/dev/null || break; sleep 0.05; done
kill -0 "$giver" 2>/dev/null && fail "still running 60 s after the upstream died, with --reconnect-max 1s"
rc=0; wait "$giver" || rc=$?
((rc == 3)) || fail "exit status $rc, expected 3"
grep -q 'no upstream connection for 1000 ms (--reconnect-max): giving up' "$T/giver.log" || fail "no log line saying why"
[[ ! -e $T/giver.sock && ! -e $T/giver.pid ]] || fail "socket or pidfile left behind"
pass "--reconnect-max 1s: exit 3 with a log line once the upstream is gone"

# The default keeps trying: it outlived the one above, and serves again when
# the upstream comes back.
kill -0 "$(cat "$T/stayer.pid")" 2>/dev/null || fail "the default (retry forever) exited"
start_nbdkit up memory 16M
for _ in $(seq 600); do nbdinfo --size "$(uri stayer)" >/dev/null 2>&1 && break; sleep 0.1; done
[[ $(nbdinfo --size "$(uri stayer)") == 16777216 ]] || fail "the default did not reconnect"
pass "without --reconnect-max: still running, reconnected when the upstream came back"

rc=0; "$BSCACHE" --upstream "$(uri up)" --unix "$T/x.sock" --reconnect-max 2x 2>"$T/err" || rc=$?
((rc == 2)) && grep -q -- '^bscache: --reconnect-max ' "$T/err" || fail "--reconnect-max 2x: exit $rc, $(cat "$T/err")"
pass "a bad --reconnect-max is refused"
