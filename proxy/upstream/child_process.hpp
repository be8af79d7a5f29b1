// UpstreamChild: the --upstream-command server, started once, with systemd
// socket activation on a private Unix socket.
//
// Why not libnbd's nbd_connect_systemd_socket_activation: it starts a fresh
// server for every handle, and bscache opens several upstream connections (and
// reconnects). Each would be a server of its own: with `nbdkit memory` four
// different disks behind one export, and a write on one connection invisible
// to a read on the next (reproduced: nbdcopy in and out through bscache
// differed at byte 1310721). Here one server listens, and every connection,
// first or reconnected, reaches that one.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <string>
#include <vector>

namespace bscache::proxy {

class UpstreamChild {
 public:
  // Starts `command` (argv[0] looked up in PATH) with LISTEN_FDS=1 and the
  // listening socket as descriptor 3, stdin on /dev/null, stdout on our
  // stderr, and SIGTERM as its parent-death signal (so it does not outlive a
  // killed bscache). Throws std::runtime_error if it cannot.
  explicit UpstreamChild(const std::vector<std::string>& command);
  // SIGTERM, up to 5 s to exit, then SIGKILL; removes the socket's directory.
  ~UpstreamChild();
  UpstreamChild(const UpstreamChild&) = delete;
  UpstreamChild& operator=(const UpstreamChild&) = delete;

  const std::string& socket_path() const { return socket_path_; }
  // A libnbd URI for the socket (nbds+unix:// when `tls`).
  std::string uri(bool tls) const;

 private:
  std::filesystem::path dir_;
  std::string socket_path_;
  pid_t pid_ = -1;
};

}  // namespace bscache::proxy
