#!/usr/bin/env bash
# One of four upstream connections dies mid-read: only what was in flight on
# that connection fails; reads in flight on the other connections and reads
# sent meanwhile succeed with the right data; the connection is re-established
# and used again.
#
# The upstream (stall_plugin.py) stalls a 1 MiB read at one offset until told
# to stop; with --upstream-timeout bscache drops that one connection. While
# it stalls, "slow" reads (also held by the plugin until the stalled read has
# failed, so they are in flight at the moment of the drop) go to the other,
# less loaded connections, and quick reads keep flowing.
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3
here=$(cd "$(dirname "$0")" && pwd)
stall=$((8 << 20))
slow_lo=$((32 << 20))
slow_hi=$((33 << 20))

start_nbdkit up python "$here/stall_plugin.py" size=$((64 << 20)) log="$T/plugin.txt" release="$T/release" \
  stall=$stall slow=$slow_lo-$slow_hi
start_bscache bs --upstream "$(uri up)" --upstream-timeout 5s --stats-file "$T/bs.json"
$py - "$(uri bs)" "$T/plugin.txt" "$T/release" $stall $slow_lo "$T/failed-reads" <<'PY' || fail "one upstream connection dying"
import random, sys, time, nbd
uri, plugin_log, release, stall, slow_lo, failed_out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), \
    int(sys.argv[5]), sys.argv[6]
DATA = random.Random(20261125).randbytes(65521 + (4 << 20))
def expected(off, n):
    s = off % 65521
    return DATA[s:s + n]
def events():
    try:
        with open(plugin_log) as f:
            return [l.split() for l in f]
    except FileNotFoundError:
        return []
def conn_of(offset):
    """The plugin connection a read at `offset` arrived on."""
    ids = {int(e[0]) for e in events() if e[1] == "start" and int(e[2]) == offset}
    assert len(ids) == 1, f"read at {offset} arrived on connections {ids}"
    return ids.pop()

A = nbd.NBD(); A.connect_uri(uri)    # the read that stalls
B = nbd.NBD(); B.connect_uri(uri)    # slow reads in flight when the connection is dropped
C = nbd.NBD(); C.connect_uri(uri)    # quick reads meanwhile
rng = random.Random(7)
failed = 0
quick = 0

def quick_read():
    global quick
    off = rng.randrange(0, 16 << 20)
    off += off == stall        # never the stalling offset
    n = rng.randint(1, 256 << 10)
    got = C.pread(n, off)      # raises if it fails: FAILING ASSERTION (a read on a healthy connection failed)
    assert got == expected(off, n), f"quick read {off}+{n}: wrong data"
    quick += 1
    time.sleep(0.002)  # leave the CPU to others

stall_buf = nbd.Buffer(1 << 20)
stall_cookie = A.aio_pread(stall_buf, stall)
start = time.monotonic()
while not any(e[1] == "start" and int(e[2]) == stall for e in events()):
    A.poll(20)
    assert time.monotonic() - start < 20, "the stalling read never reached upstream"
stall_conn = conn_of(stall)
t_stall = time.monotonic()

while time.monotonic() - t_stall < 2.5:     # then the slow reads: younger than the stalled one by 2.5 s
    quick_read()
slow = {}
for i in range(6):
    buf = nbd.Buffer(65536)
    off = slow_lo + i * 65536
    slow[B.aio_pread(buf, off)] = (buf, off)
while sum(1 for e in events() if e[1] == "start" and slow_lo <= int(e[2]) < slow_lo + 6 * 65536) < 6:
    B.poll(20)
    assert time.monotonic() - t_stall < 20, "slow reads never reached upstream"

# Wait for the stalled read to fail (--upstream-timeout 5s), reading meanwhile.
while True:
    A.poll(0)
    try:
        if A.aio_command_completed(stall_cookie):
            sys.exit("the stalled read succeeded: the stalled connection was not dropped")
    except nbd.Error as e:
        failed += 1
        print(f"stalled read failed after {time.monotonic() - t_stall:.1f} s: {e}")
        break
    assert time.monotonic() - t_stall < 25, "the stalled read neither failed nor completed"
    quick_read()
open(release, "w").close()          # the plugin answers everything held now

slow_conns = {}
done = {}
while len(done) < len(slow):
    B.poll(100)
    for cookie, (buf, off) in slow.items():
        if cookie in done:
            continue
        try:
            if B.aio_command_completed(cookie):
                done[cookie] = buf.to_bytearray() == expected(off, 65536) or f"wrong data at {off}"
        except nbd.Error as e:
            done[cookie] = e
    assert time.monotonic() - t_stall < 40, "slow reads never completed"
survivors = 0
for cookie, (buf, off) in slow.items():
    conn = conn_of(off)
    outcome = done[cookie]
    if conn == stall_conn:
        print(f"slow read at {off} shared the dropped connection {conn}: {outcome}")
        failed += outcome is not True
    else:
        # FAILING ASSERTION: a read in flight on a healthy connection must not fail or be corrupted.
        assert outcome is True, f"slow read at {off} on healthy upstream connection {conn} failed: {outcome}"
        survivors += 1
assert survivors > 0, "no slow read was in flight on another connection: the test proved nothing"
print(f"stalled connection {stall_conn}: {survivors} reads in flight on other connections and {quick} quick reads "
      f"meanwhile all succeeded; {failed} read(s) failed in total")

# Later reads succeed, and the re-established connection carries some of them.
before = max(int(e[0]) for e in events())
deadline = time.monotonic() + 15
while True:
    bufs = {}
    for i in range(16):
        off = rng.randrange(0, 32 << 20)
        off += off == stall
        buf = nbd.Buffer(65536)
        bufs[C.aio_pread(buf, off)] = (buf, off)
    while bufs:
        C.poll(-1)
        for cookie in [c for c in bufs if C.aio_command_completed(c)]:
            buf, off = bufs.pop(cookie)
            assert buf.to_bytearray() == expected(off, 65536), f"read {off} after the reconnect: wrong data"
    if max(int(e[0]) for e in events()) > 4:
        break
    assert time.monotonic() < deadline, "no read ever arrived on a re-established upstream connection"
    time.sleep(0.2)
print(f"reads after the reconnect succeed, upstream connection {max(int(e[0]) for e in events())} is new")
open(failed_out, "w").write(str(failed))
PY
kill -USR1 "$(cat "$T/bs.pid")"
wait_for_file "$T/bs.json" 10
jq -e '.upstream.reconnects >= 1 and .upstream.connections == 4' "$T/bs.json" >/dev/null \
  || fail "stats: $(jq -c .upstream "$T/bs.json")"
lost=$(grep -cE "upstream connection [0-9]+ lost" "$T/bs.log" || true)
((lost == 1)) || fail "expected exactly one upstream connection lost, the log says $lost"
grep -qE "upstream connection [0-9]+ reconnected" "$T/bs.log" || fail "no 'upstream connection N reconnected' in the log"
errors=$(jq '.client.errors.read' "$T/bs.json")
[[ $errors == "$(cat "$T/failed-reads")" ]] || fail "bscache answered $errors reads with an error, the clients saw $(cat "$T/failed-reads")"
pass "one dead upstream connection: only its reads failed ($errors), the others succeeded, reconnected and in use again"
