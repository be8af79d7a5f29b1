"""Cache hits pipelined by one client cost the proxy a few system calls per
burst, not a few per request: the requests one read brings are answered
together and their replies leave in one write.

usage: hit_batching.py SOCKET PID BURSTS DEPTH
Warms the cache, then sends BURSTS bursts of DEPTH REQ_ONE block-status
requests (each burst in one send) under `strace -c` attached to PID, reads
every reply, and prints "<sends> <receives> <polls>" made by PID, in total.
"""
import re
import signal
import subprocess
import sys

import nbdwire

CMD_FLAG_REQ_ONE = 8
SENDS = {"sendmsg", "sendto", "write", "writev"}
RECEIVES = {"recvmsg", "recvfrom", "read", "readv"}
POLLS = {"epoll_wait", "epoll_pwait", "poll", "ppoll"}


def main():
    sock, pid, bursts, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    wire = nbdwire.connect_unix(sock).go()
    span = 64 * 1024 * 1024  # well inside the first fetch window
    # The first request misses and fetches a window; the rest hit it.
    wire.request(nbdwire.CMD_BLOCK_STATUS, 0, span, flags=CMD_FLAG_REQ_ONE)
    assert wire.reply_error() == 0
    bursts_bytes = [
        b"".join(nbdwire.request_bytes(nbdwire.CMD_BLOCK_STATUS, ((b * depth + i) * 4096) % span, 4096,
                                       flags=CMD_FLAG_REQ_ONE, cookie=i + 1) for i in range(depth))
        for b in range(bursts)
    ]
    trace = subprocess.Popen(["strace", "-f", "-c", "-o", "/dev/stderr", "-p", str(pid)],
                             stderr=subprocess.PIPE, text=True)
    # strace says it attached on stderr before it reports anything.
    while "attached" not in trace.stderr.readline():
        pass
    for burst in bursts_bytes:
        wire.s.sendall(burst)
        for _ in range(depth):
            error = wire.reply_error()
            assert error == 0, f"block status failed: {error}"
    trace.send_signal(signal.SIGINT)
    summary = trace.communicate(timeout=30)[1]
    calls = {}
    for line in summary.splitlines():
        # % time, seconds, usecs/call, calls, [errors], syscall
        fields = line.split()
        if len(fields) >= 5 and re.fullmatch(r"\d+", fields[3]):
            calls[fields[-1]] = int(fields[3])
    count = lambda names: sum(calls.get(n, 0) for n in names)
    print(count(SENDS), count(RECEIVES), count(POLLS))


if __name__ == "__main__":
    main()
