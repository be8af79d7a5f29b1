// Handshake: the option-haggling phase as a pure state machine.
//
// The handshake driver (proxy/server/handshake_driver.*) does the I/O: it
// reads an option header and payload and writes the bytes this produces.
// Everything the protocol decides lives here, so unit tests and the fuzzer
// drive it option by option without a socket.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "proxy/negotiation/export_info.hpp"
#include "proxy/wire/codec.hpp"

namespace bscache::proxy {

// Largest option payload we read; bigger ones are refused with ERR_TOO_BIG.
inline constexpr uint32_t kMaxOptionLength = 64 * 1024;

struct Negotiated {
  // Replies are chunks (structured or extended): set by STRUCTURED_REPLY, and
  // by EXTENDED_HEADERS, which implies them.
  bool structured_replies = false;
  // NBD_OPT_EXTENDED_HEADERS: 32-byte requests with 64-bit lengths, 32-byte
  // replies. Per client, whatever upstream speaks: the session splits what
  // upstream cannot take in one command.
  bool extended_headers = false;
  bool no_zeroes = false;
  // The client asked for NBD_INFO_BLOCK_SIZE in the GO that chose the export,
  // and so agreed to upstream's minimum block size. A client that did not may
  // send requests of any alignment: bscache aligns them (see Session).
  bool block_size_agreed = false;
  std::vector<uint32_t> contexts;  // selected, as indexes into ExportInfo::contexts
  std::string contexts_export;     // the export SET_META_CONTEXT chose them for
};

// The export a client named, as the caller found it before handle() (the
// lookup may mean opening an upstream connection: I/O, so not in here).
struct ExportChoice {
  const ExportInfo* info = nullptr;  // null: refused with `error` and `message`
  uint32_t error = wire::kRepErrUnknown;
  std::string message;
};

// What handle() needs found first to answer an option.
struct OptionNeed {
  enum class Kind { Nothing, Export, List };
  Kind kind = Kind::Nothing;
  std::string name;  // Kind::Export: the export the option names
};

// What the caller found for an option's need.
struct OptionContext {
  const ExportChoice* choice = nullptr;      // Kind::Export
  const UpstreamListing* listing = nullptr;  // Kind::List: the exports, or upstream's error
};

// What requests in the transmission phase are validated against: the export
// as advertised and what this client negotiated. Derived here only, so the
// session and the fuzz target cannot drift apart.
wire::TransmissionLimits transmission_limits(const ExportInfo& info, const Negotiated& negotiated);

// Most contexts a client may select and still filter block status by them
// (the session keeps its filter as a 64-bit mask).
inline constexpr size_t kMaxFilterableContexts = 64;

// The transmission flags this client is offered: the export's, plus
// NBD_FLAG_BLOCK_STATUS_PAYLOAD for a client with extended headers and
// selected contexts to filter (the spec allows it only then).
uint16_t client_tx_flags(const ExportInfo& info, const Negotiated& negotiated);

// --tls: whether STARTTLS is offered, and whether anything else is served
// before it.
enum class TlsMode {
  Off,      // STARTTLS refused (ERR_POLICY)
  On,       // STARTTLS offered; plain clients are served too
  Require,  // before STARTTLS only STARTTLS and ABORT are honoured
};

enum class OptionOutcome {
  Continue,      // read the next option
  Transmission,  // the export was chosen: switch to the transmission phase
  Close,         // end the connection once the reply is sent
  StartTls,      // send the reply, then the TLS handshake; then tls_started()
};

class Handshake {
 public:
  // Exports are looked up per option: see needs().
  explicit Handshake(bool client_no_zeroes, TlsMode tls = TlsMode::Off);
  // One fixed export whatever name a client gives (and LIST shows only it):
  // every need is already met.
  Handshake(const ExportInfo& fixed, bool client_no_zeroes, TlsMode tls = TlsMode::Off);

  // What must be found before handle() can answer this option: the export it
  // names (INFO, GO, EXPORT_NAME, the meta-context options) or the export
  // list (LIST). Nothing when the option is refused whatever is found.
  OptionNeed needs(uint32_t option, wire::ByteSpan payload) const;
  // Handles one option whose payload was read in full; appends the reply.
  // `context` carries what needs() asked for (unused with a fixed export).
  OptionOutcome handle(uint32_t option, wire::ByteSpan payload, wire::Bytes& reply, OptionContext context = {});
  // An option whose payload was too long to read: refuse it.
  OptionOutcome refuse_oversized(uint32_t option, wire::Bytes& reply);

  // The TLS handshake that followed StartTls succeeded. Everything negotiated
  // in plain text is forgotten: a man in the middle could have chosen it
  // (nbdkit's CVE-2021-3716 was keeping it).
  void tls_started();
  bool tls_active() const { return tls_active_; }

  const Negotiated& negotiated() const { return negotiated_; }

 private:
  OptionOutcome handle_start_tls(wire::ByteSpan payload, wire::Bytes& reply);
  OptionOutcome handle_structured_reply(wire::ByteSpan payload, wire::Bytes& reply);
  OptionOutcome handle_extended_headers(wire::ByteSpan payload, wire::Bytes& reply);
  OptionOutcome handle_list(wire::ByteSpan payload, wire::Bytes& reply, const OptionContext& context);
  OptionOutcome handle_info_or_go(uint32_t option, wire::ByteSpan payload, wire::Bytes& reply, const ExportInfo& info);
  OptionOutcome handle_meta_context(uint32_t option, wire::ByteSpan payload, wire::Bytes& reply,
                                    const ExportInfo& info);
  bool refused_before_tls(uint32_t option) const;
  // The export `context` found, or the fixed one; null: refused (the reply says why).
  const ExportInfo* chosen(uint32_t option, const OptionContext& context, wire::Bytes& reply) const;

  const ExportInfo* fixed_ = nullptr;
  Negotiated negotiated_;
  TlsMode tls_;
  bool tls_active_ = false;
};

}  // namespace bscache::proxy
