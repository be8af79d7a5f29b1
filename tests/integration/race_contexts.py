"""A write racing a block-status fetch must never leave a dirty bitmap's
"clean" or an old allocation depth in bscache (race.py's interleavings, for
the qemu: meta contexts, which have no conservative value).

usage: race_contexts.py MODE PROXY_URI DIRECT_URI OFFSET LENGTH SECONDS CONTEXT...
  slow-write  client A's write is held upstream (delay_relay.py
              --delay-write); client B asks about every CONTEXT while it is
              held, so bscache's fetch sees upstream before the write.
  slow-fetch  client B's query goes upstream and its reply is held
              (delay_relay.py --hold-block-status); after SECONDS client A
              writes, and the write completes while the reply, computed
              before the write, is still held.
After the write completed, bscache's answers for the range (REQ_ONE and
not) must equal upstream's, asked directly, byte for byte.
"""
import sys
import threading
import time

import nbd

mode, proxy_uri, direct_uri = sys.argv[1:4]
offset, length, seconds = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
contexts = sys.argv[7:]


def connect(uri):
    h = nbd.NBD()
    for context in contexts:
        h.add_meta_context(context)
    h.connect_uri(uri)
    for context in contexts:
        assert h.can_meta_context(context), f"{uri} did not negotiate {context}"
    return h


def status(h, req_one):
    """{context: [(start, end, value)]} over the range, as far as answered."""
    seen = {c: [] for c in contexts}

    def cb(context, start, entries, err):
        if context in seen:
            for extent_length, value in zip(entries[0::2], entries[1::2]):
                seen[context].append((start, start + extent_length, value))
                start += extent_length
        return 0

    h.block_status(length, offset, cb, nbd.CMD_FLAG_REQ_ONE if req_one else 0)
    return seen


def value_at(extents, pos):
    for start, end, value in extents:
        if start <= pos < end:
            return value
    return None


def check_after(b, direct, during):
    truth = status(direct, False)
    for req_one in (True, False):
        answer = status(b, req_one)
        for context in contexts:
            for start, end, value in answer[context]:
                for pos in range(start, min(end, offset + length), 4096):
                    if value != value_at(truth[context], pos):
                        sys.exit(f"STALE: after the write completed bscache says {context} = {value} at {pos} "
                                 f"(REQ_ONE {req_one}), upstream says {value_at(truth[context], pos)} "
                                 f"(answers during the race: {during})")
    print(f"ok: {mode}: during the race {during}; after it {status(b, True)}, as upstream says")


a, b, direct = connect(proxy_uri), connect(proxy_uri), connect(direct_uri)
during = []
data = b"\xab" * length
if mode == "slow-write":
    writer = threading.Thread(target=lambda: a.pwrite(data, offset))
    writer.start()
    time.sleep(seconds / 4)  # the write is now held on its way upstream
    assert writer.is_alive(), "the write finished too early: raise the delay"
    during += [status(b, True), status(b, False)]  # may describe either side of the write
    assert writer.is_alive(), "the write finished before the queries did: raise the delay"
    writer.join()
elif mode == "slow-fetch":
    asker = threading.Thread(target=lambda: during.append(status(b, True)))
    asker.start()  # the fetch goes upstream; its reply is held
    time.sleep(seconds)
    assert asker.is_alive(), "the fetch finished before the write began: raise the hold"
    a.pwrite(data, offset)
    # Without this the test would pass without racing: the write must have
    # completed while the fetch's reply was still held.
    assert asker.is_alive(), "the fetch finished before the write completed: raise the hold"
    asker.join()
else:
    sys.exit(f"unknown mode {mode}")
check_after(b, direct, during)
