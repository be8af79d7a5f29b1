#include "proxy/server/server.hpp"

#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <stdexcept>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>

#include "proxy/io/socket_buffers.hpp"
#include "proxy/server/stdin_socket.hpp"

namespace bscache::proxy {

bool socket_activated() {
  const char* pid = std::getenv("LISTEN_PID");
  return pid && std::getenv("LISTEN_FDS") && std::strtol(pid, nullptr, 10) == getpid();
}

namespace {
// sd_listen_fds(3) without libsystemd: fds 3.. when LISTEN_PID is us.
std::vector<int> systemd_listen_fds() {
  if (!socket_activated()) return {};
  const char* fds = std::getenv("LISTEN_FDS");
  std::vector<int> out;
  for (long i = 0; i < std::strtol(fds, nullptr, 10); ++i) out.push_back(3 + static_cast<int>(i));
  unsetenv("LISTEN_PID");
  unsetenv("LISTEN_FDS");
  unsetenv("LISTEN_FDNAMES");
  return out;
}
}  // namespace

Server::Server(ProxyContext& context, const ListenConfig& config) : ctx_(context), config_(config) {
  // -s takes its client from socket activation when it has one: nbdinfo and
  // nbdcopy start '[ CMD ]' so, with stdin on /dev/null. (nbdkit refuses -s
  // there; serving the first connection keeps -s's meaning, one client.)
  const bool activated = config_.single && socket_activated();
  if (config_.single && !activated) stdin_client_ = take_stdin_socket(ctx_.io);
  if (config_.systemd || activated) {
    std::vector<int> fds = systemd_listen_fds();
    if (config_.single && fds.size() > 1) {
      // One client: from the first socket; the others would only hold connections nobody serves.
      for (size_t i = 1; i < fds.size(); ++i) ::close(fds[i]);
      fds = {fds.front()};
    }
    for (int fd : fds) {
      sockaddr_storage address{};
      socklen_t length = sizeof address;
      if (getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == -1) {
        throw std::runtime_error("LISTEN_FDS: fd " + std::to_string(fd) + " is not a socket");
      }
      auto acceptor = std::make_unique<Acceptor>(ctx_.io);
      acceptor->assign(asio::generic::stream_protocol(address.ss_family, 0), fd);
      acceptors_.push_back(std::move(acceptor));
    }
    if (acceptors_.empty()) {
      throw std::runtime_error(config_.single ? "-s: LISTEN_FDS passed no socket"
                                              : "--systemd given but no sockets were passed (LISTEN_FDS)");
    }
  }
  if (!config_.unix_path.empty()) {
    struct stat st {};
    // A socket left behind by an earlier run would make bind fail; anything else is not ours to remove.
    if (lstat(config_.unix_path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) unlink(config_.unix_path.c_str());
    asio::local::stream_protocol::endpoint endpoint(config_.unix_path);
    auto acceptor = std::make_unique<Acceptor>(ctx_.io, asio::generic::stream_protocol::endpoint(endpoint));
    unix_socket_created_ = true;
    if (chmod(config_.unix_path.c_str(), config_.socket_mode) == -1) {
      throw std::runtime_error("chmod " + config_.unix_path + ": " + strerror(errno));
    }
    acceptors_.push_back(std::move(acceptor));
  }
  if (config_.port) {
    asio::ip::tcp::endpoint endpoint(asio::ip::make_address(config_.bind), *config_.port);
    asio::ip::tcp::acceptor tcp(ctx_.io, endpoint);  // reuse_address set by this constructor
    bound_port_ = tcp.local_endpoint().port();
    auto acceptor = std::make_unique<Acceptor>(ctx_.io);
    acceptor->assign(asio::generic::stream_protocol(endpoint.protocol().family(), IPPROTO_TCP), tcp.release());
    acceptors_.push_back(std::move(acceptor));
  }
  if (acceptors_.empty() && !stdin_client_) {
    throw std::runtime_error("nothing to listen on: give --unix, --port or --systemd");
  }
}

Server::~Server() {
  if (unix_socket_created_) unlink(config_.unix_path.c_str());
}

void Server::start() {
  if (stdin_client_) {
    Session::Socket socket = std::move(*stdin_client_);
    stdin_client_.reset();
    start_session(std::move(socket));
  }
  for (auto& acceptor : acceptors_) asio::co_spawn(ctx_.io, accept_loop(*acceptor), asio::detached);
}

void Server::start_session(Session::Socket socket) {
  enlarge_send_buffer(socket.native_handle());
  auto session = std::make_shared<Session>(ctx_, std::move(socket), next_id_++);
  asio::co_spawn(ctx_.io, run_session(std::move(session)), asio::detached);
}

void Server::stop() {
  boost::system::error_code ignored;
  for (auto& acceptor : acceptors_) acceptor->close(ignored);
  for (auto& [id, weak] : sessions_) {
    if (auto session = weak.lock()) session->stop();
  }
}

std::string Server::uri() const {
  if (!config_.unix_path.empty()) return "nbd+unix:///?socket=" + config_.unix_path;
  if (bound_port_) {
    const bool v6 = config_.bind.find(':') != std::string::npos;
    return "nbd://" + (v6 ? "[" + config_.bind + "]" : config_.bind) + ":" + std::to_string(*bound_port_);
  }
  return {};
}

std::string Server::describe() const {
  if (!config_.single) return uri();
  return acceptors_.empty() ? "stdin (-s: one client)" : "the socket-activation socket (-s: one client)";
}

awaitable<void> Server::accept_loop(Acceptor& acceptor) {
  for (;;) {
    Session::Socket socket(ctx_.io);
    boost::system::error_code ec;
    co_await acceptor.async_accept(socket, asio::redirect_error(use_awaitable, ec));
    if (ec == asio::error::operation_aborted || !acceptor.is_open()) co_return;
    if (ec) {
      // EMFILE and friends: log and keep accepting rather than die.
      spdlog::warn("accept failed: {}", ec.message());
      asio::steady_timer pause(ctx_.io, std::chrono::milliseconds(100));
      co_await pause.async_wait(asio::redirect_error(use_awaitable, ec));
      continue;
    }
    if (sessions_.size() >= config_.max_connections) {
      ++ctx_.metrics.connections_rejected;
      spdlog::warn("refusing connection: {} clients already connected (--max-connections)", sessions_.size());
      continue;  // the socket closes as it goes out of scope
    }
    start_session(std::move(socket));
    if (config_.single) {
      // -s: one client; a second is refused by the closed socket.
      acceptor.close(ec);
      co_return;
    }
  }
}

awaitable<void> Server::run_session(std::shared_ptr<Session> session) {
  const uint64_t id = session->id();
  sessions_[id] = session;
  ++ctx_.metrics.connections_total;
  ++ctx_.metrics.connections_current;
  spdlog::info("connection {} opened ({} open)", id, sessions_.size());
  co_await session->run();
  sessions_.erase(id);
  --ctx_.metrics.connections_current;
  spdlog::info("connection {} closed ({} open)", id, sessions_.size());
  if (config_.single && single_done_) single_done_();
}

}  // namespace bscache::proxy
