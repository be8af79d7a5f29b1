// One place that pulls in Boost.Asio for the proxy, with the Debian 12 fix-up:
// Boost 1.74's awaitable.hpp uses std::exchange without including <utility>.
#pragma once

#include <utility>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace bscache {
namespace asio = boost::asio;
using asio::awaitable;
using asio::use_awaitable;
}  // namespace bscache
