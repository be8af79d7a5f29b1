"""A tiny NBD client that speaks bytes, for feeding bscache bad input.

Each check opens its own connection, misbehaves in one way, and asserts the
protocol's answer; at the end a well-behaved libnbd client must still work.
usage: rawclient.py SOCKET_PATH
"""
import struct
import sys

import nbd
import nbdwire
from nbdwire import ERR_INVALID, ERR_POLICY, ERR_TOO_BIG, ERR_UNSUP, IHAVEOPT

PATH = sys.argv[1]
EINVAL, EPERM = 22, 1
FUA, SEND_FUA = 1 << 0, 1 << 3
checks = []


def check(fn):
    checks.append(fn)
    return fn


def greeted():
    """A connection past the greeting; the client flags are the check's to send."""
    return nbdwire.connect_unix(PATH, client_flags=None)


def structured_error(c):
    magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", c.recv(20))
    body = c.recv(length)
    assert magic == nbdwire.STRUCTURED_REPLY_MAGIC, hex(magic)
    assert rtype & 0x8000, f"expected an error chunk, got type {rtype}"
    return struct.unpack(">I", body[:4])[0]


def start():
    return nbdwire.connect_unix(PATH)


@check
def unknown_client_flags_close():
    c = greeted()
    c.s.sendall(struct.pack(">I", 0x80))
    assert c.closed()


@check
def bad_option_magic_closes():
    c = start()
    c.s.sendall(struct.pack(">QII", 0x1234, 7, 0))
    assert c.closed()


@check
def unknown_option_is_unsupported_and_negotiation_continues():
    c = start()
    c.option(999)
    assert c.reply()[1] == ERR_UNSUP
    c.option(5)  # STARTTLS
    assert c.reply()[1] == ERR_POLICY
    c.go()


@check
def oversized_option_is_refused():
    c = start()
    c.option(6, b"\0" * (1 << 20))
    assert c.reply()[1] == ERR_TOO_BIG
    c.go()


@check
def truncated_info_payload_is_invalid():
    c = start()
    c.option(6, struct.pack(">I", 100) + b"abc")
    assert c.reply()[1] == ERR_INVALID
    c.go()


@check
def set_meta_context_before_structured_replies_is_invalid():
    c = start()
    c.option(10, struct.pack(">II", 0, 1) + struct.pack(">I", 15) + b"base:allocation")
    assert c.reply()[1] == ERR_INVALID


@check
def disconnect_mid_option():
    c = start()
    c.s.sendall(struct.pack(">QII", IHAVEOPT, 6, 100) + b"abc")
    c.s.close()


@check
def requests_past_the_end_zero_length_unknown_flags_and_commands():
    c = start()
    c.go()
    for cmd, off, length, flags in [(0, c.size, 512, 0), (0, c.size - 512, 1024, 0), (0, 0, 0, 0),
                                    (0, 2**64 - 512, 1024, 0), (0, 0, 512, 0x80), (0, 0, 512, 8),
                                    (42, 0, 512, 0), (7, c.size, 512, 0), (0, 0, 64 << 20, 0)]:
        c.request(cmd, off, length, flags)
        assert structured_error(c) == EINVAL, (cmd, off, length, flags)
    # A write larger than the maximum, with its payload: refused, connection intact.
    c.request(1, 0, 33 << 20, payload=b"\0" * (33 << 20))
    assert structured_error(c) == EINVAL
    c.request(0, 0, 512)
    magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", c.recv(20))
    assert rtype == 1 and length == 512 + 8, (rtype, length)
    c.recv(length)


@check
def fua_is_accepted_and_ignored_where_it_means_nothing():
    # NBD spec: once SEND_FUA is advertised the server MUST accept FUA on
    # every command, ignoring it where nothing is written.
    c = start()
    c.go()
    assert c.txflags & SEND_FUA, f"test setup: upstream should advertise FUA (flags {c.txflags:#x})"
    for cmd, length in [(7, 4096), (0, 4096), (3, 0), (1, 512)]:  # BLOCK_STATUS, READ, FLUSH, WRITE
        c.request(cmd, 0, length, flags=FUA, cookie=cmd, payload=b"\0" * 512 if cmd == 1 else b"")
        error = c.reply_error()
        assert error == 0, f"command {cmd} with FUA: error {error}"


@check
def disconnect_mid_write_payload():
    c = start()
    c.go()
    c.request(1, 0, 65536, payload=b"x" * 1000)
    c.s.close()


@check
def bad_request_magic_closes():
    c = start()
    c.go()
    c.s.sendall(b"\xde\xad\xbe\xef" + b"\0" * 24)
    assert c.closed()


@check
def old_style_simple_replies_still_work():
    c = start()
    c.go(structured=False)
    c.request(0, 0, 512, cookie=77)
    magic, error, cookie = struct.unpack(">IIQ", c.recv(16))
    assert (magic, error, cookie) == (0x67446698, 0, 77)
    c.recv(512)
    c.request(7, 0, 512, cookie=78)  # block status without contexts
    magic, error, cookie = struct.unpack(">IIQ", c.recv(16))
    assert error == EINVAL and cookie == 78


@check
def abort_is_acknowledged():
    c = start()
    c.option(2)
    assert c.reply()[1] == 1
    assert c.closed()


failed = 0
for fn in checks:
    try:
        fn()
        print(f"ok: {fn.__name__}")
    except Exception as e:  # noqa: BLE001 - report every failing check
        failed += 1
        print(f"FAIL: {fn.__name__}: {e!r}")

# After all that, a real client still gets served.
h = nbd.NBD()
h.connect_uri(f"nbd+unix:///?socket={PATH}")
assert h.pread(512, 0) is not None
print(f"{len(checks) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
