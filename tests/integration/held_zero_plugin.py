# nbdkit Python plugin: an in-memory disk whose WRITE_ZEROES is held upstream
# until the test releases it. When a zero arrives the plugin writes the file
# `started`, then waits until the file `release` exists. A test can so keep a
# request in flight for exactly as long as it needs, with no sleeps or timing.
#
#   nbdkit python held_zero_plugin.py size=BYTES started=PATH release=PATH
import builtins  # the plugin must define its own open()
import os
import threading
import time

import nbdkit

API_VERSION = 2
size = 64 << 20
started = release = None
disk = None
lock = threading.Lock()
HOLD_LIMIT = 120  # seconds: a forgotten release fails the zero instead of hanging


def config(key, value):
    global size, started, release
    if key == "size":
        size = int(value)
    elif key == "started":
        started = value
    elif key == "release":
        release = value
    else:
        raise RuntimeError(f"unknown parameter {key}")


def config_complete():
    global disk
    if not started or not release:
        raise RuntimeError("started=PATH and release=PATH are required")
    disk = bytearray(size)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL  # other requests run while a zero is held


def open(readonly):
    return 1


def get_size(h):
    return size


def can_write(h):
    return True


def can_zero(h):
    return True


def pread(h, buf, offset, flags):
    with lock:
        buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    with lock:
        disk[offset:offset + len(buf)] = buf


def zero(h, count, offset, flags):
    with builtins.open(started, "w") as f:
        f.write(f"{offset}+{count}\n")
    deadline = time.monotonic() + HOLD_LIMIT
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise RuntimeError("zero held too long: the test never released it")
        time.sleep(0.01)
    with lock:
        disk[offset:offset + count] = bytes(count)
