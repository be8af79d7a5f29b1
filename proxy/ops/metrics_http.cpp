#include "proxy/ops/metrics_http.hpp"

#include <spdlog/spdlog.h>

#include <stdexcept>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace bscache::proxy {

namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

struct MetricsHttp::State {
  State(asio::io_context& io, const tcp::endpoint& endpoint, Render r)
      : io(io), acceptor(io, endpoint), render(std::move(r)) {}
  asio::io_context& io;
  tcp::acceptor acceptor;
  Render render;
};

namespace {
tcp::endpoint parse_endpoint(const std::string& address) {
  const auto colon = address.rfind(':');
  if (colon == std::string::npos) throw std::runtime_error("--metrics wants ADDR:PORT, got '" + address + "'");
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host.empty()) host = "127.0.0.1";
  const int port = std::stoi(address.substr(colon + 1));
  if (port < 0 || port > 65535) throw std::runtime_error("--metrics port out of range");
  return {asio::ip::make_address(host), static_cast<uint16_t>(port)};
}

// One connection: answer requests until the client closes (keep-alive).
awaitable<void> serve_http(tcp::socket socket, const MetricsHttp::Render& render) {
  beast::flat_buffer buffer;
  for (;;) {
    http::request<http::string_body> request;
    boost::system::error_code ec;
    co_await http::async_read(socket, buffer, request, asio::redirect_error(use_awaitable, ec));
    if (ec) break;
    http::response<http::string_body> response;
    response.version(request.version());
    response.keep_alive(request.keep_alive());
    if (request.target() == "/metrics" &&
        (request.method() == http::verb::get || request.method() == http::verb::head)) {
      response.result(http::status::ok);
      response.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
      response.body() = render();
    } else {
      response.result(http::status::not_found);
      response.set(http::field::content_type, "text/plain");
      response.body() = "only /metrics lives here\n";
    }
    response.prepare_payload();
    co_await http::async_write(socket, response, asio::redirect_error(use_awaitable, ec));
    if (ec || !response.keep_alive()) break;
  }
  boost::system::error_code ignored;
  socket.shutdown(tcp::socket::shutdown_both, ignored);
}

awaitable<void> accept_http(tcp::acceptor& acceptor, const MetricsHttp::Render& render) {
  for (;;) {
    boost::system::error_code ec;
    tcp::socket socket = co_await acceptor.async_accept(asio::redirect_error(use_awaitable, ec));
    if (ec == asio::error::operation_aborted || !acceptor.is_open()) co_return;
    if (ec) continue;
    asio::co_spawn(acceptor.get_executor(), serve_http(std::move(socket), render), asio::detached);
  }
}
}  // namespace

MetricsHttp::MetricsHttp(asio::io_context& io, const std::string& address, Render render)
    : state_(std::make_unique<State>(io, parse_endpoint(address), std::move(render))) {}

MetricsHttp::~MetricsHttp() = default;

void MetricsHttp::start() {
  asio::co_spawn(state_->io, accept_http(state_->acceptor, state_->render), asio::detached);
}

void MetricsHttp::stop() {
  boost::system::error_code ignored;
  state_->acceptor.close(ignored);
}

std::string MetricsHttp::endpoint() const {
  auto e = state_->acceptor.local_endpoint();
  return e.address().to_string() + ":" + std::to_string(e.port());
}

}  // namespace bscache::proxy
