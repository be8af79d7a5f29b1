// Reconnector: what both kinds of upstream connection do about a connection
// that died or got stuck: when to try again (a backoff from 100 ms, doubling
// to 5 s), the attempt itself, how --upstream-timeout finds a stuck
// connection, and the log lines of all that. It waits for nothing itself:
// LibnbdConnection waits in its thread's poll(2), WireConnection on a loop
// timer, with the blocking attempt on a helper thread.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "proxy/negotiation/upstream_info.hpp"
#include "proxy/upstream/connect.hpp"
#include "proxy/upstream/connection.hpp"

namespace bscache::proxy {

class Reconnector {
 public:
  using Clock = std::chrono::steady_clock;

  // For upstream connection number `index` (in log lines).
  Reconnector(size_t index, const UpstreamTarget& target, UpstreamOptions options);

  // ---- A connection was lost
  // Logs that it was, failing `failed_commands` in flight.
  void log_lost(std::string_view why, size_t failed_commands) const;
  // Whether to try again at all (--upstream-reconnect).
  bool reconnects() const { return options_.reconnect; }
  // How long to wait before the next attempt.
  std::chrono::milliseconds backoff() const { return backoff_; }

  // ---- An attempt
  // Connects and negotiates like at start-up, for a LibnbdConnection
  // (open_libnbd_upstream) or a WireConnection (open_wire_upstream: extended
  // headers again where upstream serves them). Blocking (DNS, TCP, the
  // handshake), so callable from any thread; throws with the reason.
  enum class For : uint8_t { Libnbd, Wire };
  OpenedUpstream open(For engine) const;
  // On the connection's own thread: the attempt failed (logged; the backoff
  // doubles) or succeeded (logged; the backoff starts over).
  void failed(std::string_view why);
  void succeeded();

  // ---- --upstream-timeout
  bool times_out() const { return options_.timeout.count() > 0; }
  // How often to look for a command waiting too long.
  std::chrono::milliseconds timeout_check_period() const;
  bool overdue(Clock::time_point sent, Clock::time_point now) const { return now - sent > options_.timeout; }
  // What log_lost is told when a command was overdue.
  static constexpr char kOverdue[] = "a command got no answer within --upstream-timeout";

 private:
  static constexpr std::chrono::milliseconds kFirstBackoff{100};
  static constexpr std::chrono::milliseconds kLongestBackoff{5000};

  const size_t index_;
  const UpstreamTarget target_;
  const UpstreamOptions options_;
  std::chrono::milliseconds backoff_ = kFirstBackoff;
  uint64_t failures_ = 0;  // attempts failed since the connection was lost
};

}  // namespace bscache::proxy
