# nbdkit Python plugin: a read-only multi-conn disk whose reads at chosen
# offsets stall until a release file appears (at most 20 s), for driving one
# upstream connection of bscache into --upstream-timeout while the others work.
#
#   nbdkit python stall_plugin.py size=BYTES log=FILE release=FILE stall=OFFSET slow=FROM-TO
#
# A read at exactly `stall` stalls; a read starting in [FROM, TO) stalls too
# (the "slow" reads that must survive another connection being dropped).
# Connections are numbered 1, 2, ... in the order they open; the log gets
# "<connection> start|done <offset> <length>" for every read.
# Contents: byte at offset o is pattern()[o % PERIOD] (see pattern()).
import builtins
import os
import random
import threading
import time

import nbdkit

API_VERSION = 2
PERIOD = 65521  # prime: shifted reads see different bytes
MAX_READ = 4 << 20
size = 64 << 20
log_path = release_path = None
stall = -1
slow = (0, 0)
lock = threading.Lock()
connections = 0


def pattern():
    return random.Random(20261125).randbytes(PERIOD + MAX_READ)


DATA = pattern()


def config(key, value):
    global size, log_path, release_path, stall, slow
    if key == "size":
        size = int(value)
    elif key == "log":
        log_path = value
    elif key == "release":
        release_path = value
    elif key == "stall":
        stall = int(value)
    elif key == "slow":
        lo, hi = value.split("-")
        slow = (int(lo), int(hi))
    else:
        raise RuntimeError(f"unknown parameter {key}")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def log(*words):
    with lock:
        with builtins.open(log_path, "a") as f:
            f.write(" ".join(str(w) for w in words) + "\n")


def open(readonly):  # noqa: A001 - nbdkit's callback name
    global connections
    with lock:
        connections += 1
        return {"id": connections}


def get_size(h):
    return size


def can_write(h):
    return False


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    log(h["id"], "start", offset, len(buf))
    if offset == stall or slow[0] <= offset < slow[1]:
        deadline = time.monotonic() + 20
        while not os.path.exists(release_path) and time.monotonic() < deadline:
            time.sleep(0.02)
    start = offset % PERIOD
    buf[:] = DATA[start:start + len(buf)]
    log(h["id"], "done", offset, len(buf))
