#!/usr/bin/env bash
# Spliced data that cannot stay in its pipes. A peer that sends a payload in
# 100-byte pieces makes one pipe piece per send, which fills a pipe long
# before its 512 KiB are in.
# - WRITE, from a client: bscache must copy what the pipes hold into a
#   buffer and read the rest after it; the write lands whole, is not counted
#   as spliced, and the connection goes on (a normal WRITE after it is spliced).
# - READ, from an upstream (a small NBD server here, multi-conn, simple
#   replies, data in 100-byte pieces): bscache must drop that reply's data,
#   read again into a buffer, and stop splicing on that connection; the
#   client gets the right bytes every time.
source "$(dirname "$0")/lib.sh"
py=/usr/bin/python3
here=$(cd "$(dirname "$0")" && pwd)

start_nbdkit up memory 64M
start_bscache bs --upstream "$(uri up)" --stats-file "$T/bs.json"

$py - "$here" "$T/bs.sock" <<'PY' || fail "the dribbled WRITE"
import os, struct, sys
sys.path.insert(0, sys.argv[1])
import nbdwire

# Fixed newstyle, no zeroes, NBD_OPT_GO for the default export, simple replies.
c = nbdwire.connect_unix(sys.argv[2]).go(structured=False)
sock, recv = c.s, c.recv

def write(cookie, offset, data, piece):
    sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, cookie, offset, len(data)))
    for at in range(0, len(data), piece):
        sock.send(data[at:at + piece])  # one socket buffer, and so one pipe piece, each
    magic, error, got = struct.unpack(">IIQ", recv(16))
    assert magic == 0x67446698 and got == cookie, "a reply to another request"
    assert error == 0, f"WRITE failed with NBD error {error}"

def read(cookie, offset, length):
    sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, offset, length))
    magic, error, got = struct.unpack(">IIQ", recv(16))
    assert magic == 0x67446698 and got == cookie and error == 0
    return recv(length)

dribbled = os.urandom(600 * 1024)  # two pipes' worth: the first overflows
write(1, 4096, dribbled, 100)
normal = os.urandom(256 * 1024)
write(2, 8 << 20, normal, len(normal))
assert read(3, 4096, len(dribbled)) == dribbled, "the dribbled WRITE's data differs"
assert read(4, 8 << 20, len(normal)) == normal, "the normal WRITE's data differs"
sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 5, 0, 0))  # NBD_CMD_DISC
PY
pass "a WRITE dribbled in 100-byte pieces arrived whole; the connection went on"

kill -USR1 "$(cat "$T/bs.pid")"
wait_for_file "$T/bs.json" 10
jq -e '.upstream.requests.write == 2 and .upstream.writes_spliced == 1' "$T/bs.json" >/dev/null \
  || fail "expected 2 WRITEs upstream, 1 of them spliced: $(jq -c '.upstream' "$T/bs.json")"
pass "the overflowed WRITE went through a buffer, the next one was spliced"

# ---- READ: an upstream that dribbles its replies ----
cat >"$T/dribbler.py" <<'PY'
import os, socket, struct, sys, threading
SIZE = 16 << 20
disk = bytearray(os.urandom(SIZE))
open(sys.argv[2], "wb").write(disk)
OPT_MAGIC, REP_MAGIC = 0x49484156454f5054, 0x3e889045565a9

def serve(conn):
    def recv(n):
        out = b""
        while len(out) < n:
            got = conn.recv(n - len(out))
            if not got:
                raise EOFError
            out += got
        return out
    def reply(opt, kind, data=b""):
        conn.sendall(struct.pack(">QIII", REP_MAGIC, opt, kind, len(data)) + data)
    try:
        conn.sendall(struct.pack(">QQH", 0x4e42444d41474943, OPT_MAGIC, 3))
        recv(4)
        while True:
            _, opt, length = struct.unpack(">QII", recv(16))
            recv(length)
            if opt in (7, 1):  # GO, EXPORT_NAME is not used by libnbd here
                # NBD_INFO_EXPORT: size, flags HAS_FLAGS|SEND_FLUSH|CAN_MULTI_CONN
                reply(opt, 3, struct.pack(">HQH", 0, SIZE, 1 | 4 | 0x100))
                reply(opt, 1)
                break
            if opt == 2:  # ABORT
                reply(opt, 1)
                return
            reply(opt, 0x80000001)  # ERR_UNSUP: no structured replies, no meta contexts
        while True:
            _, flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", recv(28))
            if kind == 2:
                return
            payload = recv(length) if kind == 1 else b""
            if kind == 1:
                disk[offset:offset + length] = payload
            conn.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie))
            if kind == 0:
                data = bytes(disk[offset:offset + length])
                for at in range(0, length, 100):
                    conn.send(data[at:at + 100])
    except (EOFError, ConnectionError):
        pass
    finally:
        conn.close()

listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen(16)
open(sys.argv[1] + ".ready", "w").write("listening\n")
while True:
    c, _ = listener.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
$py "$T/dribbler.py" "$T/drip.sock" "$T/drip.img" >"$T/drip.log" 2>&1 &
PIDS+=($!)
wait_for_file "$T/drip.sock.ready" 10
start_bscache rbs --upstream "$(uri drip)" --stats-file "$T/rbs.json"
$py - "$(uri rbs)" "$T/drip.img" <<'PY' || fail "reads from a dribbling upstream"
import nbd, sys
disk = open(sys.argv[2], "rb").read()
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.get_structured_replies_negotiated()
for i, (off, n) in enumerate([(0, 600 * 1024), (1 << 20, 256 * 1024), (3 << 20, 4096), (5 << 20, 1 << 20)] * 3):
    got = h.pread(n, off)
    assert got == disk[off:off + n], f"read {i} at {off}+{n} differs"
h.shutdown()
PY
pass "every read from an upstream sending 100-byte pieces matched"
grep -q "pipe filled before its data was in" "$T/rbs.log" || fail "no READ overflowed its pipe"
kill -USR1 "$(cat "$T/rbs.pid")"
wait_for_file "$T/rbs.json" 10
jq -e '.upstream.requests.read == 14 and .upstream.reads_spliced == 0 and .client.errors.read == 0' "$T/rbs.json" >/dev/null \
  || fail "expected 12 READs, 2 overflowed (one per wire connection) and sent again, none spliced: $(jq -c '.upstream, .client.errors' "$T/rbs.json")"
pass "an overflowing READ was sent again into a buffer, logged, and its connection stopped splicing"
