"""STARTTLS from the wire up, for bscache --tls: speaks NBD bytes itself and
does TLS with Python's ssl module (X.509), so it can misbehave where libnbd
and qemu cannot.

usage: tls_probe.py SOCKET_PATH CA_CERT MODE   (MODE: require | on)
Each check opens its own connection and asserts the protocol's answer.
"""
import ssl
import struct
import sys
import warnings

import nbdwire
from nbdwire import CMD_BLOCK_STATUS, CMD_READ, ERR_INVALID, ERR_TLS_REQD
from nbdwire import GO_DEFAULT_EXPORT as GO_PAYLOAD
from nbdwire import OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_STARTTLS
from nbdwire import OPT_SET_META_CONTEXT as OPT_SET_META
from nbdwire import OPT_STRUCTURED_REPLY as OPT_STRUCTURED
from nbdwire import REP_ACK as ACK

PATH, CA, MODE = sys.argv[1], sys.argv[2], sys.argv[3]
EINVAL = 22
checks = []


def check(fn):
    checks.append(fn)
    return fn


class Conn(nbdwire.Wire):
    """A connection past the greeting and the client flags, that can start TLS."""

    def __init__(self, timeout=10):
        super().__init__(nbdwire.connect_unix(PATH, timeout).s)

    def closed(self):
        return super().closed(errors=(ConnectionResetError, ssl.SSLError))

    def rest(self):
        """Everything until the server closes (a TLS alert, say)."""
        data = b""
        try:
            while chunk := self.s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        return data

    def start_tls(self):
        assert self.ask(OPT_STARTTLS) == ACK
        ctx = ssl.create_default_context(cafile=CA)
        self.s = ctx.wrap_socket(self.s, server_hostname="localhost")

    def go(self):
        assert self.ask(OPT_GO, GO_PAYLOAD) == ACK


META = nbdwire.set_meta_context_payload([b"base:allocation"])


@check
def plain_options_before_tls():
    c = Conn()
    for opt, payload in ((OPT_LIST, b""), (OPT_INFO, GO_PAYLOAD), (OPT_GO, GO_PAYLOAD), (OPT_STRUCTURED, b""), (999, b"")):
        got = c.ask(opt, payload)
        if MODE == "require":
            assert got == ERR_TLS_REQD, f"option {opt}: {got:#x}"
        elif opt == OPT_GO:
            assert got == ACK, f"GO in plain text with --tls on: {got:#x}"
            return  # in transmission now
    c.option(OPT_EXPORT_NAME)  # no error reply exists: the server must close
    assert c.closed(), "EXPORT_NAME before STARTTLS did not close the connection"


@check
def starttls_once_and_only_without_payload():
    c = Conn()
    assert c.ask(OPT_STARTTLS, b"x") == ERR_INVALID
    c.start_tls()
    assert c.ask(OPT_STARTTLS) == ERR_INVALID, "a second STARTTLS must be invalid"
    c.go()
    c.request(CMD_READ, 0, 4096, cookie=7)
    magic, error, cookie = struct.unpack(">IIQ", c.recv(16))
    assert (magic, error, cookie) == (0x67446698, 0, 7), (hex(magic), error, cookie)
    assert len(c.recv(4096)) == 4096


@check
def plain_negotiation_is_forgotten_after_tls():
    if MODE == "require":
        return  # nothing can be negotiated in plain text there
    c = Conn()
    assert c.ask(OPT_STRUCTURED) == ACK
    assert c.ask(OPT_SET_META, META) == ACK
    c.start_tls()
    c.go()
    # Structured replies and base:allocation were chosen in plain text: both
    # must be gone. BLOCK_STATUS without a context is refused, in a simple reply.
    c.request(CMD_BLOCK_STATUS, 0, 4096, cookie=9)
    magic, error, cookie = struct.unpack(">IIQ", c.recv(16))
    assert magic == 0x67446698, f"reply magic {magic:#x}: structured replies survived STARTTLS"
    assert (error, cookie) == (EINVAL, 9), (error, cookie)


@check
def plain_bytes_after_starttls_are_not_options():
    c = Conn()
    # STARTTLS and a plain GO in one write: the GO bytes must be taken as a
    # (broken) TLS ClientHello, never acted on.
    c.s.sendall(nbdwire.option_bytes(OPT_STARTTLS) + nbdwire.option_bytes(OPT_GO, GO_PAYLOAD))
    _, rtype, _ = c.reply()
    assert rtype == ACK
    rest = c.rest()  # raises socket.timeout if the server waits for more
    assert not rest or rest[0] == 0x15, f"after STARTTLS the server sent {rest[:20]!r}, not a TLS alert"


@check
def garbage_instead_of_client_hello():
    c = Conn()
    assert c.ask(OPT_STARTTLS) == ACK
    c.s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" * 4)
    rest = c.rest()
    assert not rest or rest[0] == 0x15, f"answer to garbage: {rest[:20]!r}"


@check
def disconnect_mid_handshake():
    c = Conn()
    assert c.ask(OPT_STARTTLS) == ACK
    c.s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc")  # the start of a ClientHello, then gone
    c.s.close()


def tls_client_up_to(version):
    """A client that offers TLS up to `version`, old ciphers allowed (OpenSSL's
    SECLEVEL=0), so that whatever refuses an old version is the server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(CA)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1/TLSv1_1 are deprecated names
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = version
    return ctx


@check
def tls_below_1_2_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.TLSVersion.TLSv1_1
    c = Conn()
    assert c.ask(OPT_STARTTLS) == ACK
    try:
        tls = tls_client_up_to(old).wrap_socket(c.s, server_hostname="localhost")
        raise AssertionError(f"a client offering at most TLS 1.1 got {tls.version()}")
    except (ssl.SSLError, ConnectionResetError, EOFError):
        pass
    # The same client allowed TLS 1.2 gets in: the refusal above was the version.
    c = Conn()
    assert c.ask(OPT_STARTTLS) == ACK
    tls = tls_client_up_to(ssl.TLSVersion.TLSv1_2).wrap_socket(c.s, server_hostname="localhost")
    assert tls.version() == "TLSv1.2", tls.version()
    tls.close()


@check
def handshake_never_finished():
    c = Conn(timeout=60)
    assert c.ask(OPT_STARTTLS) == ACK
    assert c.closed(), "a client that never starts TLS must be dropped at the handshake timeout"


for fn in checks:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report which check, then fail
        print(f"FAIL: {fn.__name__}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {fn.__name__}")
