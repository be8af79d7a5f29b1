"""A write racing a block-status fetch must never leave a stale HOLE/ZERO.

Client A writes data over a hole while upstream delays the write; client B
asks block status for the same range during the write (the proxy fetches
and upstream still sees a hole). Once A's write has completed, B asks again:
the answer must not claim HOLE or ZERO.

usage: race.py URI OFFSET LENGTH WRITE_DELAY_SECONDS
"""
import sys
import threading
import time

import nbd

uri, offset, length, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])


def connect():
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def status(h, req_one):
    seen = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            seen.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, offset, cb, nbd.CMD_FLAG_REQ_ONE if req_one else 0)
    return seen


a, b = connect(), connect()
before = status(b, True)
assert before[0][1] & 3, f"test setup: range should start as a hole, got {before}"

write_done = threading.Event()


def writer():
    a.pwrite(b"\xab" * length, offset)
    write_done.set()


t = threading.Thread(target=writer)
t.start()
time.sleep(delay / 4)  # the write is now in flight upstream
assert not write_done.is_set(), "write finished too early: raise the delay"
during = [status(b, True), status(b, False)]  # may describe either side of the write
t.join()
after_one = status(b, True)
after_all = status(b, False)
for answer in (after_one, after_all):
    covered = 0
    for ext_len, flags in answer:
        if covered >= length:
            break
        if flags & 3:
            print(f"STALE: after the write completed the proxy says flags {flags} "
                  f"for {offset + covered}+{ext_len} (during the write: {during})")
            sys.exit(1)
        covered += ext_len
data = b.pread(length, offset)
assert data == b"\xab" * length, "data read back differs"
print(f"ok: during the write {during}, after it {after_one} / {after_all}")
