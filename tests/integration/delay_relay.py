"""A slow upstream for servers that have no delay filter (qemu-nbd): relays
NBD between a Unix socket it listens on and one it connects to, delaying
what it is told to in the transmission phase.

usage: delay_relay.py LISTEN UPSTREAM [--delay S] [--delay-write S]
                      [--hold-block-status S] [--pidfile PATH]
  --delay S              every request reaches upstream S seconds after it
                         arrived (requests overtake nothing: each waits on its
                         own, as round-trip latency would)
  --delay-write S        WRITE, TRIM and WRITE_ZEROES requests wait S more: a
                         write held upstream (nbdkit's delay-write)
  --hold-block-status S  upstream's BLOCK_STATUS replies reach the client S
                         seconds after upstream sent them: a reply computed
                         before a later write, delivered after that write's
                         reply (nbdkit has no filter for this)
The handshake passes unchanged (NBD_OPT_GO and NBD_OPT_EXTENDED_HEADERS are
followed; STARTTLS and NBD_OPT_EXPORT_NAME are not supported). The pidfile is
written once it listens.
"""
import argparse
import asyncio
import heapq
import itertools
import os
import struct
import sys

REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC = 0x25609513, 0x21E41C71
SIMPLE_REPLY, STRUCTURED_REPLY, EXTENDED_REPLY = 0x67446698, 0x668E33EF, 0x6E8A278C
OPT_EXPORT_NAME, OPT_STARTTLS, OPT_GO, OPT_STRUCTURED, OPT_EXTENDED = 1, 5, 7, 8, 11
REP_ACK = 1
CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 0, 1, 4, 6, 7
FLAG_PAYLOAD_LEN = 1 << 5


class Sender:
    """Writes messages to one stream when they are due, earliest first
    (messages due at the same time keep their order)."""

    def __init__(self, writer):
        self.writer, self.heap, self.seq = writer, [], itertools.count()
        self.wake = asyncio.Event()
        self.task = asyncio.ensure_future(self.run())

    def send(self, data, delay=0.0):
        heapq.heappush(self.heap, (asyncio.get_running_loop().time() + delay, next(self.seq), data))
        self.wake.set()

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            if not self.heap:
                self.wake.clear()
                await self.wake.wait()
                continue
            due = self.heap[0][0]
            if due > loop.time():
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), due - loop.time())
                except asyncio.TimeoutError:
                    pass
                continue
            _, _, data = heapq.heappop(self.heap)
            self.writer.write(data)
            await self.writer.drain()


class Connection:
    def __init__(self, args):
        self.args = args
        self.transmission = False  # after upstream's ACK to NBD_OPT_GO
        self.extended = False
        self.pending_opt = None  # the option upstream is answering
        self.block_status_cookies = set()
        self.read_lengths = {}  # cookie -> length: simple READ replies carry data

    async def client_to_upstream(self, reader, to_upstream):
        flags = await reader.readexactly(4)
        to_upstream.send(flags)
        while not self.transmission:
            header = await reader.readexactly(16)
            magic, opt, length = struct.unpack(">QII", header)
            data = await reader.readexactly(length)
            if opt in (OPT_EXPORT_NAME, OPT_STARTTLS):
                sys.exit(f"delay_relay: option {opt} is not supported")
            self.pending_opt = opt
            to_upstream.send(header + data)
            # The client sends nothing more before upstream answers; GO's ACK
            # starts the transmission phase.
            while self.pending_opt is not None:
                await asyncio.sleep(0.001)
        while True:
            magic = struct.unpack(">I", await reader.readexactly(4))[0]
            if magic == REQUEST_MAGIC:
                rest = await reader.readexactly(24)
                flags, kind, cookie, offset, length = struct.unpack(">HHQQI", rest)
            elif magic == EXTENDED_REQUEST_MAGIC:
                rest = await reader.readexactly(28)
                flags, kind, cookie, offset, length = struct.unpack(">HHQQQ", rest)
            else:
                sys.exit(f"delay_relay: bad request magic {magic:#x}")
            payload = b""
            if kind == CMD_WRITE or (magic == EXTENDED_REQUEST_MAGIC and flags & FLAG_PAYLOAD_LEN):
                payload = await reader.readexactly(length)
            if kind == CMD_BLOCK_STATUS:
                self.block_status_cookies.add(cookie)
            if kind == CMD_READ:
                self.read_lengths[cookie] = length
            delay = self.args.delay
            if kind in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
                delay += self.args.delay_write
            to_upstream.send(struct.pack(">I", magic) + rest + payload, delay)

    async def upstream_to_client(self, reader, to_client):
        to_client.send(await reader.readexactly(18))  # NBDMAGIC, IHAVEOPT, flags
        while not self.transmission:
            header = await reader.readexactly(20)
            magic, opt, kind, length = struct.unpack(">QIII", header)
            data = await reader.readexactly(length)
            if kind == REP_ACK or kind >= 1 << 31:  # ACK or an error: the option's last reply
                if kind == REP_ACK and opt == OPT_EXTENDED:
                    self.extended = True
                if kind == REP_ACK and opt == OPT_GO:
                    self.transmission = True
                self.pending_opt = None
            to_client.send(header + data)
        while True:
            magic = struct.unpack(">I", await reader.readexactly(4))[0]
            if magic == SIMPLE_REPLY:
                rest = await reader.readexactly(12)
                error, cookie = struct.unpack(">IQ", rest)
                length = self.read_lengths.pop(cookie, 0) if error == 0 else 0
                done = True
            elif magic == STRUCTURED_REPLY:
                rest = await reader.readexactly(16)
                flags, _, cookie, length = struct.unpack(">HHQI", rest)
                done = flags & 1
            elif magic == EXTENDED_REPLY:
                rest = await reader.readexactly(28)
                flags, _, cookie, _, length = struct.unpack(">HHQQQ", rest)
                done = flags & 1
            else:
                sys.exit(f"delay_relay: bad reply magic {magic:#x}")
            payload = await reader.readexactly(length)
            hold = self.args.hold_block_status if cookie in self.block_status_cookies else 0.0
            if done:
                self.block_status_cookies.discard(cookie)
                self.read_lengths.pop(cookie, None)
            to_client.send(struct.pack(">I", magic) + rest + payload, hold)


async def serve(args, client_reader, client_writer):
    up_reader, up_writer = await asyncio.open_unix_connection(args.upstream)
    connection = Connection(args)
    to_upstream, to_client = Sender(up_writer), Sender(client_writer)
    tasks = [asyncio.ensure_future(connection.client_to_upstream(client_reader, to_upstream)),
             asyncio.ensure_future(connection.upstream_to_client(up_reader, to_client))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Let what is due drain, then close both sides.
        await asyncio.sleep(max(args.delay + args.delay_write, args.hold_block_status))
        for t in tasks + [to_upstream.task, to_client.task]:
            t.cancel()
        up_writer.close()
        client_writer.close()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("listen")
    parser.add_argument("upstream")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--delay-write", type=float, default=0.0)
    parser.add_argument("--hold-block-status", type=float, default=0.0)
    parser.add_argument("--pidfile")
    args = parser.parse_args()
    server = await asyncio.start_unix_server(lambda r, w: serve(args, r, w), path=args.listen)
    if args.pidfile:
        with open(args.pidfile + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(args.pidfile + ".tmp", args.pidfile)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
