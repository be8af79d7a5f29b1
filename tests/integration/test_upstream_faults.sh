#!/usr/bin/env bash
# A failing upstream: death and restart, injected errors, a stuck upstream
# (--upstream-timeout), SIGTERM with writes in flight, many idle clients.
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3

# ---- 1. upstream dies with a request in flight, then comes back ----
start_nbdkit up --filter=delay memory 64M delay-read=3
start_bscache bs --upstream "$(uri up)" --stats-file "$T/bs.json"
$py - "$(uri bs)" "$(cat "$T/up.pid")" "$T" <<'PY' || fail "upstream death"
import os, signal, subprocess, sys, time, nbd
uri, up_pid, tmp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = nbd.NBD(); h.connect_uri(uri)
buf = nbd.Buffer(4096)
cookie = h.aio_pread(buf, 0)
time.sleep(0.3)
os.kill(up_pid, signal.SIGKILL)                 # upstream dies mid-request
start = time.time()
while True:
    h.poll(1000)
    try:
        if h.aio_command_completed(cookie):
            sys.exit("a read in flight when upstream died succeeded")
    except nbd.Error as e:
        print(f"in-flight read failed as it should: {e}")
        break
    if time.time() - start > 20:
        sys.exit("the in-flight read hung")
try:
    h.pread(4096, 0); sys.exit("read with upstream down succeeded")
except nbd.Error as e:
    print(f"read while upstream is down: {e}")
# Upstream comes back on the same socket: bscache reconnects by itself.
time.sleep(0.8)  # a few reconnect attempts fail meanwhile
os.unlink(f"{tmp}/up.sock")  # SIGKILL left the socket behind
subprocess.run(["nbdkit", "-U", f"{tmp}/up.sock", "-P", f"{tmp}/up2.pid", "memory", "64M"], check=True)
for _ in range(100):
    try:
        h.pread(4096, 0); break
    except nbd.Error:
        time.sleep(0.1)
else:
    sys.exit("bscache did not reconnect")
h.pwrite(b"x" * 4096, 0)
assert h.pread(4096, 0) == b"x" * 4096
print("reconnected and serving")
PY
PIDS+=("$(cat "$T/up2.pid")")
kill -USR1 "$(cat "$T/bs.pid")"
wait_for_file "$T/bs.json"
for _ in $(seq 50); do jq -e '.upstream.reconnects >= 1' "$T/bs.json" >/dev/null 2>&1 && break; sleep 0.1; done
jq -e '.upstream.reconnects >= 1' "$T/bs.json" >/dev/null || fail "stats show no reconnect"
grep -q "reconnect attempt 1 failed" "$T/bs.log" || fail "failed reconnect attempts are not logged"
grep -Eq "upstream connection [0-9]+ reconnected" "$T/bs.log" || fail "the reconnect is not logged"
pass "upstream death: in-flight request failed, reconnected, serving again"

# ---- 2. injected errors reach the client; a failed write drops its range ----
start_nbdkit err --filter=error --filter=stats memory 64M error-pwrite=ENOSPC error-pwrite-rate=100% \
  statsfile="$T/err.stats"
start_bscache bse --upstream "$(uri err)" --stats-file "$T/bse.json"
$py - "$(uri bse)" <<'PY' || fail "injected errors"
import errno, sys, nbd
h = nbd.NBD(); h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION); h.connect_uri(sys.argv[1])
def status():
    seen = []
    h.block_status(65536, 1 << 20, lambda m, o, e, err: seen.extend(zip(e[0::2], e[1::2])) or 0, nbd.CMD_FLAG_REQ_ONE)
    return seen
assert status()[0][1] == 3, "hole before the write"
try:
    h.pwrite(b"y" * 65536, 1 << 20); sys.exit("write succeeded despite the injected error")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, f"expected ENOSPC, got {e}"
print("failed write:", status())   # asked upstream again: the range was dropped
PY
stop_server bse
stop_server err
upstream_bs=$(stats_count "$T/err.stats" extents)
((upstream_bs >= 2)) || fail "a failed write did not drop the cached range ($upstream_bs upstream block-status calls)"
pass "ENOSPC reaches the client; the failed write's range was fetched again"

