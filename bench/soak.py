#!/usr/bin/python3
"""Soak: bscache's memory over a long mixed run, and every good answer equal to direct.

Not run in CI (20 minutes by default). Starts `nbdkit file` on an image in
/dev/shm and bscache in front of it, then runs 32 clients of mixed kinds:
  readers      libnbd, random READs of the read-only half, compared with the image
  writers      libnbd, WRITEs to a region of their own, read back and compared
  walkers      libnbd, REQ_ONE block-status walks of the read-only half, each
               extent compared with direct access's map of the same bytes
  non-readers  raw sockets pipelining READs, hits, errors and FLUSHes, never
               reading a reply, reconnecting every 20 s
  leavers      raw sockets that send part of a request (a WRITE's header and
               half its payload, or a READ) and disconnect
The upstream is restarted every --restart-every seconds (default 120): the
well-behaved clients retry what fails meanwhile (ESHUTDOWN), and only replies
that succeeded are compared. bscache's RSS is sampled every 2 s.

Asserted at the end: no well-behaved reply differed from direct; RSS at the end
(median of the last 5 samples) is at most 10% above RSS at minute 2 (median of 5
samples around it; with --duration under 10 minutes, at a fifth of the run
but not before 60 s).

usage: bench/soak.py [--bscache build/bscache] [--duration 1200] [--restart-every 120]
"""
import argparse
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

import nbd

p = argparse.ArgumentParser()
p.add_argument("--bscache", default=os.path.join(os.path.dirname(__file__), "..", "build", "bscache"))
p.add_argument("--duration", type=float, default=1200, help="seconds (default 20 minutes)")
p.add_argument("--restart-every", type=float, default=120)
p.add_argument("--size-mib", type=int, default=256)
p.add_argument("--extra", default="", help="more bscache arguments")
args = p.parse_args()

MIB = 1 << 20
SIZE = args.size_mib * MIB
HALF = SIZE // 2  # [0, HALF) is never written: readers and walkers check it
tmp = tempfile.mkdtemp(prefix="bscache-soak.")
img = tempfile.mktemp(prefix="bscache-soak.", dir="/dev/shm")
up_sock, px_sock = os.path.join(tmp, "up.sock"), os.path.join(tmp, "px.sock")
stop = threading.Event()
failures = []
counts = {"reads": 0, "writes": 0, "walked": 0, "errors_retried": 0, "hostile_conns": 0, "leavers": 0}
lock = threading.Lock()


def note(key, n=1):
    with lock:
        counts[key] += n


def failure(msg):
    with lock:
        failures.append(msg)
    print("FAIL:", msg, flush=True)


# ---- the image: data and holes in the read-only half ----
with open(img, "wb") as f:
    f.truncate(SIZE)
    rng = random.Random(1)
    for _ in range(200):
        off = rng.randrange(0, HALF - MIB) & ~4095
        f.seek(off)
        f.write(os.urandom(rng.choice([4096, 65536, 262144, MIB])))
with open(img, "rb") as f:
    truth = f.read(HALF)

procs = {}


