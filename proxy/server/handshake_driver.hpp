// The handshake's I/O: greeting, client flags, then one option at a time
// through the Handshake state machine (proxy/negotiation/handshake.hpp),
// which decides everything; this file only reads, writes and keeps time.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>

#include <boost/asio/generic/stream_protocol.hpp>

#include "proxy/exports/export_registry.hpp"
#include "proxy/io/asio.hpp"
#include "proxy/negotiation/handshake.hpp"
#include "proxy/server/client_stream.hpp"

namespace bscache::proxy {

// Closes a socket if it is still open when the time is up, unless disarmed
// first (or destroyed, which disarms). For phases a peer could stall forever.
class Deadline {
 public:
  using Socket = asio::generic::stream_protocol::socket;
  Deadline(Socket& socket, std::chrono::milliseconds limit, uint64_t connection_id, const char* phase);
  ~Deadline();
  Deadline(const Deadline&) = delete;
  Deadline& operator=(const Deadline&) = delete;

 private:
  struct State;
  std::shared_ptr<State> state_;  // shared with the timer's handler, which may run after we are gone
};

class TlsServerCredentials;

// What a finished handshake chose: the options, and the export (held).
struct NegotiatedExport {
  Negotiated negotiated;
  std::unique_ptr<Export::Hold> chosen;
};

// Runs the handshake on `stream`, the TLS handshake included if the client
// sends STARTTLS (`tls` null: --tls off), looking exports up in `exports` as
// the client names them. Returns what was negotiated, or nullopt if the
// connection is to be closed (the peer left, misbehaved or took too long: the
// deadline covers the whole handshake, TLS and export lookups included).
awaitable<std::optional<NegotiatedExport>> negotiate(ClientStream& stream, ExportRegistry& exports,
                                                     uint64_t connection_id, std::chrono::milliseconds timeout,
                                                     const TlsServerCredentials* tls);

}  // namespace bscache::proxy
