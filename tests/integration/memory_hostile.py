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
import json
import multiprocessing
import os
import signal
import socket
import struct
import sys
import threading
import time

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

IHAVEOPT, REQ_MAGIC = 0x49484156454F5054, 0x25609513
MIB = 1 << 20


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def rss_kib(field="VmRSS"):
    with open(f"/proc/{args.pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    fail(f"no {field} for pid {args.pid}")


def stats():
    if not args.stats:
        return None
    try:
        os.unlink(args.stats)
    except FileNotFoundError:
        pass
    os.kill(args.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(args.stats) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.02)
    fail("bscache did not write its stats file on SIGUSR1")


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("bscache closed the connection during the handshake")
        data += chunk
    return data


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(args.sock)
    assert recv_exact(s, 18)[:16] == b"NBDMAGICIHAVEOPT"
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES

    def option(opt, payload=b""):
        s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload)

    def reply():
        _, _, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        return rtype, recv_exact(s, length)

    option(8)  # STRUCTURED_REPLY
    assert reply()[0] == 1
    ctx = b"base:allocation"
    option(10, struct.pack(">II", 0, 1) + struct.pack(">I", len(ctx)) + ctx)  # SET_META_CONTEXT
    while reply()[0] != 1:
        pass
    option(7, struct.pack(">IH", 0, 0))  # GO
    size = None
    while True:
        rtype, payload = reply()
        if rtype == 3 and struct.unpack(">H", payload[:2])[0] == 0:
            size = struct.unpack(">Q", payload[2:10])[0]
        if rtype == 1:
            return s, size
        if rtype & (1 << 31):
            fail(f"GO refused: {rtype:#x}")


def requests(kind, size, n, start):
    """n requests of `kind` (cookies from `start`) as one byte string."""
    out = []
    for i in range(start, start + n):
        k = kind if kind != "mixed" else ("read1", "bs", "einval", "flush", "write")[i % 5]
        if k == "read1":
            out.append(struct.pack(">IHHQQI", REQ_MAGIC, 0, 0, i, (i * 4096) % size, 1))
        elif k == "read64k":
            out.append(struct.pack(">IHHQQI", REQ_MAGIC, 0, 0, i, (i * 65536) % size, 65536))
        elif k == "bs":
            out.append(struct.pack(">IHHQQI", REQ_MAGIC, 1 << 3, 7, i, (i * 4096) % (size // 2), 4096))
        elif k == "einval":
            out.append(struct.pack(">IHHQQI", REQ_MAGIC, 0, 0, i, size + 4096, 512))
        elif k == "flush":
            out.append(struct.pack(">IHHQQI", REQ_MAGIC, 0, 3, i, 0, 0))
        elif k == "write":
            out.append(struct.pack(">IHHQQI", REQ_MAGIC, 0, 1, i, (i * 4096) % size, 4096) + b"\x5a" * 4096)
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
