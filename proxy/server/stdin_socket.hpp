// The connected socket on stdin that -s serves (libnbd's nbd_connect_command
// and inetd pass a client so: one socket as both stdin and stdout).
#pragma once

#include <boost/asio/generic/stream_protocol.hpp>

#include "proxy/io/asio.hpp"

namespace bscache::proxy {

// Takes the client socket from descriptors 0 and 1: it moves to a
// close-on-exec descriptor of its own, then stdin is reopened on /dev/null and
// stdout on stderr, so that nothing else (a child's output, a stray print)
// can write into the protocol stream or hold the client's connection open.
// Throws std::runtime_error saying what stdin is instead (a pipe, a terminal,
// a file, a listening socket) or that stdout is another file.
asio::generic::stream_protocol::socket take_stdin_socket(asio::io_context& io);

}  // namespace bscache::proxy
