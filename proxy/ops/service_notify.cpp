#include "proxy/ops/service_notify.hpp"

#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string_view>

namespace bscache::proxy {

namespace {

std::optional<uint64_t> parse_number(const char* text) {
  if (!text) return std::nullopt;
  std::string_view s(text);
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size()) return std::nullopt;
  return value;
}

// sd_watchdog_enabled(3): the interval, if set, positive, and meant for us
// (WATCHDOG_PID unset means "whoever reads it", as in systemd's client).
std::optional<std::chrono::microseconds> watchdog_interval() {
  auto usec = parse_number(std::getenv("WATCHDOG_USEC"));
  if (!usec || *usec == 0) return std::nullopt;
  if (const char* pid = std::getenv("WATCHDOG_PID")) {
    auto target = parse_number(pid);
    if (!target || *target != static_cast<uint64_t>(getpid())) return std::nullopt;
  }
  return std::chrono::microseconds(*usec);
}

// The sockaddr_un for $NOTIFY_SOCKET: a path, or "@name" for the abstract
// namespace (sun_path starts with NUL and the length counts only the name).
std::optional<std::string> notify_address(std::string_view name) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (name.empty() || (name[0] != '/' && name[0] != '@') || name.size() >= sizeof address.sun_path) {
    return std::nullopt;
  }
  std::memcpy(address.sun_path, name.data(), name.size());
  if (name[0] == '@') address.sun_path[0] = '\0';
  const size_t length = offsetof(sockaddr_un, sun_path) + name.size() + (name[0] == '/' ? 1 : 0);
  return std::string(reinterpret_cast<const char*>(&address), length);
}

}  // namespace

ServiceNotifier::ServiceNotifier(asio::io_context& io) : watchdog_(io) {
  const char* name = std::getenv("NOTIFY_SOCKET");
  if (name) {
    auto address = notify_address(name);
    if (!address) {
      spdlog::warn("NOTIFY_SOCKET={}: not a Unix socket path or @abstract name; not notifying systemd", name);
    } else {
      address_ = std::move(*address);
      fd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
      if (fd_ == -1) spdlog::warn("NOTIFY_SOCKET: socket: {}", strerror(errno));
    }
    watchdog_period_ = watchdog_interval();
  }
  unsetenv("NOTIFY_SOCKET");
  unsetenv("WATCHDOG_USEC");
  unsetenv("WATCHDOG_PID");
}

ServiceNotifier::~ServiceNotifier() {
  if (fd_ != -1) close(fd_);
}

void ServiceNotifier::ready(const std::string& status) {
  send("READY=1\nSTATUS=" + status);
  if (enabled() && watchdog_period_) {
    // Half the interval, as systemd recommends, so one late ping is not fatal.
    spdlog::debug("systemd watchdog: pinging every {} us", watchdog_period_->count() / 2);
    ping();
  }
}

void ServiceNotifier::status(const std::string& status) {
  send("STATUS=" + status);
}

void ServiceNotifier::stopping(const std::string& status) {
  watchdog_period_.reset();
  watchdog_.cancel();
  send("STOPPING=1\nSTATUS=" + status);
}

// Runs on the loop: if the loop stops turning, the pings stop and systemd
// restarts us, which is what the watchdog is for.
void ServiceNotifier::ping() {
  if (!watchdog_period_) return;
  send("WATCHDOG=1");
  watchdog_.expires_after(*watchdog_period_ / 2);
  watchdog_.async_wait([this](boost::system::error_code ec) {
    if (!ec) ping();
  });
}

void ServiceNotifier::send(const std::string& message) {
  if (fd_ == -1) return;
  const ssize_t sent =
      sendto(fd_, message.data(), message.size(), MSG_NOSIGNAL, reinterpret_cast<const sockaddr*>(address_.data()),
             static_cast<socklen_t>(address_.size()));
  if (sent != -1) return;
  const auto level = send_failed_ ? spdlog::level::debug : spdlog::level::warn;
  spdlog::log(level, "NOTIFY_SOCKET: cannot send '{}': {}", message, strerror(errno));
  send_failed_ = true;
}

}  // namespace bscache::proxy
