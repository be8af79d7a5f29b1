#include "proxy/socket_io.hpp"

#include <algorithm>
#include <array>

#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>

namespace bscache::proxy {

awaitable<bool> read_exact(ClientSocket& socket, std::span<uint8_t> buffer) {
  boost::system::error_code ec;
  co_await asio::async_read(socket, asio::buffer(buffer.data(), buffer.size()),
                            asio::redirect_error(use_awaitable, ec));
  co_return !ec;
}

awaitable<bool> discard(ClientSocket& socket, uint64_t length) {
  std::array<uint8_t, size_t{64} * 1024> sink;
  while (length > 0) {
    const size_t piece = std::min<uint64_t>(length, sink.size());
    if (!co_await read_exact(socket, std::span(sink.data(), piece))) co_return false;
    length -= piece;
  }
  co_return true;
}

}  // namespace bscache::proxy