# ---- 3. a stuck upstream: --upstream-timeout fails the request, then reconnects ----
start_nbdkit stuck --filter=delay memory 64M delay-read=30
start_bscache bst --upstream "$(uri stuck)" --upstream-timeout 1s
$py - "$(uri bst)" <<'PY' || fail "upstream timeout"
import sys, time, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
start = time.time()
try:
    h.pread(4096, 0); sys.exit("stuck read succeeded")
except nbd.Error as e:
    took = time.time() - start
    print(f"stuck read failed after {took:.1f} s: {e}")
    assert took < 20, "the timeout did not fire"
for _ in range(100):   # reconnected: a request that does not read works
    try:
        h.flush(); break
    except nbd.Error:
        time.sleep(0.1)
else:
    sys.exit("no reconnect after the timeout")
PY
pass "--upstream-timeout fails a stuck request and reconnects"

# ---- 4. SIGTERM with writes in flight: every acknowledged write is upstream ----
start_nbdkit slow --filter=delay memory 64M delay-write=1
start_bscache bsw --upstream "$(uri slow)"
$py - "$(uri bsw)" "$(uri slow)" "$(cat "$T/bsw.pid")" <<'PY' || fail "SIGTERM with writes in flight"
import os, signal, sys, time, nbd
proxy, direct, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD(); h.connect_uri(proxy)
cookies = {}
for i in range(8):
    buf = nbd.Buffer.from_bytearray(bytearray([i + 1]) * 65536)
    cookies[h.aio_pwrite(buf, i * 65536)] = i
time.sleep(0.3)
os.kill(pid, signal.SIGTERM)
acked = []
deadline = time.time() + 30
while cookies and time.time() < deadline:
    try:
        h.poll(1000)
    except nbd.Error:
        break
    for c in list(cookies):
        try:
            if h.aio_command_completed(c):
                acked.append(cookies.pop(c))
        except nbd.Error:
            cookies.pop(c)
d = nbd.NBD(); d.connect_uri(direct)
for i in acked:
    assert d.pread(65536, i * 65536) == bytes([i + 1]) * 65536, f"acknowledged write {i} is not upstream"
print(f"{len(acked)} of 8 writes acknowledged during shutdown, all upstream")
assert acked, "no write was acknowledged: shutdown did not let in-flight writes finish"
PY
for _ in $(seq 100); do kill -0 "$(cat "$T/bsw.pid" 2>/dev/null || echo 0)" 2>/dev/null || break; sleep 0.1; done
pass "SIGTERM: acknowledged writes are all upstream"

# ---- 5. many idle clients, and the connection limit ----
start_nbdkit idle memory 16M
start_bscache bsi --upstream "$(uri idle)"
$py - "$T/bsi.sock" "$(uri bsi)" <<'PY' || fail "idle connections"
import resource, socket, sys, nbd
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
path, uri = sys.argv[1], sys.argv[2]
idle = []
for _ in range(1000):
    s = socket.socket(socket.AF_UNIX); s.connect(path); idle.append(s)
h = nbd.NBD(); h.connect_uri(uri)          # served while 1,000 clients sit idle
assert len(h.pread(512, 0)) == 512
for s in idle: s.close()
print("served with 1,000 idle clients connected")
PY
pass "1,000 idle clients do not stop service"

start_bscache bsl --upstream "$(uri idle)" --max-connections 5
$py - "$T/bsl.sock" "$(uri bsl)" <<'PY' || fail "--max-connections"
import socket, sys, time, nbd
path, uri = sys.argv[1], sys.argv[2]
held = [nbd.NBD() for _ in range(5)]
for h in held: h.connect_uri(uri)          # five real clients: the limit
extra = socket.socket(socket.AF_UNIX); extra.connect(path); extra.settimeout(10)
assert extra.recv(1) == b"", "connection 6 was not refused"
for h in held: h.shutdown()
for _ in range(100):                       # slots free again once they are gone
    try:
        h = nbd.NBD(); h.connect_uri(uri); break
    except nbd.Error:
        time.sleep(0.05)
assert len(h.pread(512, 0)) == 512
print("the sixth connection was refused; service continued")
PY
grep -q "refusing connection" "$T/bsl.log" || fail "the refusal is not logged"
pass "--max-connections refuses the extra client and keeps serving"