def start_upstream():
    if os.path.exists(up_sock):
        os.unlink(up_sock)
    pid = os.path.join(tmp, "up.pid")
    if os.path.exists(pid):
        os.unlink(pid)
    procs["up"] = subprocess.Popen(["nbdkit", "-f", "-U", up_sock, "-P", pid, "file", img],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(pid) and os.path.getsize(pid) > 0:
            return
        time.sleep(0.05)
    sys.exit("nbdkit did not start")


start_upstream()
# Direct access's map of the read-only half: what every walked extent must match.
direct = nbd.NBD()
direct.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
direct.connect_uri(f"nbd+unix:///?socket={up_sock}")
direct_map = []  # (offset, length, flags)
pos = 0
while pos < HALF:
    got = []
    direct.block_status(min(HALF - pos, 1 << 30), pos, lambda ctx, off, e, err: got.extend(e) or 0)
    for i in range(0, len(got), 2):
        direct_map.append((pos, got[i], got[i + 1]))
        pos += got[i]
direct.shutdown()


def direct_flags(offset, length):
    """The flags direct access reports over [offset, offset+length): one value, or None if it varies."""
    seen = set()
    for off, ln, fl in direct_map:
        if off + ln > offset and off < offset + length:
            seen.add(fl)
    return seen.pop() if len(seen) == 1 else None


log = open(os.path.join(tmp, "bscache.log"), "w")
pidfile = os.path.join(tmp, "px.pid")
procs["px"] = subprocess.Popen([args.bscache, "--upstream", f"nbd+unix:///?socket={up_sock}", "--unix", px_sock,
                                "--pidfile", pidfile] + args.extra.split(), stdout=log, stderr=log)
for _ in range(400):
    if os.path.exists(pidfile) and os.path.getsize(pidfile) > 0:
        break
    time.sleep(0.05)
bs_pid = procs["px"].pid
URI = f"nbd+unix:///?socket={px_sock}"


def rss_kib():
    with open(f"/proc/{bs_pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def retrying(fn):
    """Runs fn until it succeeds (upstream restarts make requests fail for a while)."""
    while not stop.is_set():
        try:
            return fn()
        except nbd.Error:
            note("errors_retried")
            time.sleep(0.1)
    return None


def good_client():
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(URI)
    return h


def reader(i):
    rng = random.Random(100 + i)
    h = good_client()
    while not stop.is_set():
        length = rng.choice([1, 512, 4096, 65536, 262144, MIB])
        off = rng.randrange(0, HALF - length)
        data = retrying(lambda: h.pread(length, off))
        if data is None:
            break
        if data != truth[off:off + length]:
            failure(f"reader {i}: READ {off}+{length} differs from the image")
        note("reads")


def writer(i):
    rng = random.Random(200 + i)
    base = HALF + i * 8 * MIB
    model = bytearray(8 * MIB)
    h = good_client()
    while not stop.is_set():
        length = rng.choice([512, 4096, 65536, 1 << 20])
        off = rng.randrange(0, 8 * MIB - length) & ~511
        data = os.urandom(length)
        if retrying(lambda: h.pwrite(data, base + off)) is None and stop.is_set():
            break
        model[off:off + length] = data
        back = retrying(lambda: h.pread(length, base + off))
        if back is not None and back != bytes(model[off:off + length]):
            failure(f"writer {i}: read back of {base + off}+{length} differs from what it wrote")
        note("writes")


def walker(i):
    h = good_client()
    while not stop.is_set():
        pos = random.Random(300 + i).randrange(0, HALF // 2) & ~4095
        while pos < HALF and not stop.is_set():
            got = []
            r = retrying(lambda: h.block_status(min(HALF - pos, 64 * MIB), pos,
                                                lambda ctx, off, e, err: got.extend(e) or 0, nbd.CMD_FLAG_REQ_ONE))
            if r is None and stop.is_set():
                break
            if len(got) < 2:
                failure(f"walker {i}: no extent at {pos}")
                break
            length, flags = got[0], got[1]
            want = direct_flags(pos, length)
            # Reporting 0 (data) is always safe; anything else must be what direct access reports.
            if flags != 0 and want != flags:
                failure(f"walker {i}: {pos}+{length} flags {flags}, direct access says {want}")
            pos += length
            note("walked")


def raw_connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(px_sock)

    def recv(n):
        data = b""
        while len(data) < n:
            c = s.recv(n - len(data))
            if not c:
                raise EOFError
            data += c
        return data

    recv(18)
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 8, 0))
    recv(20)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
    while True:
        _, _, rtype, length = struct.unpack(">QIII", recv(20))
        recv(length)
        if rtype == 1 or rtype & (1 << 31):
            return s


def non_reader(i):
    rng = random.Random(400 + i)
    while not stop.is_set():
        try:
            s = raw_connect()
        except (OSError, EOFError):
            time.sleep(0.5)
            continue
        note("hostile_conns")
        s.settimeout(0.2)
        until = time.monotonic() + 20
        cookie = 1
        while not stop.is_set() and time.monotonic() < until:
            batch = []
            for _ in range(64):
                kind = rng.randrange(4)
                off = rng.randrange(0, SIZE - 4096) & ~4095
                if kind == 0:
                    batch.append(struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, off, rng.choice([1, 4096, 65536])))
                elif kind == 1:
                    batch.append(struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, SIZE + 4096, 512))  # EINVAL
                elif kind == 2:
                    batch.append(struct.pack(">IHHQQI", 0x25609513, 0, 3, cookie, 0, 0))  # FLUSH
                else:
                    batch.append(struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, off % HALF, 512))
                cookie += 1
            view = memoryview(b"".join(batch))
            while view and not stop.is_set() and time.monotonic() < until:
                try:
                    view = view[s.send(view):]
                except socket.timeout:
                    continue
                except OSError:
                    break
        s.close()


