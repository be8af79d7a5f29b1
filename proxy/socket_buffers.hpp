// Socket send buffers for moving bytes: big enough for whole READ replies.
#pragma once

#include <sys/socket.h>

namespace bscache::proxy {

// A Unix socket's default send buffer (net.core.wmem_default, 208 KiB) holds
// less than one 256 KiB READ reply of nbdcopy's (qemu-img's are 2 MiB), so
// replies wait behind a full socket until the client drains it, and the
// client reads them in more, smaller pieces. With 2 MiB (the kernel caps it
// at net.core.wmem_max and doubles it for its bookkeeping) a reply goes in at
// once. Measured in README "Data path". Memory is taken only while a client is
// slow to read what was sent.
inline constexpr int kSendBufferBytes = 2 << 20;

// Best effort: a socket that refuses keeps its default.
inline void enlarge_send_buffer(int fd) {
  const int bytes = kSendBufferBytes;
  (void)::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
}

}  // namespace bscache::proxy
