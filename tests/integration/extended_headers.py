"""Extended headers through bscache, byte by byte: what no client on this
machine sends (Debian 12's libnbd 1.14 cannot; qemu 10 neither filters block
status nor sends TRIM longer than 2 GiB).

usage: extended_headers.py SOCKET_PATH EXPORT_SIZE CHECK...
Checks: negotiation, block_status_ext, long_commands, filter, one_tib_hole,
five_gib_zero_and_trim.
The export must be EXPORT_SIZE bytes, at least 16 GiB + 1 MiB, with 1 MiB of
0xab at 16 GiB; block_status_ext wants nothing else written below it yet;
long_commands overwrites [512 MiB, 9.5 GiB); `filter` needs upstream to offer
qemu:allocation-depth beside base:allocation (qemu-nbd -A); one_tib_hole an
export of more than 1 TiB whose first TiB is a hole; five_gib_zero_and_trim
overwrites [1 GiB, 6 GiB) (the caller counts what reached upstream).
"""
import struct
import sys

import nbdwire

PATH, SIZE = sys.argv[1], int(sys.argv[2])
EXT_REQUEST, EXT_REPLY = 0x21E41C71, 0x6E8A278C
ACK, INFO, META_CONTEXT = 1, 3, 4
ERR_INVALID, ERR_EXT_HEADER_REQD = (1 << 31) | 3, (1 << 31) | 10
OPT_EXPORT_NAME, OPT_GO, OPT_STRUCTURED, OPT_SET_META, OPT_EXTENDED = 1, 7, 8, 10, 11
READ, WRITE, TRIM, WRITE_ZEROES, BLOCK_STATUS = 0, 1, 4, 6, 7
FUA, REQ_ONE, PAYLOAD_LEN = 1 << 0, 1 << 3, 1 << 5
TX_BLOCK_STATUS_PAYLOAD = 1 << 12
TYPE_NONE, TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE, TYPE_BLOCK_STATUS, TYPE_BLOCK_STATUS_EXT = 0, 1, 2, 5, 6
GIB = 1 << 30
EINVAL = 22


class Conn(nbdwire.Wire):
    """nbdwire's Wire past the greeting, with extended requests and replies."""

    def __init__(self):
        super().__init__(nbdwire.connect_unix(PATH, timeout=60).s)
        self.cookie = 0

    def set_meta_context(self, names):
        q = b"".join(struct.pack(">I", len(n)) + n.encode() for n in names)
        self.option(OPT_SET_META, struct.pack(">II", 0, len(names)) + q)
        ids = {}
        while True:
            _, rtype, payload = self.reply()
            if rtype == META_CONTEXT:
                ids[payload[4:].decode()] = struct.unpack(">I", payload[:4])[0]
            else:
                assert rtype == ACK, hex(rtype)
                return ids

    def go(self):
        rtype = self.ask(OPT_GO, struct.pack(">IHH", 0, 1, 3))  # "" asking for NBD_INFO_BLOCK_SIZE
        assert rtype == ACK, hex(rtype)

    def extended(self, contexts=("base:allocation",)):
        self.option(OPT_EXTENDED)
        assert self.reply()[1] == ACK
        self.ids = self.set_meta_context(list(contexts))
        self.go()
        assert self.size == SIZE, (self.size, SIZE)
        return self

    def request(self, cmd, offset, length, flags=0, payload=b""):
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQQ", EXT_REQUEST, flags, cmd, self.cookie, offset, length) + payload)
        return self.cookie

    def chunks(self, cookie, offset):
        """The chunks of one reply, as (type, payload); every header checked."""
        out = []
        while True:
            magic, flags, rtype, got_cookie, got_offset, length = struct.unpack(">IHHQQQ", self.recv(32))
            assert magic == EXT_REPLY, f"not an extended reply: magic {magic:#x}"
            assert got_cookie == cookie, (got_cookie, cookie)
            assert got_offset == offset, f"the reply must echo the request's offset: {got_offset} != {offset}"
            out.append((rtype, self.recv(length)))
            if flags & 1:
                return out

    def error_of(self, chunks):
        errors = [struct.unpack(">I", p[:4])[0] for t, p in chunks if t & 0x8000]
        return errors[0] if errors else 0

    def block_status(self, offset, length, flags=0, filter_ids=None):
        """{context id: [(length, flags)]}, or the error."""
        if filter_ids is None:
            cookie = self.request(BLOCK_STATUS, offset, length, flags)
        else:
            payload = struct.pack(">Q", length) + b"".join(struct.pack(">I", i) for i in filter_ids)
            cookie = self.request(BLOCK_STATUS, offset, len(payload), flags | PAYLOAD_LEN, payload)
        chunks = self.chunks(cookie, offset)
        error = self.error_of(chunks)
        if error:
            return error
        answer = {}
        for rtype, p in chunks:
            assert rtype == TYPE_BLOCK_STATUS_EXT, f"chunk type {rtype}, not BLOCK_STATUS_EXT"
            context, count = struct.unpack(">II", p[:8])
            assert len(p) == 8 + 16 * count and count > 0, (len(p), count)
            answer[context] = [struct.unpack(">QQ", p[8 + 16 * i:24 + 16 * i]) for i in range(count)]
        return answer

    def simple_command(self, cmd, offset, length, flags=0, payload=b""):
        chunks = self.chunks(self.request(cmd, offset, length, flags, payload), offset)
        return self.error_of(chunks)

    def read(self, offset, length):
        data = bytearray(length)
        for rtype, p in self.chunks(self.request(READ, offset, length), offset):
            assert rtype in (TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE, TYPE_NONE), rtype
            if rtype == TYPE_OFFSET_DATA:
                at = struct.unpack(">Q", p[:8])[0] - offset
                data[at:at + len(p) - 8] = p[8:]
        return bytes(data)


