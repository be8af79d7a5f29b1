// OptionExchange: option haggling spoken by bscache itself on the socket of a
// libnbd handle in option mode, where libnbd's own calls fall short: LIST
// (libnbd 1.14 drops upstream's error code and message), and
// NBD_OPT_EXTENDED_HEADERS with the NBD_OPT_GO after it (libnbd 1.14 knows
// neither extended headers nor how to enter transmission after them).
// Blocking, every wait bounded by 30 s: for opener threads only. Plain
// sockets only: over TLS the bytes are libnbd's.
#pragma once

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>

#include "proxy/negotiation/upstream_info.hpp"
#include "proxy/wire/codec.hpp"

namespace bscache::proxy {

class OptionExchange {
 public:
  // `what` names the exchange in error messages ("listing upstream's exports").
  OptionExchange(int fd, std::string what) : fd_(fd), what_(std::move(what)) {}

  void send(uint32_t option, wire::ByteSpan payload = {});
  struct Reply {
    wire::OptionReplyHeader header;
    wire::Bytes payload;
  };
  // The next reply, which must answer `option` and carry at most `max_length`
  // bytes. Throws std::runtime_error otherwise, or when the socket fails.
  Reply receive(uint32_t option, uint32_t max_length);

 private:
  void send_all(wire::ByteSpan bytes);
  void recv_exact(std::span<uint8_t> into);
  void wait_for(short events);
  std::runtime_error failure(const std::string& why) const;

  int fd_;
  std::string what_;
};

// NBD_OPT_EXTENDED_HEADERS: true once upstream acknowledged it. False when it
// refused (NBD_REP_ERR_UNSUP from nbdkit 1.32, or any other error): nothing
// changed, and the handshake goes on as it would have without asking.
bool negotiate_extended_headers(OptionExchange& exchange);

// NBD_OPT_GO for `export_name`, asking for NBD_INFO_BLOCK_SIZE (bscache obeys
// upstream's block sizes), NAME and DESCRIPTION; on return the connection is
// in transmission. What upstream described, as UpstreamInfo (no meta
// contexts: this GO selects none). Throws with upstream's error and message
// when it refuses.
UpstreamInfo go_on_socket(OptionExchange& exchange, const std::string& export_name);

}  // namespace bscache::proxy
