"""Clients that pipeline requests and never read a reply, against bscache's memory bound.

CLIENTS raw-socket clients (structured replies, base:allocation) each pipeline
requests of one KIND for SECONDS and never read a reply:
  read1  1-byte READs               bs     REQ_ONE block-status queries (cache hits)
  read64k 64 KiB READs
  einval READs past the end         flush  FLUSHes
  write  4 KiB WRITEs               mixed  a little of each
While they sit there bscache's resident memory (VmRSS, sampled, and VmHWM)
must stay within --bound-mib of the baseline; with --uri a libnbd client on
another connection must get every reply (write, read back, block status) and
is timed. Then the clients close, and 5 s later (--after-seconds) RSS must be
back within --after-mib of the baseline.

Exits non-zero with a FAIL line when an assertion fails; prints measurements
as one `result:` line (kind, peak growth, growth after the close, MiB).
"""
import argparse
import multiprocessing
import signal
import socket
import sys
import threading
import time

import nbdwire
from nbdwire import CMD_BLOCK_STATUS, CMD_FLUSH, CMD_READ, CMD_WRITE, request_bytes

REQ_ONE = 1 << 3

p = argparse.ArgumentParser()
p.add_argument("--sock", required=True)
p.add_argument("--pid", type=int, required=True)
p.add_argument("--kind", default="read1")
p.add_argument("--clients", type=int, default=1)
p.add_argument("--seconds", type=float, default=10)
p.add_argument("--bound-mib", type=float, default=0, help="0: measure only")
p.add_argument("--after-mib", type=float, default=0, help="0: measure only")
p.add_argument("--after-seconds", type=float, default=5)
p.add_argument("--uri", help="a well-behaved libnbd client is served meanwhile")
p.add_argument("--served-max-seconds", type=float, default=10,
               help="the well-behaved client's slowest request may take at most this long")
p.add_argument("--stats", help="stats file to read client.memory_* from (SIGUSR1)")
args = p.parse_args()
signal.alarm(int(args.seconds + args.after_seconds + 120))

MIB = 1 << 20


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def rss_kib(field="VmRSS"):
    return nbdwire.rss_kib(args.pid, field)


def stats():
    if not args.stats:
        return None
    got = nbdwire.fresh_stats(args.pid, args.stats)
    if got is None:
        fail("bscache did not write its stats file on SIGUSR1")
    return got


def connect():
    """A hostile connection: structured replies, base:allocation, GO; (socket, export size)."""
    c = nbdwire.connect_unix(args.sock, timeout=30)
    try:
        c.go()
    except AssertionError as e:
        fail(str(e))
    return c.s, c.size


