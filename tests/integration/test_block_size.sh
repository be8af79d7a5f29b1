#!/usr/bin/env bash
# Clients that do not ask for block sizes, in front of an upstream that needs
# 512-byte alignment (qemu-nbd without -f raw): INFO answers
# NBD_REP_ERR_BLOCK_SIZE_REQD and GO minimum 1, as directly; unaligned READs,
# WRITEs, WRITE_ZEROES, TRIMs and BLOCK_STATUS succeed with the bytes qemu-nbd
# gives directly (bscache reads-modifies-writes the edge blocks); concurrent
# read-modify-writes of one block from several clients lose no byte, and an
# aligned write racing one is never undone.
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3

truncate -s 40M "$T/disk.raw"
qemu-io -f raw -c 'write -P 7 0 1M' -c 'write -P 9 4M 64k' "$T/disk.raw" >/dev/null
# No --fork: with it, qemu-nbd 7.2 exits 1 after printing its probing warning.
qemu-nbd -t --shared=16 --socket="$T/up.sock" --pid-file="$T/up.pid" "$T/disk.raw" 2>"$T/up.log" &
PIDS+=($!)
wait_for_file "$T/up.pid"
for _ in $(seq 100); do [[ -S $T/up.sock ]] && break; sleep 0.05; done
start_bscache bs --upstream "$(uri up)"

$py - "$T/up.sock" "$T/bs.sock" <<'PY' || fail "handshake without block sizes"
import sys, nbd
def probe(sock):
    h = nbd.NBD()
    h.set_request_block_size(False)
    h.set_opt_mode(True)
    h.connect_unix(sock)
    try:
        h.opt_info()
        info = "ok"
    except nbd.Error as e:
        info = f"{e.errnum} {e.string.split(':')[-1].strip()}"
    h.opt_go()
    return info, h.get_block_size(nbd.SIZE_MINIMUM)
direct, through = probe(sys.argv[1]), probe(sys.argv[2])
assert direct == through, f"direct {direct}, through bscache {through}"
assert direct[1] == 1, direct
print("INFO and GO as direct:", direct)
PY
pass "INFO gets BLOCK_SIZE_REQD and GO minimum 1, as directly"

# Random unaligned I/O through bscache against a model of the disk; READs compared with direct too.
$py - "$T/up.sock" "$T/bs.sock" <<'PY' || fail "unaligned I/O"
import random, sys, nbd
def connect(sock):
    h = nbd.NBD()
    h.set_request_block_size(False)
    h.add_meta_context("base:allocation")
    h.connect_unix(sock)
    return h
up, bs = connect(sys.argv[1]), connect(sys.argv[2])
size = bs.get_size()
def whole_disk():
    return b"".join(up.pread(min(8 << 20, size - o), o) for o in range(0, size, 8 << 20))
model = bytearray(whole_disk())
rng = random.Random(22)
for i in range(300):
    off = rng.randrange(0, size - 1)
    length = rng.choice([1, 3, 511, 513, 1000, 4097, 70000])
    length = min(length, size - off)
    op = rng.choice(["read", "write", "write", "zero", "trim", "status", "cache"])
    if op == "read":
        got = bs.pread(length, off)
        assert got == bytes(model[off:off + length]), f"read {off}+{length} differs from the model"
        assert got == up.pread(length, off), f"read {off}+{length} differs from direct"
    elif op == "write":
        data = bytes(rng.randrange(256) for _ in range(min(length, 64))) * (length // 64 + 1)
        data = data[:length]
        bs.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 7 == 0 else 0)
        model[off:off + length] = data
    elif op == "zero":
        bs.zero(length, off)
        model[off:off + length] = bytes(length)
    elif op == "trim":
        bs.trim(length, off)  # contents afterwards are up to the server: re-read them
        model[off:off + length] = up.pread(length, off)
    elif op == "cache":
        bs.cache(length, off)
    else:
        seen = []
        def extent(meta, offset, entries, err):
            seen.append(entries)
        bs.block_status(length, off, extent)
        assert seen and seen[0][0] > 0 and sum(seen[0][0::2]) <= length, f"block status {off}+{length}: {seen}"
        direct = []
        up.block_status(length, off, lambda m, o, e, err: direct.append(e), nbd.CMD_FLAG_REQ_ONE)
        # The extent the query starts in: data or not, as direct (lengths may differ: bscache's cache may know more).
        assert (seen[0][1] & 1) == (direct[0][1] & 1), f"block status {off}+{length}: {seen[0][:2]}, direct {direct[0]}"
assert whole_disk() == bytes(model), "the disk differs from the model"
# The largest READ (32 MiB, qemu-nbd's maximum) at an odd offset: widened past the maximum, read in two.
assert bs.pread(32 << 20, 100) == bytes(model[100:100 + (32 << 20)]), "a 32 MiB unaligned read"
print("300 random unaligned requests: the disk equals the model")
PY
pass "unaligned READ/WRITE/WRITE_ZEROES/TRIM/CACHE/BLOCK_STATUS work, and the disk holds what was written"

$py - "$T/up.sock" "$T/bs.sock" <<'PY' || fail "concurrent read-modify-writes"
import sys, nbd
def connect(sock, agree):
    h = nbd.NBD()
    h.set_request_block_size(agree)
    h.connect_unix(sock)
    return h
up = connect(sys.argv[1], True)
base = 6 << 20
up.zero(8192, base)
clients = [connect(sys.argv[2], False) for _ in range(4)]
# 4 clients x 64 one-byte writes in flight at once, into 2 blocks: every byte must survive.
cookies = []
for k, h in enumerate(clients):
    for i in range(64):
        cookies.append((h, h.aio_pwrite(bytes([(k * 64 + i) % 255 + 1]), base + i * 16 + k)))
for h, c in cookies:
    while not h.aio_command_completed(c):
        h.poll(-1)
got = up.pread(1024, base)
for k in range(4):
    for i in range(64):
        assert got[i * 16 + k] == (k * 64 + i) % 255 + 1, f"byte {i * 16 + k} lost: {got[i * 16 + k]}"
# An aligned whole-block write racing a read-modify-write of one byte in it: either order, never undone.
aligned = connect(sys.argv[2], True)
for round in range(20):
    block = base + 4096 + round * 512 % 4096
    up.pwrite(b"\x11" * 512, block)
    a = aligned.aio_pwrite(b"\x55" * 512, block)
    b = clients[0].aio_pwrite(b"\xaa", block + 7)
    for h, c in ((aligned, a), (clients[0], b)):
        while not h.aio_command_completed(c):
            h.poll(-1)
    got = up.pread(512, block)
    ok = got == b"\x55" * 512 or got == b"\x55" * 7 + b"\xaa" + b"\x55" * 504
    assert ok, f"round {round}: block holds {got[:16]}...: a write was undone"
print("256 concurrent one-byte writes kept; 20 aligned writes racing a read-modify-write never undone")
PY
pass "concurrent read-modify-writes from several clients lose nothing"
