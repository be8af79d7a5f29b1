// Socket send buffers for moving bytes: big enough for a whole READ reply or WRITE.
#pragma once

#include <sys/socket.h>

namespace bscache::proxy {

// A Unix socket's default send buffer (net.core.wmem_default, 208 KiB) holds
// less than one 256 KiB request or reply of nbdcopy's (qemu-img's are 2 MiB),
// and on a Unix socket the sender's buffer is the only one. So a READ reply to
// a client, or a WRITE to upstream, waits behind a full socket until the
// peer drains it, and moves in more, smaller pieces with a wake-up each. With
// 2 MiB (the kernel caps it at net.core.wmem_max and doubles it for its
// bookkeeping) one goes in at once (measured: see
// bench/results/RESULTS-data-path.md). Memory is taken only while the peer is
// slow to read what was sent.
inline constexpr int kSendBufferBytes = 2 << 20;

// Unix sockets only: TCP grows its send buffer by itself (net.ipv4.tcp_wmem)
// and a fixed SO_SNDBUF would turn that off. Best effort: a socket that
// refuses keeps its default.
inline void enlarge_send_buffer(int fd) {
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0 || address.ss_family != AF_UNIX) return;
  const int bytes = kSendBufferBytes;
  (void)::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
}

}  // namespace bscache::proxy