def leaver(i):
    rng = random.Random(500 + i)
    while not stop.is_set():
        try:
            s = raw_connect()
            off = rng.randrange(0, HALF) & ~4095
            if rng.random() < 0.5:
                # A WRITE to the scratch area past the writers' regions: header and half the payload.
                woff = SIZE - 4 * MIB + (rng.randrange(0, 3 * MIB) & ~4095)
                s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, woff, 65536) + b"\0" * 32768)
            else:
                s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, off, 65536))
            time.sleep(rng.random() * 0.05)
            s.close()
            note("leavers")
        except (OSError, EOFError):
            time.sleep(0.2)
        time.sleep(0.05)


kinds = [(reader, 8), (writer, 6), (walker, 6), (non_reader, 8), (leaver, 4)]
assert 6 * 8 * MIB <= HALF - 4 * MIB, "the writers' regions must fit in the second half"
threads = []
for fn, n in kinds:
    for i in range(n):
        t = threading.Thread(target=fn, args=(i,), daemon=True)
        t.start()
        threads.append(t)

# Minute 2, or for a short run a fifth of it but not before the first minute:
# clients that never read take a while to reach their bound on a loaded machine.
reference_at = 120 if args.duration >= 600 else min(max(60, args.duration / 5), args.duration / 2)
samples = []  # (seconds, rss KiB)
t0 = time.monotonic()
next_restart = t0 + args.restart_every
restarts = 0
while time.monotonic() - t0 < args.duration:
    time.sleep(2)
    now = time.monotonic()
    samples.append((now - t0, rss_kib()))
    if now >= next_restart:
        procs["up"].send_signal(signal.SIGTERM)
        procs["up"].wait()
        start_upstream()
        restarts += 1
        next_restart = now + args.restart_every
    if procs["px"].poll() is not None:
        failure(f"bscache exited with status {procs['px'].returncode}")
        break
    if int(now - t0) % 60 < 2:
        print(f"{now - t0:6.0f} s: RSS {samples[-1][1] / 1024:.1f} MiB, {counts}", flush=True)

stop.set()
for t in threads:
    t.join(15)
end_rss = statistics.median(r for _, r in samples[-5:])
around = sorted(samples, key=lambda s: abs(s[0] - reference_at))[:5]
ref_rss = statistics.median(r for _, r in around)
procs["px"].send_signal(signal.SIGTERM)
procs["px"].wait(30)
procs["up"].send_signal(signal.SIGTERM)
procs["up"].wait(30)
os.unlink(img)
print(f"soak: {args.duration:g} s, {restarts} upstream restarts, {counts}")
print(f"RSS at {reference_at:g} s: {ref_rss / 1024:.1f} MiB; at the end: {end_rss / 1024:.1f} MiB "
      f"({100 * (end_rss - ref_rss) / ref_rss:+.1f}%); peak {max(r for _, r in samples) / 1024:.1f} MiB")
# Growth is what a leak or a bound that does not hold looks like; ending lower
# (the non-readers' memory given back between their reconnects) is not.
if end_rss - ref_rss > 0.10 * ref_rss:
    failure(f"RSS at the end ({end_rss / 1024:.1f} MiB) is more than 10% above RSS at {reference_at:g} s "
            f"({ref_rss / 1024:.1f} MiB)")
if min(counts["reads"], counts["writes"], counts["walked"]) == 0:
    failure(f"a kind of well-behaved client got no answer at all: {counts}")
print("soak:", "FAILED" if failures else "passed", f"(logs in {tmp})")
sys.exit(1 if failures else 0)
