#!/usr/bin/env bash
# Upstream comes back from a restart with another size: the cache is dropped,
# new clients are offered the new size, a client connected across the change
# keeps working within what it negotiated.
source "$(dirname "$0")/lib.sh"

start_nbdkit up memory 16M
start_bscache bs --upstream "$(uri up)" --stats-file "$T/bs.json"
[[ $(nbdinfo --size "$(uri bs)") == 16777216 ]] || fail "size before the restart"
qemu-img map -f raw --output=json "$(uri bs)" >/dev/null  # fill the cache

# A client that stays connected across the restart.
/usr/bin/python3 - "$(uri bs)" "$T/restarted" >"$T/old.out" 2>&1 <<'PY' &
import os, sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("old size", h.get_size(), flush=True)
h.pread(4096, 0)
print("old client read", flush=True)
for _ in range(600):          # wait for the test to restart upstream
    if os.path.exists(sys.argv[2]):
        break
    time.sleep(0.05)
for _ in range(100):          # then until bscache has reconnected
    try:
        h.pwrite(b"\xab" * 4096, 8 << 20)
        break
    except nbd.Error:
        time.sleep(0.1)
assert h.pread(4096, 8 << 20) == b"\xab" * 4096
print("old client ok", flush=True)
PY
old=$!

for _ in $(seq 200); do grep -q "old client read" "$T/old.out" && break; sleep 0.05; done
grep -q "old client read" "$T/old.out" || { cat "$T/old.out"; fail "the old client could not read"; }
kill -9 "$(cat "$T/up.pid")"  # nbdkit would wait for bscache's connections to close
rm -f "$T/up.pid" "$T/up.sock"
start_nbdkit up memory 32M
touch "$T/restarted"
for _ in $(seq 100); do grep -q "new clients see the new export" "$T/bs.log" && break; sleep 0.1; done
grep -q "new clients see the new export" "$T/bs.log" || fail "the size change is not logged"
[[ $(nbdinfo --size "$(uri bs)") == 33554432 ]] || fail "new clients should see the new size, got $(nbdinfo --size "$(uri bs)")"
qemu-io -f raw -c 'write -P 0x5a 30M 64k' "$(uri bs)" >/dev/null || fail "write past the old end"
# The old client's write (retried until upstream is back) must be done before
# the two maps are taken, or they could describe different disks.
wait "$old" || { cat "$T/old.out"; fail "the client connected across the restart failed"; }
grep -q "old client ok" "$T/old.out" || fail "old client"
qemu-img map -f raw --output=json "$(uri bs)" >"$T/new.map"
qemu-img map -f raw --output=json "$(uri up)" >"$T/direct.map"
cmp -s "$T/new.map" "$T/direct.map" || fail "map of the resized export differs from direct"
pass "resized upstream: new size for new clients, old client keeps working, map equals direct"

# Shrunk and read-only: new clients see both; a client connected before keeps
# its 32 MiB view, and its requests past the new end fail (upstream refuses
# them) while those inside still work.
/usr/bin/python3 - "$(uri bs)" "$T/shrunk" >"$T/old2.out" 2>&1 <<'PY' &
import os, sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.get_size() == 32 << 20, h.get_size()
print("old2 connected", flush=True)
for _ in range(600):
    if os.path.exists(sys.argv[2]):
        break
    time.sleep(0.05)
for _ in range(100):          # until bscache has reconnected
    try:
        h.pread(4096, 0)
        break
    except nbd.Error:
        time.sleep(0.1)
try:
    h.pread(4096, 20 << 20)
    print("old2 read past the new end succeeded", flush=True)
except nbd.Error as e:
    print(f"old2 read past the new end failed: {e.errnum}", flush=True)
try:
    h.pwrite(b"\x01" * 4096, 0)
    print("old2 write to the read-only upstream succeeded", flush=True)
except nbd.Error as e:
    print(f"old2 write refused: {e.errnum}", flush=True)
assert len(h.pread(4096, 4 << 20)) == 4096
print("old2 ok", flush=True)
PY
old2=$!
for _ in $(seq 200); do grep -q "old2 connected" "$T/old2.out" && break; sleep 0.05; done
grep -q "old2 connected" "$T/old2.out" || { cat "$T/old2.out"; fail "the second old client could not connect"; }
kill -9 "$(cat "$T/up.pid")"
rm -f "$T/up.pid" "$T/up.sock"
start_nbdkit up -r memory 8M
touch "$T/shrunk"
for _ in $(seq 100); do (($(grep -c "new clients see the new export" "$T/bs.log") >= 2)) && break; sleep 0.1; done
(($(grep -c "new clients see the new export" "$T/bs.log") >= 2)) || fail "the second change is not logged"
[[ $(nbdinfo --size "$(uri bs)") == 8388608 ]] || fail "new clients should see 8 MiB, got $(nbdinfo --size "$(uri bs)")"
nbdinfo --json "$(uri bs)" | jq -e '.exports[0]."is_read_only" == true' >/dev/null || fail "new clients should see a read-only export"
qemu-io -f raw -c 'write -P 0x5a 0 4k' "$(uri bs)" >/dev/null 2>&1 && fail "a write to the read-only export succeeded"
wait "$old2" || { cat "$T/old2.out"; fail "the client connected across the shrink failed"; }
grep -q "old2 read past the new end failed" "$T/old2.out" || { cat "$T/old2.out"; fail "old client read past the new end"; }
grep -q "old2 write refused" "$T/old2.out" || { cat "$T/old2.out"; fail "old client wrote to a read-only upstream"; }
grep -q "old2 ok" "$T/old2.out" || fail "old client could not read inside the new end"
qemu-img map -f raw --output=json "$(uri bs)" >"$T/small.map"
qemu-img map -f raw --output=json "$(uri up)" >"$T/small-direct.map"
cmp -s "$T/small.map" "$T/small-direct.map" || fail "map of the shrunk export differs from direct"
kill -0 "$(cat "$T/bs.pid")" || fail "bscache died"
pass "shrunk, read-only upstream: new clients see both, the old client's requests past the new end and its writes fail, bscache serves on"
