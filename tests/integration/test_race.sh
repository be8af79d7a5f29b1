#!/usr/bin/env bash
# The race nbdkit's cacheextents loses: a block-status fetch that runs while a
# write is in flight must not be cached over the written range.
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3
here=$(dirname "$0")

start_nbdkit up --filter=delay memory 64M delay-write=1500ms
start_bscache bs --upstream "$(uri up)"
$py "$here/race.py" "$(uri bs)" $((8 << 20)) 65536 1.5 || fail "bscache served a stale hole after a write"
pass "no stale state after a write racing a fetch"

# A fetch already in flight (slow extents) when the write starts and ends.
start_nbdkit up2 --filter=delay memory 64M delay-extents=1500ms
start_bscache bs2 --upstream "$(uri up2)"
$py - "$(uri bs2)" <<'PY' || fail "fetch in flight across a write"
import sys, threading, time, nbd
uri = sys.argv[1]
def connect():
    h = nbd.NBD(); h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION); h.connect_uri(uri); return h
a, b = connect(), connect()
def status(h):
    seen = []
    h.block_status(65536, 1 << 20, lambda m, o, e, err: seen.extend(zip(e[0::2], e[1::2])) or 0,
                   nbd.CMD_FLAG_REQ_ONE)
    return seen
t = threading.Thread(target=status, args=(b,)); t.start()   # fetch goes upstream, slowly
time.sleep(0.3)
a.pwrite(b"\xcd" * 65536, 1 << 20)                           # completes while the fetch is pending
t.join()
after = status(b)
assert not after[0][1] & 3, f"stale after write: {after}"
print("ok:", after)
PY
pass "no stale state from a fetch in flight across a write"

# The stale-late interleaving: upstream computes a block-status reply, a
# write arrives and completes, and only then the (now stale) reply arrives.
start_nbdkit late python "$here/stale_extents_plugin.py" size=$((64 << 20)) delay=1.5
start_bscache bs3 --upstream "$(uri late)"
$py - "$(uri bs3)" <<'PY' || fail "a stale reply arriving after a write was cached"
import sys, threading, time, nbd
uri = sys.argv[1]
def connect():
    h = nbd.NBD(); h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION); h.connect_uri(uri); return h
a, b = connect(), connect()
def status(h):
    seen = []
    h.block_status(65536, 4 << 20, lambda m, o, e, err: seen.extend(zip(e[0::2], e[1::2])) or 0,
                   nbd.CMD_FLAG_REQ_ONE)
    return seen
during = []
t = threading.Thread(target=lambda: during.append(status(b))); t.start()  # snapshot: hole
time.sleep(0.5)
a.pwrite(b"\xee" * 65536, 4 << 20)   # completes before the stale reply arrives
t.join()
after = status(b)
assert not after[0][1] & 3, f"stale: {after} after the write completed (during: {during})"
print("ok: during", during, "after", after)
PY
pass "no stale state from a reply computed before a write and delivered after it"
