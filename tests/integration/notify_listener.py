"""Plays systemd's side of sd_notify: binds a datagram socket (a path, or
@name for the abstract namespace) and appends every message it receives to
OUTFILE, one line per field ("READY=1", "STATUS=..."). Writes "LISTENING"
first, once bound. Exits after LIMIT seconds (default 120) at the latest.

Usage: notify_listener.py SOCKET OUTFILE [LIMIT]
"""
import socket
import sys
import time

name, out = sys.argv[1], sys.argv[2]
limit = float(sys.argv[3]) if len(sys.argv) > 3 else 120.0
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("\0" + name[1:] if name.startswith("@") else name)
deadline = time.monotonic() + limit
with open(out, "a", buffering=1) as log:
    log.write("LISTENING\n")
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except socket.timeout:
            break
        for field in message.split("\n"):
            log.write(field + "\n")
