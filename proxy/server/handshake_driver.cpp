#include "proxy/server/handshake_driver.hpp"

#include <spdlog/spdlog.h>

#include <array>

#include "proxy/server/tls/tls_server.hpp"

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
awaitable<bool> exchange_flags(ClientStream& stream, uint64_t id, bool& no_zeroes) {
  Bytes out;
  encode_server_greeting(out, kFlagFixedNewstyle | kFlagNoZeroes);
  co_await stream.write_all(out);
  std::array<uint8_t, 4> flag_bytes{};
  if (!co_await stream.read_exact(flag_bytes)) co_return false;
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

awaitable<std::optional<NegotiatedExport>> negotiate(ClientStream& stream, ExportRegistry& exports, uint64_t id,
                                                     std::chrono::milliseconds timeout,
                                                     const TlsServerCredentials* tls) {
  // A client that never finishes the handshake must not hold a slot forever.
  Deadline deadline(stream.socket(), timeout, id, "handshake");
  bool no_zeroes = false;
  if (!co_await exchange_flags(stream, id, no_zeroes)) co_return std::nullopt;

  const TlsMode tls_mode = tls ? tls->mode() : TlsMode::Off;
  // One export whatever the name, or looked up per option (passthrough).
  Export* single = exports.single();
  std::optional<Handshake> handshake;
  if (single) {
    handshake.emplace(single->info(), no_zeroes, tls_mode);
  } else {
    handshake.emplace(no_zeroes, tls_mode);
  }
  ExportLookup looked_up;  // the export the last option named, held while the handshake goes on
  ExportChoice choice;
  UpstreamListing listing;
  Bytes out;
  for (;;) {
    std::array<uint8_t, kOptionHeaderSize> header_bytes{};
    if (!co_await stream.read_exact(header_bytes)) co_return std::nullopt;
    auto header = decode_option_header(header_bytes);
    if (!header) {
      spdlog::warn("connection {}: bad option magic, closing", id);
      co_return std::nullopt;
    }
    out.clear();
    OptionOutcome outcome;
    if (header->length > kMaxOptionLength) {
      spdlog::warn("connection {}: option {} with {} byte payload refused", id, header->option, header->length);
      if (!co_await stream.discard(header->length)) co_return std::nullopt;
      outcome = handshake->refuse_oversized(header->option, out);
    } else {
      Bytes payload(header->length);
      if (!co_await stream.read_exact(payload)) co_return std::nullopt;
      OptionContext context;
      const OptionNeed need = handshake->needs(header->option, payload);
      if (need.kind == OptionNeed::Kind::Export) {
        looked_up = co_await exports.find(need.name);
        choice = {looked_up.hold ? &(*looked_up.hold)->info() : nullptr, looked_up.error, looked_up.message};
        context.choice = &choice;
      } else if (need.kind == OptionNeed::Kind::List) {
        listing = co_await exports.list();
        context.listing = &listing;
      }
      outcome = handshake->handle(header->option, payload, out, context);
    }
    co_await stream.write_all(out);
    if (outcome == OptionOutcome::Close) co_return std::nullopt;
    if (outcome == OptionOutcome::StartTls) {
      // Only bytes read from here on count: anything the client sent in plain
      // text after STARTTLS is taken as the start of its TLS handshake, which
      // then fails, never as options.
      if (!co_await stream.start_tls(*tls, id)) co_return std::nullopt;
      handshake->tls_started();
    }
    if (outcome == OptionOutcome::Transmission) {
      // The option that chose the export looked it up (or the one export was).
      if (single) {
        looked_up = co_await exports.find({});
      }
      co_return NegotiatedExport{handshake->negotiated(), std::move(looked_up.hold)};
    }
  }
}

}  // namespace bscache::proxy
