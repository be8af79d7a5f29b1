# Helpers for test_libnbd_new.sh, imported inside the newer libnbd's nbdsh
# (scripts/libnbd-new.sh), which passes its handle `h`. Also run by plain
# /usr/bin/python3 for `safe_map` (no nbd needed there).
import hashlib
import json
import sys

GiB = 1 << 30
# The longest 64 KiB-aligned length a 32-bit request carries: what a client
# without extended headers may ask in one command (libnbd refuses more, ERANGE).
COMPACT_LIMIT = (1 << 32) - (1 << 16)


def longest_request(h):
    return h.get_size() if h.get_extended_headers_negotiated() else COMPACT_LIMIT


def extent_map(h, context="base:allocation"):
    """The whole export's extents as [offset, length, flags], neighbours with
    equal flags joined, walked with block_status_64 in the longest requests
    the connection takes."""
    size = h.get_size()
    out = []
    pos = 0
    while pos < size:
        got = []

        def collect(ctx, offset, entries, err):
            if ctx == context:
                got.extend(entries)
            return 0

        h.block_status_64(min(size - pos, longest_request(h)), pos, collect)
        if not got:
            raise RuntimeError(f"no {context} extents at {pos}")
        for length, flags in got:
            length = min(length, size - pos)
            if out and out[-1][2] == flags:
                out[-1][1] += length
            else:
                out.append([pos, length, flags])
            pos += length
            if pos >= size:
                break
    return out


def print_map(h):
    print(json.dumps(extent_map(h)))


def one_call(h, context="base:allocation"):
    """The extents of ONE block_status_64 over the whole export (longer than a
    32-bit length: needs extended headers)."""
    got = []

    def collect(ctx, offset, entries, err):
        if ctx == context:
            got.extend(entries)
        return 0

    h.block_status_64(h.get_size(), 0, collect)
    return got


def assert_long_extent(h):
    """One call over the whole export answers an extent longer than 4 GiB."""
    extents = one_call(h)
    assert any(length > 0xFFFFFFFF for length, _ in extents), extents


def assert_filtered(h, wanted="base:allocation"):
    """block_status_filter asking for `wanted` only is answered for it only,
    though the handle negotiated more contexts where upstream offers them."""
    assert h.can_block_status_payload(), "no NBD_FLAG_BLOCK_STATUS_PAYLOAD"
    seen = set()

    def collect(ctx, offset, entries, err):
        seen.add(ctx)
        return 0

    h.block_status_filter(min(h.get_size(), longest_request(h)), 0, [wanted], collect)
    assert seen == {wanted}, (seen, [h.get_meta_context(i) for i in range(h.get_nr_meta_contexts())])


def mutate(h, op, offset, length, whole=False):
    """h.zero or h.trim of [offset, offset + length): in one command if
    `whole`, else in the longest pieces the connection takes."""
    command = h.zero if op == "zero" else h.trim
    step = length if whole else longest_request(h)
    while length:
        n = min(length, step)
        command(n, offset)
        offset += n
        length -= n


def digest(h, ranges):
    """sha256 of the bytes of `ranges` [(offset, length)], read in 4 MiB pieces."""
    sha = hashlib.sha256()
    for offset, length in ranges:
        while length:
            n = min(length, 4 << 20)
            sha.update(h.pread(n, offset))
            offset += n
            length -= n
    print(sha.hexdigest())


def safe_map(proxied_file, direct_file):
    """Every flag the proxied map claims (HOLE, ZERO) upstream has there too:
    after writes through the cache it may say less than upstream, never more."""
    proxied = json.load(open(proxied_file))
    direct = json.load(open(direct_file))
    points = sorted({e[0] for e in proxied} | {e[0] for e in direct})

    def flags_at(extents, pos):
        for offset, length, flags in extents:
            if offset <= pos < offset + length:
                return flags
        raise RuntimeError(f"{pos} is not covered")

    for pos in points:
        claimed, actual = flags_at(proxied, pos), flags_at(direct, pos)
        if claimed & ~actual:
            sys.exit(f"at {pos} the proxied map claims flags {claimed}, upstream has {actual}")


if __name__ == "__main__":
    safe_map(sys.argv[1], sys.argv[2])
