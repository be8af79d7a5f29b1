// Reading a client socket: exactly N bytes, or N bytes thrown away. Expected
// ends (EOF, a closed socket) come back as false, never as exceptions.
#pragma once

#include <cstdint>
#include <span>

#include <boost/asio/generic/stream_protocol.hpp>

#include "proxy/asio.hpp"

namespace bscache::proxy {

using ClientSocket = asio::generic::stream_protocol::socket;

awaitable<bool> read_exact(ClientSocket& socket, std::span<uint8_t> buffer);
awaitable<bool> discard(ClientSocket& socket, uint64_t length);

}  // namespace bscache::proxy
