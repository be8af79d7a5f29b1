"""The NBD error a server answers to each invalid request, one line per request.

usage: errno_probe.py SOCKET_PATH
Negotiates structured replies and base:allocation, sends each request of the
list below on one connection (a WRITE with its payload), and prints
`name error` (error 0: success; `closed`: the server dropped the connection).
test_memory_bound.sh runs it against nbdkit, qemu-nbd and bscache and
compares the answers.
"""
import socket
import struct
import sys

PATH = sys.argv[1]
IHAVEOPT, REQ_MAGIC = 0x49484156454F5054, 0x25609513
READ, WRITE, FLUSH, TRIM, CACHE, ZERO, BS = 0, 1, 3, 4, 5, 6, 7


def recv(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(PATH)
    recv(s, 18)
    s.sendall(struct.pack(">I", 3))

    def option(opt, payload=b""):
        s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload)

    def reply():
        _, _, rtype, length = struct.unpack(">QIII", recv(s, 20))
        return rtype, recv(s, length)

    option(8)
    assert reply()[0] == 1
    ctx = b"base:allocation"
    option(10, struct.pack(">II", 0, 1) + struct.pack(">I", len(ctx)) + ctx)
    while reply()[0] != 1:
        pass
    option(7, struct.pack(">IH", 0, 0))
    while True:
        rtype, payload = reply()
        if rtype == 3 and struct.unpack(">H", payload[:2])[0] == 0:
            size, flags = struct.unpack(">QH", payload[2:12])
        if rtype == 1:
            return s, size, flags


def answer(s):
    """One whole reply; its error (0: success)."""
    magic = struct.unpack(">I", recv(s, 4))[0]
    if magic == 0x67446698:
        return struct.unpack(">IQ", recv(s, 12))[0]
    error = 0
    while True:
        flags, rtype, _, length = struct.unpack(">HHQI", recv(s, 16))
        body = recv(s, length)
        if rtype & 0x8000:
            error = struct.unpack(">I", body[:4])[0]
        if flags & 1:
            return error
        recv(s, 4)


s, size, txflags = connect()
cases = [
    ("read-past-end", READ, size, 512, 0),
    ("read-straddling-end", READ, size - 512, 1024, 0),
    ("read-zero-length", READ, 0, 0, 0),
    ("read-offset-wraps", READ, 2**64 - 512, 1024, 0),
    ("read-unknown-flag", READ, 0, 512, 0x80),
    ("write-past-end", WRITE, size, 512, 0),
    ("write-straddling-end", WRITE, size - 512, 1024, 0),
    ("write-zeroes-past-end", ZERO, size, 512, 0),
    ("write-zeroes-straddling-end", ZERO, size - 512, 1024, 0),
    ("trim-past-end", TRIM, size, 512, 0),
    ("cache-past-end", CACHE, size, 512, 0),
    ("block-status-past-end", BS, size, 512, 0),
    ("block-status-zero-length", BS, 0, 0, 0),
    ("flush-with-length", FLUSH, 0, 512, 0),
    ("unknown-command", 42, 0, 512, 0),
]
for name, cmd, offset, length, flags in cases:
    try:
        payload = b"\0" * length if cmd == WRITE else b""
        s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, 1, offset % 2**64, length) + payload)
        print(name, answer(s), flush=True)
    except (EOFError, OSError):
        print(name, "closed", flush=True)
        s.close()
        s, size, txflags = connect()
