"""NBD from the wire up, for the tests that must send what libnbd and qemu
never would (bad input, hostile clients, STARTTLS by hand) and for reading a
bscache process's own view of itself (RSS, stats file).

A `Wire` wraps one connected socket: the greeting is read by `connect_unix`,
everything after it is the caller's to send, so a check can misbehave at any
step. Reads raise EOFError when the server closes early.
"""
import json
import os
import signal
import socket
import struct
import time

IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
CLIENT_FLAGS = 3  # FIXED_NEWSTYLE | NO_ZEROES

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_INFO = 1, 3
ERR_UNSUP, ERR_POLICY, ERR_INVALID = (1 << 31) | 1, (1 << 31) | 2, (1 << 31) | 3
ERR_TLS_REQD, ERR_TOO_BIG = (1 << 31) | 5, (1 << 31) | 9
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_ZERO, CMD_BLOCK_STATUS = 0, 1, 2, 3, 4, 5, 6, 7
GO_DEFAULT_EXPORT = struct.pack(">IH", 0, 0)  # empty name, no info requests


def option_bytes(opt, payload=b""):
    return struct.pack(">QII", IHAVEOPT, opt, len(payload)) + payload


def request_bytes(cmd, offset, length, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def set_meta_context_payload(contexts):
    query = b"".join(struct.pack(">I", len(c)) + c for c in contexts)
    return struct.pack(">II", 0, len(contexts)) + query


class Wire:
    def __init__(self, sock):
        self.s = sock
        self.size = self.txflags = None

    def recv(self, n):
        data = b""
        while len(data) < n:
            chunk = self.s.recv(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def closed(self, errors=(ConnectionResetError,)):
        """Whether the server closed (reads one byte: call it when nothing else is due)."""
        try:
            return self.s.recv(1) == b""
        except errors:
            return True

    def option(self, opt, payload=b""):
        self.s.sendall(option_bytes(opt, payload))

    def reply(self):
        """One option reply: (option, reply type, payload)."""
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return opt, rtype, self.recv(length)

    def ask(self, opt, payload=b""):
        """Sends one option; returns the type of its last reply (ACK or an error), noting the export's size."""
        self.option(opt, payload)
        while True:
            _, rtype, body = self.reply()
            if rtype == REP_INFO and struct.unpack(">H", body[:2])[0] == 0:  # NBD_INFO_EXPORT
                self.size, self.txflags = struct.unpack(">QH", body[2:12])
            if rtype == REP_ACK or rtype & (1 << 31):
                return rtype

    def go(self, structured=True, contexts=(b"base:allocation",)):
        """Structured replies and `contexts` (if structured), then GO for the default export; asserts success."""
        if structured:
            assert self.ask(OPT_STRUCTURED_REPLY) == REP_ACK
            if contexts:
                assert self.ask(OPT_SET_META_CONTEXT, set_meta_context_payload(contexts)) == REP_ACK
        rtype = self.ask(OPT_GO, GO_DEFAULT_EXPORT)
        assert rtype == REP_ACK, f"GO refused: {rtype:#x}"
        return self

    def request(self, cmd, offset, length, flags=0, cookie=1, payload=b""):
        self.s.sendall(request_bytes(cmd, offset, length, flags, cookie, payload))

    def reply_error(self):
        """Reads one whole reply, simple or structured; returns its error (0: success)."""
        magic = struct.unpack(">I", self.recv(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, _cookie = struct.unpack(">IQ", self.recv(12))
            return error
        error = 0
        while True:
            assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
            flags, rtype, _cookie, length = struct.unpack(">HHQI", self.recv(16))
            body = self.recv(length)
            if rtype & 0x8000:
                error = struct.unpack(">I", body[:4])[0]
            if flags & 1:  # DONE
                return error
            magic = struct.unpack(">I", self.recv(4))[0]


def connect_unix(path, timeout=10, client_flags=CLIENT_FLAGS):
    """A Wire past the server's greeting; sends `client_flags` unless None."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    wire = Wire(s)
    greeting = wire.recv(18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT", greeting
    wire.server_flags = struct.unpack(">H", greeting[16:])[0]
    if client_flags is not None:
        s.sendall(struct.pack(">I", client_flags))
    return wire


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(f"no {field} for pid {pid}")


def fresh_stats(pid, path, seconds=10):
    """bscache's stats file, written anew on SIGUSR1; None if it did not come in time."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.02)
    return None
