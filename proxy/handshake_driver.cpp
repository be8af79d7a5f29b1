#include "proxy/handshake_driver.hpp"

#include "proxy/socket_io.hpp"

#include <spdlog/spdlog.h>

#include <array>

#include <boost/asio/redirect_error.hpp>
#include <boost/asio/write.hpp>

namespace bscache::proxy {

using namespace wire;
using Socket = asio::generic::stream_protocol::socket;

struct Deadline::State {
  State(Socket& s, std::chrono::milliseconds limit) : socket(s), timer(s.get_executor(), limit) {}
  Socket& socket;
  asio::steady_timer timer;
  bool armed = true;
};

Deadline::Deadline(Socket& socket, std::chrono::milliseconds limit, uint64_t connection_id, const char* phase)
    : state_(std::make_shared<State>(socket, limit)) {
  state_->timer.async_wait([state = state_, connection_id, phase](boost::system::error_code ec) {
    if (ec || !state->armed) return;
    spdlog::warn("connection {}: {} timed out", connection_id, phase);
    boost::system::error_code ignored;
    state->socket.close(ignored);
  });
}

Deadline::~Deadline() {
  state_->armed = false;  // enough on its own; cancelling only frees the timer sooner
  try {
    state_->timer.cancel();
  } catch (const boost::system::system_error&) {  // NOLINT(bugprone-empty-catch)
  }
}

namespace {
// Greeting out, client flags in. False: close the connection.
awaitable<bool> exchange_flags(Socket& socket, uint64_t id, bool& no_zeroes) {
  Bytes out;
  encode_server_greeting(out, kFlagFixedNewstyle | kFlagNoZeroes);
  co_await asio::async_write(socket, asio::buffer(out), use_awaitable);
  std::array<uint8_t, 4> flag_bytes{};
  if (!co_await read_exact(socket, flag_bytes)) co_return false;
  const uint32_t client_flags = *ByteReader(flag_bytes).u32();
  if (client_flags & ~(kClientFlagFixedNewstyle | kClientFlagNoZeroes)) {
    spdlog::warn("connection {}: unknown client flags {:#x}, closing", id, client_flags);
    co_return false;
  }
  if (!(client_flags & kClientFlagFixedNewstyle)) {
    spdlog::warn("connection {}: client does not speak fixed newstyle, closing", id);
    co_return false;
  }
  no_zeroes = client_flags & kClientFlagNoZeroes;
  co_return true;
}
}  // namespace

awaitable<std::optional<Negotiated>> negotiate(Socket& socket, const ExportInfo& info, uint64_t id,
                                               std::chrono::milliseconds timeout) {
  // A client that never finishes the handshake must not hold a slot forever.
  Deadline deadline(socket, timeout, id, "handshake");
  bool no_zeroes = false;
  if (!co_await exchange_flags(socket, id, no_zeroes)) co_return std::nullopt;

  Handshake handshake(info, no_zeroes);
  Bytes out;
  for (;;) {
    std::array<uint8_t, kOptionHeaderSize> header_bytes{};
    if (!co_await read_exact(socket, header_bytes)) co_return std::nullopt;
    auto header = decode_option_header(header_bytes);
    if (!header) {
      spdlog::warn("connection {}: bad option magic, closing", id);
      co_return std::nullopt;
    }
    out.clear();
    OptionOutcome outcome;
    if (header->length > kMaxOptionLength) {
      spdlog::warn("connection {}: option {} with {} byte payload refused", id, header->option, header->length);
      if (!co_await discard(socket, header->length)) co_return std::nullopt;
      outcome = handshake.refuse_oversized(header->option, out);
    } else {
      Bytes payload(header->length);
      if (!co_await read_exact(socket, payload)) co_return std::nullopt;
      outcome = handshake.handle(header->option, payload, out);
    }
    co_await asio::async_write(socket, asio::buffer(out), use_awaitable);
    if (outcome == OptionOutcome::Close) co_return std::nullopt;
    if (outcome == OptionOutcome::Transmission) co_return handshake.negotiated();
  }
}

}  // namespace bscache::proxy
