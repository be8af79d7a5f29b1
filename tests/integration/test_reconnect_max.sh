#!/usr/bin/env bash
# --reconnect-max D: once no upstream connection has been up for D, bscache
# logs why and exits with status 3 (for systemd's Restart=); without it (0,
# the default) it keeps reconnecting.
source "$(dirname "$0")/lib.sh"

start_nbdkit up memory 16M
# systemd's side of sd_notify, to see the STATUS= bscache leaves behind.
/usr/bin/python3 "$(dirname "$0")/notify_listener.py" "$T/notify.sock" "$T/notify.txt" 90 &
PIDS+=($!)
for _ in $(seq 100); do grep -q LISTENING "$T/notify.txt" 2>/dev/null && break; sleep 0.05; done
NOTIFY_SOCKET=$T/notify.sock start_bscache giver --upstream "$(uri up)" --reconnect-max 1s
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
# The reason is the last STATUS= systemd sees (the stop must not overwrite it).
grep '^STATUS=' "$T/notify.txt" | tail -1 | grep -q 'no upstream connection for 1000 ms (--reconnect-max): giving up' \
  || fail "last STATUS= does not say why: $(grep '^STATUS=' "$T/notify.txt" | tail -1)"
pass "--reconnect-max 1s: exit 3 with a log line and systemd STATUS= once the upstream is gone"

# With --run, giving up ends the command too, and the exit status is still 3
# (not the command's 143 from SIGTERM). The command uses the export first:
# exports open on their first client, and only open ones have connections to lose.
start_nbdkit up2 memory 16M
"$BSCACHE" --upstream "$(uri up2)" --reconnect-max 1s --run 'nbdinfo --size "$uri" >/dev/null; sleep 60' \
  >"$T/run.log" 2>&1 &
runner=$!
for _ in $(seq 100); do grep -q 'export "" opened' "$T/run.log" && break; sleep 0.05; done
kill -KILL "$(cat "$T/up2.pid")"
for _ in $(seq 1200); do kill -0 "$runner" 2>/dev/null || break; sleep 0.05; done
rc=0; wait "$runner" || rc=$?
((rc == 3)) || fail "--run with --reconnect-max: exit status $rc, expected 3"
pass "--reconnect-max with --run: the command is stopped, exit status 3"

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