def check_negotiation():
    c = Conn()
    c.option(OPT_STRUCTURED)
    assert c.reply()[1] == ACK
    c.option(OPT_EXTENDED, b"x")
    assert c.reply()[1] == ERR_INVALID, "EXTENDED_HEADERS takes no payload"
    c.option(OPT_EXTENDED)
    assert c.reply()[1] == ACK, "bscache must offer extended headers whatever upstream speaks"
    c.option(OPT_STRUCTURED)
    assert c.reply()[1] == ERR_EXT_HEADER_REQD
    ids = c.set_meta_context(["base:allocation"])
    c.go()
    assert c.txflags & TX_BLOCK_STATUS_PAYLOAD, f"payload filtering not offered: {c.txflags:#x}"
    # Every reply is extended, a success without payload too (NBD_REPLY_TYPE_NONE).
    assert c.simple_command(3, 0, 0) == 0  # FLUSH
    # EXPORT_NAME after extended headers: the spec forbids it; bscache hangs up.
    d = Conn()
    d.option(OPT_EXTENDED)
    assert d.reply()[1] == ACK
    d.option(OPT_EXPORT_NAME)
    assert d.closed()
    print(f"ok: negotiation (contexts {ids}, flags {c.txflags:#x})")


def check_block_status_ext():
    c = Conn().extended()
    base = c.ids["base:allocation"]
    # One query for the whole export, longer than 4 GiB: answered with 64-bit
    # descriptors, from offset 0, never past what was asked.
    answer = c.block_status(0, SIZE)
    extents = answer[base]
    assert sum(length for length, _ in extents) <= SIZE
    # Walk the map with long queries; it must show data exactly at 16 GiB.
    offset, walked = 0, []
    while offset < SIZE:
        extents = c.block_status(offset, SIZE - offset)[base]
        for length, flags in extents:
            walked.append((offset, length, flags))
            offset += length
    data = [(o, n) for o, n, f in walked if not f & 1]
    assert data and data[0][0] <= 16 * GIB < data[0][0] + data[0][1], data
    assert all((f & 3) == 3 for o, n, f in walked if o + n <= 16 * GIB), "all zero holes before 16 GiB"
    # REQ_ONE over the hole: one descriptor, longer than 4 GiB, no longer than asked.
    one = c.block_status(0, 12 * GIB, REQ_ONE)[base]
    assert len(one) == 1 and 4 * GIB < one[0][0] <= 12 * GIB, one
    # Past the end: EINVAL, and the connection goes on.
    assert c.block_status(SIZE - 512, 1024) == EINVAL
    assert c.read(16 * GIB, 4096) == b"\xab" * 4096
    print(f"ok: BLOCK_STATUS_EXT (walk of {len(walked)} extents, REQ_ONE hole {one[0][0]} bytes)")