def requests(kind, size, n, start):
    """n requests of `kind` (cookies from `start`) as one byte string."""
    out = []
    for i in range(start, start + n):
        k = kind if kind != "mixed" else ("read1", "bs", "einval", "flush", "write")[i % 5]
        if k == "read1":
            out.append(request_bytes(CMD_READ, (i * 4096) % size, 1, cookie=i))
        elif k == "read64k":
            out.append(request_bytes(CMD_READ, (i * 65536) % size, 65536, cookie=i))
        elif k == "bs":
            out.append(request_bytes(CMD_BLOCK_STATUS, (i * 4096) % (size // 2), 4096, REQ_ONE, cookie=i))
        elif k == "einval":
            out.append(request_bytes(CMD_READ, size + 4096, 512, cookie=i))
        elif k == "flush":
            out.append(request_bytes(CMD_FLUSH, 0, 0, cookie=i))
        elif k == "write":
            out.append(request_bytes(CMD_WRITE, (i * 4096) % size, 4096, cookie=i, payload=b"\x5a" * 4096))
        else:
            fail(f"unknown kind {k}")
    return b"".join(out)


def hostile(s, size, stop, sent):
    """Sends until told to stop; bscache stops reading at its bound, and send() then blocks (timeout)."""
    s.settimeout(0.2)
    cookie = 1
    while not stop.is_set():
        batch = requests(args.kind, size, 256, cookie)
        view = memoryview(batch)
        while view and not stop.is_set():
            try:
                view = view[s.send(view):]
            except socket.timeout:
                continue
            except OSError:
                return
        cookie += 256
        with sent.get_lock():
            sent.value += 256


def hostiles(ready, stop, sent):
    """The clients that never read, in a process of their own: the libnbd client
    in this one must not wait for the GIL behind 200 sending threads."""
    conns = [connect() for _ in range(args.clients)]
    threads = [threading.Thread(target=hostile, args=(s, size, stop, sent), daemon=True) for s, size in conns]
    for t in threads:
        t.start()
    ready.set()
    stop.wait()
    for t in threads:
        t.join(5)
    for s, _ in conns:
        s.close()


def served(h, start_budget):
    """The well-behaved client: write, read back, block status. Returns its slowest request's seconds."""
    import nbd
    slowest = 0.0

    def wait(cookie):
        nonlocal slowest
        t = time.monotonic()
        while not h.aio_command_completed(cookie):
            if time.monotonic() - t > start_budget:
                fail(f"the well-behaved client got no reply within {start_budget:g} s")
            h.poll(100)
        slowest = max(slowest, time.monotonic() - t)

    offset = 8 * MIB
    data = bytes([0x3C]) * 65536
    wait(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset))
    buf = nbd.Buffer(65536)
    wait(h.aio_pread(buf, offset))
    if buf.to_bytearray() != data:
        fail("the well-behaved client read back wrong data")
    extents = []
    wait(h.aio_block_status(offset, 65536, lambda ctx, off, e, err: extents.extend(e) or 0))
    if not extents:
        fail("the well-behaved client got no block status")
    return slowest


good = None
if args.uri:
    import nbd
    good = nbd.NBD()
    good.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    good.connect_uri(args.uri)
    served(good, 30)  # warm-up
time.sleep(0.5)
baseline = rss_kib()
try:
    with open(f"/proc/{args.pid}/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    hwm_reset = True
except OSError:
    hwm_reset = False

ready, stop, sent = multiprocessing.Event(), multiprocessing.Event(), multiprocessing.Value("q", 0)
child = multiprocessing.Process(target=hostiles, args=(ready, stop, sent))
child.start()
if not ready.wait(60):
    fail("the clients that never read could not connect")
t0 = time.monotonic()
peak = baseline
slowest = 0.0
rounds = 0
held = None
while time.monotonic() - t0 < args.seconds:
    peak = max(peak, rss_kib())
    if args.bound_mib and (peak - baseline) / 1024 > args.bound_mib * 1.5:
        break  # far past the bound: no need to let it grow further
    if good is not None:
        slowest = max(slowest, served(good, args.served_max_seconds * 3))
        rounds += 1
    time.sleep(0.05)
held = stats()
peak = max(peak, rss_kib("VmHWM") if hwm_reset else 0, rss_kib())
stop.set()
child.join(30)
t_close = time.monotonic()
time.sleep(args.after_seconds)
after = rss_kib()
released = stats()
if released is not None and "memory_bytes" in released.get("client", {}):
    if released["client"]["memory_bytes"] != 0:
        fail(f"{args.after_seconds:g} s after the clients left bscache still counts "
             f"{released['client']['memory_bytes']} bytes held by clients")
grown = (peak - baseline) / 1024
left = (after - baseline) / 1024
extra = ""
if held is not None and "memory_bytes" in held.get("client", {}):
    extra = (f"; held {held['client']['memory_bytes'] / MIB:.1f} MiB by bscache's count, "
             f"{held['client']['memory_pauses']} pauses by the total; {released['process']['memory_trims']} trims")
print(f"result: kind={args.kind} clients={args.clients} sent={sent.value} baseline={baseline / 1024:.1f} "
      f"peak=+{grown:.1f} after{args.after_seconds:g}s=+{left:.1f} MiB"
      + (f"; well-behaved client: {rounds} rounds, slowest request {slowest:.3f} s" if good else "") + extra,
      flush=True)
if args.bound_mib and grown > args.bound_mib:
    fail(f"{args.kind}: RSS grew {grown:.1f} MiB over the baseline, bound {args.bound_mib:g} MiB")
if args.after_mib and left > args.after_mib:
    fail(f"{args.kind}: {args.after_seconds:g} s after the clients left RSS is still +{left:.1f} MiB "
         f"(at most {args.after_mib:g})")
if good is not None:
    if rounds == 0:
        fail("the well-behaved client was never served")
    if slowest > args.served_max_seconds:
        fail(f"the well-behaved client's slowest request took {slowest:.2f} s (at most {args.served_max_seconds:g})")
    good.shutdown()
