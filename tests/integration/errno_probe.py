"""The NBD error a server answers to each invalid request, one line per request.

usage: errno_probe.py SOCKET_PATH
Negotiates structured replies and base:allocation, sends each request of the
list below on one connection (a WRITE with its payload), and prints
`name error` (error 0: success; `closed`: the server dropped the connection).
test_memory_bound.sh runs it against nbdkit, qemu-nbd and bscache and
compares the answers.
"""
import sys

import nbdwire
from nbdwire import CMD_BLOCK_STATUS as BS
from nbdwire import CMD_CACHE as CACHE
from nbdwire import CMD_FLUSH as FLUSH
from nbdwire import CMD_READ as READ
from nbdwire import CMD_TRIM as TRIM
from nbdwire import CMD_WRITE as WRITE
from nbdwire import CMD_ZERO as ZERO

PATH = sys.argv[1]


def connect():
    return nbdwire.connect_unix(PATH).go()


c = connect()
size = c.size
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
        c.request(cmd, offset % 2**64, length, flags, payload=payload)
        print(name, c.reply_error(), flush=True)
    except (EOFError, OSError):
        print(name, "closed", flush=True)
        c.s.close()
        c = connect()
