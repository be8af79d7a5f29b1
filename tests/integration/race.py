"""Writes racing block-status fetches must never leave a stale HOLE/ZERO.

usage:
  race.py slow-write URI OFFSET LENGTH WRITE_DELAY
      Client A writes data over a hole while upstream delays the write; client
      B asks block status for the range during the write (the proxy fetches,
      upstream still sees a hole). Once A's write completed, B asks again.
  race.py slow-fetch URI OFFSET LENGTH PAUSE
      Client B's block-status request goes upstream first and is slow; after
      PAUSE seconds client A writes the range, and the write completes while
      the fetch is still pending. Then B asks again.
In both, the answer after the write completed must not claim HOLE or ZERO.
"""
import sys
import threading
import time

import nbd

mode, uri, offset, length, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])


def connect():
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def status(h, req_one=True):
    seen = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            seen.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, offset, cb, nbd.CMD_FLAG_REQ_ONE if req_one else 0)
    return seen


def check_after(b, during):
    for answer in (status(b, True), status(b, False)):
        covered = 0
        for ext_len, flags in answer:
            if covered >= length:
                break
            if flags & 3:
                sys.exit(f"STALE: after the write completed the proxy says flags {flags} for "
                         f"{offset + covered}+{ext_len} (answers during the race: {during})")
            covered += ext_len
    assert b.pread(length, offset) == b"\xab" * length, "data read back differs"
    print(f"ok: during the race {during}, after it {status(b)}")


a, b = connect(), connect()
during = []
if mode == "slow-write":
    assert status(b)[0][1] & 3, "test setup: the range should start as a hole"
    writer = threading.Thread(target=lambda: a.pwrite(b"\xab" * length, offset))
    writer.start()
    time.sleep(seconds / 4)  # the write is now in flight upstream
    assert writer.is_alive(), "the write finished too early: raise the delay"
    during += [status(b, True), status(b, False)]  # may describe either side of the write
    writer.join()
elif mode == "slow-fetch":
    asker = threading.Thread(target=lambda: during.append(status(b)))
    asker.start()  # the fetch goes upstream, slowly
    time.sleep(seconds)
    assert asker.is_alive(), "the fetch finished before the write began: raise the delay"
    a.pwrite(b"\xab" * length, offset)
    # Without this the test would pass without racing: the write must have
    # completed while the fetch was still pending.
    assert asker.is_alive(), "the fetch finished before the write completed: raise the delay"
    asker.join()
else:
    sys.exit(f"unknown mode {mode}")
check_after(b, during)
