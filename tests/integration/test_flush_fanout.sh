#!/usr/bin/env bash
# FLUSH with several upstream connections: a client FLUSH must flush every
# upstream connection that carried a write since its last flush, all of them
# before the client's FLUSH is answered, and fail if any of them fails.
#
# Upstream: a Python nbdkit plugin (multi-conn) whose FLUSH on connection N
# takes N * 0.25 s, so flushes sent together finish one after another: a
# FLUSH answered after the first upstream flush instead of the last is caught.
# The plugin can fail FLUSH on chosen connections (control file). nbdkit's log
# filter writes a request's "..." line when it finishes, before nbdkit sends
# the reply, so the log read right when the client's FLUSH returns must
# already hold every upstream flush that FLUSH waited for.
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3
here=$(cd "$(dirname "$0")" && pwd)

start_nbdkit up --filter=log python "$here/flaky_flush_plugin.py" size=$((256 << 20)) \
  log="$T/plugin.txt" control="$T/fail-flush" flush_delay=0.25 logfile="$T/nbdkit.txt"
start_bscache bs --upstream "$(uri up)" --stats-file "$T/bs.json"
$py - "$(uri bs)" "$T/nbdkit.txt" "$T/plugin.txt" "$T/fail-flush" <<'PY' || fail "flush fan-out"
import errno, os, re, sys, nbd
uri, nbdkit_log, plugin_log, control = sys.argv[1:5]
A = nbd.NBD(); A.connect_uri(uri)    # writes
B = nbd.NBD(); B.connect_uri(uri)    # flushes
assert B.can_multi_conn(), "bscache must advertise multi-conn"

def lines(path):
    with open(path) as f:
        return f.read().splitlines()

def write_burst(h, count, size, base, fill):
    """count pipelined writes, all in flight at once, all completed on return."""
    bufs = [nbd.Buffer.from_bytearray(bytearray([fill]) * size) for _ in range(count)]
    pending = {h.aio_pwrite(b, base + i * size) for i, b in enumerate(bufs)}
    while pending:
        h.poll(-1)
        pending = {c for c in pending if not h.aio_command_completed(c)}

LINE = re.compile(r"connection=(\d+) (\.\.\.)?(\w+) id=\d+(.*)")
def finished(log, op, start=0):
    """nbdkit connections with a successful finished OP in log[start:]."""
    out = set()
    for line in log[start:]:
        m = LINE.search(line)
        if m and m.group(2) and m.group(3) == op and "return=0" in m.group(4):
            out.add(int(m.group(1)))
    return out

# ---- every connection that carried a write is flushed before FLUSH returns ----
for label, count, size, base in (("round 1", 32, 1 << 20, 0), ("round 2", 16, 1 << 20, 64 << 20)):
    mark = len(lines(nbdkit_log))
    write_burst(A, count, size, base, 0x5A)
    writers = finished(lines(nbdkit_log), "Write", mark)
    assert len(writers) > 1, f"{label}: writes arrived on {sorted(writers)} only: not spread over connections"
    sent = len(lines(nbdkit_log))
    B.flush()
    snapshot = lines(nbdkit_log)          # right when B's FLUSH returned
    flushed = finished(snapshot, "Flush", sent)
    missing = writers - flushed
    # FAILING ASSERTION if bscache misses a connection or answers before all upstream flushes finished:
    assert not missing, (f"{label}: FLUSH returned to the client before upstream connection(s) {sorted(missing)} "
                         f"(which carried writes) finished a flush; writers {sorted(writers)}, flushed {sorted(flushed)}")
    print(f"{label}: writes on upstream connections {sorted(writers)}; all flushed before the reply ({sorted(flushed)})")

# ---- a FLUSH that fails on one upstream connection fails for the client ----
def plugin_events(start):
    return [l.split() for l in lines(plugin_log)[start:]]

mark = len(lines(plugin_log))
write_burst(A, 32, 1 << 20, 128 << 20, 0x6B)
writers = sorted({int(e[0]) for e in plugin_events(mark) if e[1] == "write"})
assert len(writers) > 1, f"writes arrived on plugin connections {writers} only"
victim = writers[-1]
with open(control, "w") as f:
    f.write(str(victim))
mark = len(lines(plugin_log))
try:
    B.flush()
    # FAILING ASSERTION if a failed upstream flush is not reported:
    sys.exit(f"FLUSH succeeded although upstream FLUSH failed on connection {victim} (writers {writers})")
except nbd.Error as e:
    assert e.errnum == errno.EIO, f"expected EIO, got {e}"
flushes = {int(e[0]): e[4] for e in plugin_events(mark) if e[1] == "flush"}
assert flushes.get(victim) == "fail", f"the victim connection {victim} was not flushed: {flushes}"
assert set(writers) <= set(flushes), f"not every writer was flushed: writers {writers}, flushes {flushes}"
print(f"one failing upstream flush (connection {victim} of {flushes}) fails the client's FLUSH with EIO")

os.unlink(control)
mark = len(lines(plugin_log))
B.flush()          # upstream healthy again: the retry succeeds
retried = {int(e[0]): e[4] for e in plugin_events(mark) if e[1] == "flush"}
print(f"retried FLUSH succeeded; upstream flushes: {retried}")

# ---- the single-connection path: one connection due, its flush fails ----
A.pwrite(b"z" * 4096, 200 << 20)
with open(control, "w") as f:
    f.write("all")
try:
    B.flush()
    sys.exit("FLUSH succeeded although upstream FLUSH failed (single connection due)")
except nbd.Error as e:
    assert e.errnum == errno.EIO, f"expected EIO, got {e}"
os.unlink(control)
B.flush()
print("a failing flush on the only connection due fails the client's FLUSH too")
PY
kill -USR1 "$(cat "$T/bs.pid")"
wait_for_file "$T/bs.json" 10
jq -e '.upstream.connections == 4' "$T/bs.json" >/dev/null || fail "expected 4 upstream connections"
jq -e '.client.errors.flush == 2 and .upstream.errors.flush >= 2' "$T/bs.json" >/dev/null \
  || fail "flush errors not counted: $(jq -c '{client: .client.errors, upstream: .upstream.errors}' "$T/bs.json")"
pass "FLUSH reaches every upstream connection that carried a write before it is answered; upstream failure = EIO"
