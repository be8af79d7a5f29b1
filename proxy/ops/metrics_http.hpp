// MetricsHttp: a tiny HTTP/1.1 server (Boost.Beast) that serves Prometheus
// text at GET /metrics on the proxy's io_context.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "proxy/io/asio.hpp"

namespace bscache::proxy {

class MetricsHttp {
 public:
  using Render = std::function<std::string()>;
  // `address` is ADDR:PORT ([v6]:PORT for IPv6); binds now, throws on failure.
  MetricsHttp(asio::io_context& io, const std::string& address, Render render);
  ~MetricsHttp();
  void start();
  void stop();
  std::string endpoint() const;  // e.g. "127.0.0.1:9100" (the bound port)

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace bscache::proxy
