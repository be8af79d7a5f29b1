// ServiceNotifier: tells systemd how bscache is doing (sd_notify(3)'s
// protocol, written by hand): READY=1 once listening, STATUS= lines,
// STOPPING=1 on shutdown, and WATCHDOG=1 pings when the unit has WatchdogSec=.
//
// Why not libsystemd: the protocol is one datagram per message to the Unix
// socket named in $NOTIFY_SOCKET, and libsystemd's sd_notify sends it on a
// new blocking socket each time (five system calls), which the loop thread
// must not wait on (README, "Why not libsystemd").
//
// Never blocks the loop: the socket is non-blocking, and a message that
// cannot be sent at once is dropped (the first failure logged at warn, later
// ones at debug; systemd's own client does not retry either). Without $NOTIFY_SOCKET every call does nothing.
#pragma once

#include <chrono>
#include <optional>
#include <string>

#include "proxy/io/asio.hpp"

namespace bscache::proxy {

class ServiceNotifier {
 public:
  // Reads $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID, then removes them
  // from the environment so child processes (--upstream-command, --run) do
  // not talk to systemd in our name. Construct it before starting any child.
  explicit ServiceNotifier(asio::io_context& io);
  ~ServiceNotifier();
  ServiceNotifier(const ServiceNotifier&) = delete;
  ServiceNotifier& operator=(const ServiceNotifier&) = delete;

  bool enabled() const { return fd_ != -1; }
  // READY=1 (with a STATUS= line), and starts the watchdog pings if asked for.
  void ready(const std::string& status);
  void status(const std::string& status);
  // STOPPING=1; the watchdog stops too (systemd stops expecting pings).
  void stopping(const std::string& status);

 private:
  void send(const std::string& message);
  void ping();

  int fd_ = -1;
  std::string address_;  // sockaddr_un bytes, sized to the name (abstract names have no NUL)
  std::optional<std::chrono::microseconds> watchdog_period_;
  asio::steady_timer watchdog_;
  bool send_failed_ = false;  // warn once, not on every ping
};

}  // namespace bscache::proxy
