"""A hostile client against bscache's back-pressure, and what must hold meanwhile.

The hostile client (raw socket, simple replies) pipelines COUNT READs of SIZE
bytes on one connection and never reads a reply. While it sits there:
  - bscache's resident memory (VmRSS, sampled, and VmHWM, the kernel's peak)
    must stay within BOUND MiB of the baseline measured before it connected;
  - bscache must have accepted at most MAX_ACCEPTED of its requests (it stops
    reading a client whose payloads in flight plus unread replies reach
    --max-reply-backlog);
  - a second, well-behaved client is served (write, read back, block status).
Then the hostile client closes its socket and its work must drain: the
session ends (client.connections_current returns to 0), and with --upstream-log
no more than --max-late upstream reads start after the close (bscache must not
go on serving requests of a client that is gone).

usage: backpressure.py --sock S --uri U --pid P --stats F --size N --bound-mib M --max-accepted K [...]
Exits non-zero with a FAIL line when an assertion fails; prints measurements.
"""
import argparse
import signal
import socket
import sys
import time

import nbd
import nbdwire

p = argparse.ArgumentParser()
p.add_argument("--sock", required=True)
p.add_argument("--uri", required=True)
p.add_argument("--pid", type=int, required=True)
p.add_argument("--stats", required=True)
p.add_argument("--size", type=int, required=True, help="bytes per hostile READ")
p.add_argument("--count", type=int, default=2000)
p.add_argument("--hold", type=float, default=3.0, help="seconds the hostile client sits on its replies")
p.add_argument("--bound-mib", type=float, required=True)
p.add_argument("--max-accepted", type=int, default=0, help="0: not checked")
p.add_argument("--upstream-log", help="nbdkit log filter file: count upstream reads after the close")
p.add_argument("--max-late", type=int, default=64)
p.add_argument("--structured", action="store_true", help="the hostile client negotiates structured replies")
p.add_argument("--drain-seconds", type=float, default=1.0, help="the session must be gone this soon after the close")
p.add_argument("--after-bound-mib", type=float, default=0,
               help="RSS over the baseline allowed once the session is gone (0: not checked)")
args = p.parse_args()
signal.alarm(50)  # the whole scenario is bounded, whatever happens

MIB = 1 << 20


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def rss_kib(field="VmRSS"):
    return nbdwire.rss_kib(args.pid, field)


def stats():
    """bscache's stats file, freshly written on SIGUSR1."""
    got = nbdwire.fresh_stats(args.pid, args.stats)
    if got is None:
        fail("bscache did not write its stats file on SIGUSR1")
    return got


def upstream_reads():
    if not args.upstream_log:
        return 0
    with open(args.upstream_log) as f:
        return sum(1 for line in f if " Read id=" in line)


def hostile_connect():
    try:
        c = nbdwire.connect_unix(args.sock)
        if args.structured and c.ask(nbdwire.OPT_STRUCTURED_REPLY) != nbdwire.REP_ACK:
            fail("STRUCTURED_REPLY refused")
        rtype = c.ask(nbdwire.OPT_GO, nbdwire.GO_DEFAULT_EXPORT)
    except EOFError:
        fail("bscache closed the connection during the handshake")
    if rtype != nbdwire.REP_ACK:
        fail(f"GO refused: {rtype:#x}")
    return c.s, c.size


def served(h, label):
    """The well-behaved client: write, read back, block status; at most 20 s."""
    start = time.monotonic()

    def wait(cookie):
        while not h.aio_command_completed(cookie):
            if time.monotonic() - start > 20:
                fail(f"{label}: the second client was not served within 20 s")
            h.poll(100)

    data = bytes([0x3C]) * MIB
    wait(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), 100 * MIB))
    buf = nbd.Buffer(MIB)
    wait(h.aio_pread(buf, 100 * MIB))
    if buf.to_bytearray() != data:
        fail(f"{label}: the second client read back wrong data")
    extents = []
    wait(h.aio_block_status(100 * MIB, MIB, lambda ctx, off, e, err: extents.extend(e) or 0))
    if not extents:
        fail(f"{label}: no block status")
    return time.monotonic() - start