def check_long_commands():
    c = Conn().extended()
    base = c.ids["base:allocation"]
    # Data on both sides of the 4 GiB marks, then one 9 GiB WRITE_ZEROES over
    # them (FUA), one 9 GiB TRIM: each is answered once, as one command.
    for at in (GIB, 5 * GIB - 4096, 9 * GIB):
        assert c.simple_command(WRITE, at, 4096, PAYLOAD_LEN, b"\xcd" * 4096) == 0
    assert c.read(5 * GIB - 4096, 4096) == b"\xcd" * 4096
    assert c.simple_command(WRITE_ZEROES, 512 * 1024 * 1024, 9 * GIB, FUA) == 0
    for at in (GIB, 5 * GIB - 4096, 9 * GIB):
        assert c.read(at, 4096) == b"\0" * 4096, f"zeroes did not reach {at}"
    one = c.block_status(0, 12 * GIB, REQ_ONE)[base]
    assert one[0][1] & 2, f"zeroed range not reported zero: {one}"
    for at in (2 * GIB, 7 * GIB):
        assert c.simple_command(WRITE, at, 4096, PAYLOAD_LEN, b"\xee" * 4096) == 0
    assert c.simple_command(TRIM, 0, 9 * GIB) == 0
    assert c.simple_command(WRITE_ZEROES, 0, 9 * GIB) == 0
    assert c.read(7 * GIB, 4096) == b"\0" * 4096
    # READ stays bounded by the maximum block size. A WRITE without its
    # payload flag (qemu's client sends them so) still carries its data.
    assert c.simple_command(READ, 0, 5 * GIB) == EINVAL
    assert c.simple_command(WRITE, 4096, 4096, 0, b"\x11" * 4096) == 0
    assert c.read(4096, 4096) == b"\x11" * 4096
    # A payload on a command that takes none is consumed, then refused.
    assert c.simple_command(TRIM, 0, 8, PAYLOAD_LEN, b"\0" * 8) == EINVAL
    assert c.read(16 * GIB, 4096) == b"\xab" * 4096, "the stream stayed in step"
    print("ok: 9 GiB WRITE_ZEROES and TRIM answered as one command each")


def check_filter():
    c = Conn().extended(("base:allocation", "qemu:allocation-depth"))
    assert c.txflags & TX_BLOCK_STATUS_PAYLOAD
    base, depth = c.ids["base:allocation"], c.ids["qemu:allocation-depth"]
    both = c.block_status(0, 16 * GIB + 4096)
    assert set(both) == {base, depth}, both
    only_depth = c.block_status(0, 16 * GIB + 4096, filter_ids=[depth])
    assert set(only_depth) == {depth}, only_depth
    only_base = c.block_status(0, 16 * GIB + 4096, filter_ids=[base])
    assert set(only_base) == {base}, only_base
    # (Lengths may differ: one is the cache's window, the other upstream's answer.)
    assert only_base[base][0][1] == both[base][0][1], (only_base, both)
    again = c.block_status(0, 16 * GIB + 4096, REQ_ONE, filter_ids=[base])  # the cache's fast path
    assert set(again) == {base} and len(again[base]) == 1, again
    assert c.block_status(0, 4096, filter_ids=[depth, base]).keys() == {base, depth}
    # Unknown or repeated ids: EINVAL, payload consumed, connection intact.
    assert c.block_status(0, 4096, filter_ids=[999]) == EINVAL
    assert c.block_status(0, 4096, filter_ids=[base, base]) == EINVAL
    assert c.read(16 * GIB, 4096) == b"\xab" * 4096
    print(f"ok: payload filtering (base {base}, depth {depth})")


def check_one_tib_hole():
    c = Conn().extended()
    base = c.ids["base:allocation"]
    tib = 1 << 40
    # Fill the cache with the hole, one window at a time ...
    offset = 0
    while offset < tib:
        offset += sum(n for n, _ in c.block_status(offset, tib - offset)[base])
    # ... then one REQ_ONE query answers the whole TiB in one descriptor.
    one = c.block_status(0, tib, REQ_ONE)[base]
    assert one == [(tib, 3)], one
    print("ok: a REQ_ONE hit over a cached 1 TiB hole answers 1 TiB")


def check_five_gib_zero_and_trim():
    c = Conn().extended()
    for at in (GIB, 4 * GIB, 6 * GIB - 4096):
        assert c.simple_command(WRITE, at, 4096, PAYLOAD_LEN, b"\x5a" * 4096) == 0
    # One WRITE_ZEROES of 5 GiB (FUA), answered once; then one TRIM of 5 GiB.
    assert c.simple_command(WRITE_ZEROES, GIB, 5 * GIB, FUA) == 0
    for at in (GIB, 4 * GIB, 6 * GIB - 4096):
        assert c.read(at, 4096) == b"\0" * 4096, f"zeroes did not reach {at}"
    assert c.simple_command(TRIM, GIB, 5 * GIB) == 0
    assert c.read(16 * GIB, 4096) == b"\xab" * 4096, "the stream stayed in step"
    print("ok: one 5 GiB WRITE_ZEROES and one 5 GiB TRIM")


for name in sys.argv[3:]:
    globals()["check_" + name]()
