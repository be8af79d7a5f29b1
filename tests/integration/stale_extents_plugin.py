# nbdkit Python plugin: an upstream whose block-status replies describe the
# disk as it was when the request *arrived*, delivered `delay` seconds later.
# A write that arrives meanwhile completes first, so the extents reply that
# follows it is stale: exactly the interleaving that makes a naive cache
# (nbdkit's cacheextents) report a freshly written range as a hole.
#
#   nbdkit python stale_extents_plugin.py size=BYTES delay=SECONDS
import threading
import time

import nbdkit

API_VERSION = 2
BLOCK = 65536
size = 64 << 20
delay = 1.0
blocks = {}  # block index -> bytearray; absent blocks are holes
lock = threading.Lock()


def config(key, value):
    global size, delay
    if key == "size":
        size = int(value)
    elif key == "delay":
        delay = float(value)
    else:
        raise RuntimeError(f"unknown parameter {key}")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return size


def can_extents(h):
    return True


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    with lock:
        for i in range(len(buf)):
            block = blocks.get((offset + i) // BLOCK)
            buf[i] = block[(offset + i) % BLOCK] if block else 0


def pwrite(h, buf, offset, flags):
    with lock:
        for i, byte in enumerate(buf):
            block = blocks.setdefault((offset + i) // BLOCK, bytearray(BLOCK))
            block[(offset + i) % BLOCK] = byte


def extents(h, count, offset, flags):
    with lock:  # snapshot now...
        out = []
        first, last = offset // BLOCK, (offset + count - 1) // BLOCK
        for b in range(first, last + 1):
            out.append((b * BLOCK, BLOCK, 0 if b in blocks else nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO))
    time.sleep(delay)  # ...answer later
    return out