# ---- baseline: a warm proxy (the second client connected and served once) ----
second = nbd.NBD()
second.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
second.connect_uri(args.uri)
served(second, "warm-up")
warm = stats()
baseline = rss_kib()
try:
    with open(f"/proc/{args.pid}/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    hwm_reset = True
except OSError:
    hwm_reset = False

# ---- the hostile client ----
hostile, size = hostile_connect()
requests = b"".join(nbdwire.request_bytes(nbdwire.CMD_READ, (i * args.size) % (size - args.size), args.size, cookie=i + 1)
                   for i in range(args.count))
hostile.settimeout(2)
sent = 0
try:
    while sent < len(requests):
        sent += hostile.send(requests[sent:])
except socket.timeout:
    pass  # bscache stopped reading and the socket buffer is full: the rest stays unsent
sent //= 28
t_sent = time.monotonic()
peak = baseline
second_took = None
while time.monotonic() - t_sent < args.hold:
    peak = max(peak, rss_kib())
    if (peak - baseline) / 1024 > args.bound_mib:
        time.sleep(0.5)  # how far it goes (the hostile client sent at most --count READs)
        peak = max(peak, rss_kib())
        now = stats()
        hostile.close()
        fail(f"RSS grew {(peak - baseline) / 1024:.0f} MiB over the baseline ({baseline // 1024} MiB), bound "
             f"{args.bound_mib:g} MiB; bscache had accepted {now['client']['requests']['read'] - warm['client']['requests']['read']} "
             f"of the {sent} READs of {args.size / MIB:g} MiB the client sent and never read replies to")
    if second_took is None and time.monotonic() - t_sent > args.hold / 3:
        second_took = served(second, "during the hostile client")
    time.sleep(0.02)
if second_took is None:
    second_took = served(second, "during the hostile client")
held = stats()
accepted = held["client"]["requests"]["read"] - warm["client"]["requests"]["read"] - 1  # minus the second's read
peak = max(peak, rss_kib("VmHWM") if hwm_reset else 0, rss_kib())
grown = (peak - baseline) / 1024
print(f"hostile: sent {sent} READs of {args.size / MIB:g} MiB; bscache accepted {accepted}; "
      f"RSS baseline {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB (+{grown:.1f} MiB, bound {args.bound_mib:g}); "
      f"second client served in {second_took:.2f} s", flush=True)
# FAILING ASSERTIONS of back-pressure:
if grown > args.bound_mib:
    fail(f"peak RSS grew {grown:.1f} MiB, more than the bound of {args.bound_mib:g} MiB")
if args.max_accepted and accepted > args.max_accepted:
    fail(f"bscache accepted {accepted} READs from a client that reads no replies; at most {args.max_accepted} fit "
         f"in the backlog plus one request")
if held["client"]["connections_current"] != 2:
    fail(f"expected 2 client connections, stats say {held['client']['connections_current']}")

# ---- the hostile client goes away: its work must drain ----
second.shutdown()
reads_at_close = upstream_reads()
hostile.close()
t_close = time.monotonic()
while True:
    now = stats()
    if now["client"]["connections_current"] == 0:
        break
    if time.monotonic() - t_close > 5:
        fail(f"5 s after the hostile client closed, bscache still has {now['client']['connections_current']} "
             f"client connection(s)")
    time.sleep(0.1)
drained = time.monotonic() - t_close
time.sleep(0.5)
late = upstream_reads() - reads_at_close
after = rss_kib()
print(f"after the close: session gone within {drained:.2f} s; {late} upstream reads started after the close; "
      f"RSS {after / 1024:.1f} MiB", flush=True)
# FAILING ASSERTIONS of the release: the session and what it held go at once.
if drained > args.drain_seconds:
    fail(f"the session took {drained:.2f} s to go after the hostile client closed (at most {args.drain_seconds:g} s)")
if args.after_bound_mib and (after - baseline) / 1024 > args.after_bound_mib:
    fail(f"after the close RSS is still {(after - baseline) / 1024:.1f} MiB over the baseline "
         f"(at most {args.after_bound_mib:g}: the idle buffer pool plus an allowance)")
if args.upstream_log and late > args.max_late:
    fail(f"{late} upstream reads started after the hostile client closed (at most {args.max_late} were in flight)")
