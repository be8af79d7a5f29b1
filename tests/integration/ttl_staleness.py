"""--policy ttl=D: a query that starts more than D after an outside write
completed must see the write (flags 0), however slow upstream is.

usage: ttl_staleness.py PROXY_URI UPSTREAM_URI TTL_SECONDS OFFSET SPAN_SECONDS

A first query goes through the proxy and makes it fetch while the range is a
hole. 0.5 s later a writer fills the range *directly upstream*, behind the
proxy's back. Then queries through the proxy start every 0.2 s for
SPAN_SECONDS, each on its own connection so a slow one does not delay the
next. Every query records when it started (this process's monotonic clock,
the same one that timed the write), so the check needs no timing assumption
on a loaded machine: whatever the delays, a query that started more than D
after the write completed must not be told HOLE or ZERO.
"""
import sys
import threading
import time

import nbd

proxy_uri, upstream_uri = sys.argv[1], sys.argv[2]
ttl, offset, span = float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
LENGTH = 65536
STEP = 0.2


def connect(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def flags_at(h):
    seen = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION and not seen:
            seen.append(entries[1])
        return 0

    h.block_status(LENGTH, offset, cb, nbd.CMD_FLAG_REQ_ONE)
    return seen[0]


results = []  # (started, finished, flags)
lock = threading.Lock()


def query(h, not_before):
    time.sleep(max(0.0, not_before - time.monotonic()))
    started = time.monotonic()
    flags = flags_at(h)
    with lock:
        results.append((started, time.monotonic(), flags))


queries = int(span / STEP) + 1
clients = [connect(proxy_uri) for _ in range(queries + 1)]
writer = connect(upstream_uri)

t0 = time.monotonic()
first = threading.Thread(target=query, args=(clients[0], t0))
first.start()  # the proxy now fetches; upstream sees a hole
time.sleep(0.5)
writer.pwrite(b"\xab" * LENGTH, offset)
written = time.monotonic()  # the write has completed upstream
threads = [threading.Thread(target=query, args=(clients[i + 1], written + i * STEP)) for i in range(queries)]
for t in [*threads]:
    t.start()
for t in [first, *threads]:
    t.join()

late = [(s - written, f) for s, _, f in results if s - written > ttl]
stale = [(round(a, 2), f) for a, f in late if f & 3]
timeline = " ".join(f"{s - written:+.2f}s:{f}" for s, _, f in sorted(results))
print(f"queries by start time relative to the write (flags): {timeline}")
if len(late) < 3:
    sys.exit(f"test setup: only {len(late)} queries started more than {ttl} s after the write")
if stale:
    sys.exit(f"STALE: {len(stale)} of {len(late)} queries that started more than {ttl} s after the write "
             f"completed were told HOLE/ZERO (seconds after the write, flags): {stale}")
assert clients[0].pread(LENGTH, offset) == b"\xab" * LENGTH, "data read back through the proxy differs"
print(f"ok: all {len(late)} queries started more than {ttl} s after the write saw data")
