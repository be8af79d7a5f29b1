#!/usr/bin/env bash
# Malformed handshakes and requests get the protocol's answer, and the proxy
# keeps serving everyone else.
source "$(dirname "$0")/lib.sh"
here=$(dirname "$0")

start_nbdkit up memory 64M
start_bscache bs --upstream "$(uri up)" --handshake-timeout 2s
/usr/bin/python3 "$here/rawclient.py" "$T/bs.sock" || fail "bad input handling"

# An idle client that never finishes the handshake is dropped after the timeout.
/usr/bin/python3 - "$T/bs.sock" <<'PY' || fail "handshake timeout"
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(30)
start = time.time(); data = s.recv(18)
while s.recv(1024): pass
print(f"idle client dropped after {time.time() - start:.1f} s")
PY
kill -0 "$(cat "$T/bs.pid")" || fail "bscache died"
qemu-img map --output=json "$(uri bs)" >/dev/null || fail "proxy unusable after bad clients"
pass "bad input answered, proxy still serving"
