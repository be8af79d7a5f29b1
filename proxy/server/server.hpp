// Server: the listening sockets (Unix, TCP, or inherited from systemd), or
// the one client of -s, and the set of live sessions.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <boost/asio/basic_socket_acceptor.hpp>
#include <boost/asio/generic/stream_protocol.hpp>

#include "proxy/io/asio.hpp"
#include "proxy/server/config.hpp"
#include "proxy/server/session.hpp"

namespace bscache::proxy {

// LISTEN_PID is this process and LISTEN_FDS is set: started by socket
// activation (systemd, or libnbd's nbd_connect_systemd_socket_activation).
bool socket_activated();

class Server {
 public:
  // Binds every listener now, so errors surface before we report readiness.
  Server(ProxyContext& context, const ListenConfig& config);
  ~Server();

  void start();
  // Stops accepting and asks every session to finish what it has in flight.
  void stop();
  size_t session_count() const { return sessions_.size(); }
  // -s: called once the one client's session has ended.
  void on_single_client_done(std::function<void()> done) { single_done_ = std::move(done); }

  // The NBD URI clients should use (the first listener), and its parts; empty with -s.
  std::string uri() const;
  // For logs: the URI, or where the one client of -s comes from.
  std::string describe() const;
  const std::string& unix_path() const { return config_.unix_path; }
  std::optional<uint16_t> tcp_port() const { return bound_port_; }

 private:
  using Acceptor = asio::basic_socket_acceptor<asio::generic::stream_protocol>;
  awaitable<void> accept_loop(Acceptor& acceptor);
  awaitable<void> run_session(std::shared_ptr<Session> session);
  void start_session(Session::Socket socket);

  ProxyContext& ctx_;
  ListenConfig config_;
  std::vector<std::unique_ptr<Acceptor>> acceptors_;
  std::optional<Session::Socket> stdin_client_;  // -s without socket activation
  std::function<void()> single_done_;
  std::optional<uint16_t> bound_port_;
  bool unix_socket_created_ = false;
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, std::weak_ptr<Session>> sessions_;
};

}  // namespace bscache::proxy
