#!/usr/bin/env bash
# Socket activation as a .socket unit does it: systemd-socket-activate holds
# the listening socket, starts bscache --systemd on the first connection and
# passes the socket in LISTEN_FDS; real clients are served through it, and
# bscache leaves the socket (systemd's) in place when it stops.
source "$(dirname "$0")/lib.sh"
command -v systemd-socket-activate >/dev/null || skip "systemd-socket-activate missing (Debian package systemd)"

start_nbdkit up memory 16M
qemu-io -f raw -c 'write -P 0xab 1M 64k' "$(uri up)" >/dev/null

systemd-socket-activate -l "$T/act.sock" \
  "$BSCACHE" --systemd --upstream "$(uri up)" --pidfile "$T/bs.pid" >"$T/bs.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 400); do [[ -S $T/act.sock ]] && break; sleep 0.05; done
[[ -S $T/act.sock ]] || fail "systemd-socket-activate did not listen"
[[ ! -e $T/bs.pid ]] || fail "bscache started before the first connection"

# The first connection starts bscache and is then served by it.
size=$(nbdinfo --size "nbd+unix:///?socket=$T/act.sock") || fail "nbdinfo through the activated socket"
[[ $size == 16777216 ]] || fail "size $size"
wait_for_file "$T/bs.pid"
qemu-img map --output=json "nbd+unix:///?socket=$T/act.sock" >"$T/map.json" || fail "qemu-img map"
jq -e 'map(select(.data)) | length >= 1' "$T/map.json" >/dev/null || fail "map shows no data: $(cat "$T/map.json")"
grep -q 'listening on' "$T/bs.log" || fail "no start-up line"
pass "socket-activated bscache serves nbdinfo and qemu-img map"

stop_server bs
[[ -S $T/act.sock ]] || fail "bscache removed the socket systemd passed it"
pass "stops on SIGTERM and leaves systemd's socket alone"
