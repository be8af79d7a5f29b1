# nbdkit Python plugin: an in-memory multi-conn disk whose FLUSH fails (EIO)
# on chosen connections, and which logs what each connection did.
#
#   nbdkit python flaky_flush_plugin.py size=BYTES log=FILE control=FILE [flush_delay=SECONDS]
#
# Connections are numbered 1, 2, ... in the order they open. Before every
# flush the plugin reads the control file: a flush fails if the file holds
# the connection's number or the word "all". The log gets one line per
# finished request: "<connection> <op> <offset> <length> <ok|fail>", written
# before nbdkit sends the reply. A flush on connection N takes N * flush_delay
# seconds, so flushes fanned out at once finish one after another.
import builtins
import errno
import threading
import time

import nbdkit

API_VERSION = 2
size = 64 << 20
log_path = None
control_path = None
flush_delay = 0.0
data = {}  # 4 KiB block index -> bytearray
lock = threading.Lock()
connections = 0
BLOCK = 4096


def config(key, value):
    global size, log_path, control_path, flush_delay
    if key == "size":
        size = int(value)
    elif key == "log":
        log_path = value
    elif key == "control":
        control_path = value
    elif key == "flush_delay":
        flush_delay = float(value)
    else:
        raise RuntimeError(f"unknown parameter {key}")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def log(conn, op, offset, length, ok):
    with lock:
        with builtins.open(log_path, "a") as f:
            f.write(f"{conn} {op} {offset} {length} {'ok' if ok else 'fail'}\n")


def open(readonly):  # noqa: A001 - nbdkit's callback name
    global connections
    with lock:
        connections += 1
        return {"id": connections}


def get_size(h):
    return size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    with lock:
        pos = 0
        while pos < len(buf):
            index, within = divmod(offset + pos, BLOCK)
            n = min(BLOCK - within, len(buf) - pos)
            block = data.get(index)
            buf[pos:pos + n] = block[within:within + n] if block else bytes(n)
            pos += n
    log(h["id"], "read", offset, len(buf), True)


def pwrite(h, buf, offset, flags):
    with lock:
        pos = 0
        while pos < len(buf):
            index, within = divmod(offset + pos, BLOCK)
            n = min(BLOCK - within, len(buf) - pos)
            data.setdefault(index, bytearray(BLOCK))[within:within + n] = buf[pos:pos + n]
            pos += n
    log(h["id"], "write", offset, len(buf), True)


def flush(h, flags):
    time.sleep(h["id"] * flush_delay)
    try:
        with builtins.open(control_path) as f:
            fail = f.read().split()
    except FileNotFoundError:
        fail = []
    if "all" in fail or str(h["id"]) in fail:
        log(h["id"], "flush", 0, 0, False)
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"injected flush failure on connection {h['id']}")
    log(h["id"], "flush", 0, 0, True)
