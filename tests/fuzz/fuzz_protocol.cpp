// libFuzzer target: the handshake state machine and the request decoder and
// validator, fed the bytes a hostile client could send; and the reply parser,
// fed the same bytes as a hostile upstream's replies. What is decoded must
// re-encode to the same bytes through the one request encoder (compact
// requests: extended ones bscache only reads) and flag map.
//
// Input layout: 4 bytes of client flags, then options as (option u32,
// length u32, payload) until the handshake ends, then requests: 24 bytes each,
// or 28 once extended headers were negotiated (the fuzzer does not have to
// guess the magic numbers: they are filled in, the parsers are also fed the
// raw bytes to check they reject bad magic safely).
// The top two bits of the client flags (which the real driver refuses before
// any option) choose --tls off/on/require; STARTTLS is taken as a TLS
// handshake that succeeded, so the fuzzer explores both sides of it.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <vector>

#include "proxy/negotiation/handshake.hpp"
#include "proxy/wire/codec.hpp"
#include "proxy/wire/command_flags.hpp"
#include "proxy/wire/reply_parser.hpp"

using namespace bscache;

namespace {
proxy::ExportInfo make_info() {
  proxy::UpstreamInfo up;
  up.size = uint64_t{1} << 32;
  up.can_flush = up.can_trim = up.can_zero = up.can_fua = up.can_cache = up.can_df = true;
  up.contexts = {"base:allocation", "qemu:dirty-bitmap:b", "qemu:allocation-depth"};
  up.min_block = 512;
  up.advertises_block_size = true;
  return proxy::make_export_info(up, false);
}

// The bytes as upstream's replies to three commands in flight: a READ into a
// buffer, a READ into a sink, a WRITE. The parser either fails or accounts
// for every byte, and a READ it completes without error is covered exactly.
void parse_replies(wire::ByteSpan input) {
  constexpr uint64_t kOffset = 8192;
  std::array<uint8_t, 4096> buffer{};
  std::map<uint64_t, wire::ReplyTarget> in_flight;
  in_flight[1] = {.type = wire::kCmdRead, .offset = kOffset, .length = buffer.size(), .buffer = buffer};
  in_flight[2] = {.type = wire::kCmdRead, .offset = kOffset, .length = 65536, .sink = true};
  in_flight[3] = {.type = wire::kCmdWrite, .offset = kOffset, .length = 4096};
  wire::ReplyParser parser([&](uint64_t cookie) -> wire::ReplyTarget* {
    auto it = in_flight.find(cookie);
    return it == in_flight.end() ? nullptr : &it->second;
  });
  std::vector<uint64_t> done;
  while (!input.empty() && !parser.failed()) {
    size_t n = 0;
    if (const uint64_t due = parser.sink_bytes(); due > 0) {
      n = static_cast<size_t>(std::min<uint64_t>(due, input.size()));
    } else {
      const auto want = parser.next();
      if (want.empty()) __builtin_trap();  // not failed, nothing due to a sink: it must want bytes
      n = std::min(want.size(), input.size());
      std::copy_n(input.begin(), n, want.begin());
    }
    input = input.subspan(n);
    if (!parser.received(n, done)) break;
    for (const uint64_t cookie : done) {
      const wire::ReplyTarget& t = in_flight.at(cookie);
      if (t.type == wire::kCmdRead && t.error == 0) {
        uint64_t covered = 0;
        for (const auto& piece : t.pieces) {
          if (piece.offset < t.offset || piece.offset + piece.length > t.offset + t.length) __builtin_trap();
          covered += piece.length;
        }
        if (covered != t.length) __builtin_trap();
      }
      in_flight.erase(cookie);
    }
    done.clear();
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const proxy::ExportInfo info = make_info();
  wire::ByteSpan input(data, size);
  // The raw bytes must never crash any decoder.
  wire::decode_option_header(input.first(std::min<size_t>(size, wire::kOptionHeaderSize)));
  wire::decode_request_header(input.first(std::min<size_t>(size, wire::kRequestHeaderSize)));
  wire::decode_extended_request_header(input.first(std::min<size_t>(size, wire::kExtendedRequestHeaderSize)));
  if (auto filter = wire::decode_block_status_payload(input)) {
    if (8 + 4 * filter->context_ids.size() != size || filter->context_ids.empty()) __builtin_trap();
  }
  wire::decode_info_request(input);
  wire::decode_meta_context_request(input);
  // What upstream sends back when bscache lists its exports itself.
  wire::decode_option_reply_header(input.first(std::min<size_t>(size, wire::kOptionReplyHeaderSize)));
  wire::decode_server_reply(input);
  parse_replies(input);

  wire::ByteReader r(input);
  auto flags = r.u32();
  if (!flags) return 0;
  const auto tls = static_cast<proxy::TlsMode>((*flags >> 30) % 3);
  proxy::Handshake handshake(info, *flags & wire::kClientFlagNoZeroes, tls);
  size_t pos = 4;
  for (;;) {
    if (size - pos < 8) return 0;
    wire::Bytes header;
    wire::put_u64(header, wire::kIHaveOpt);
    header.insert(header.end(), data + pos, data + pos + 8);
    pos += 8;
    auto option = wire::decode_option_header(header);
    if (!option) __builtin_trap();  // we built a valid header
    wire::Bytes reply;
    proxy::OptionOutcome outcome;
    if (option->length > proxy::kMaxOptionLength) {
      outcome = handshake.refuse_oversized(option->option, reply);
    } else {
      const size_t take = std::min<size_t>(option->length, size - pos);
      outcome = handshake.handle(option->option, input.subspan(pos, take), reply);
      pos += take;
    }
    if (outcome == proxy::OptionOutcome::Close) return 0;
    if (outcome == proxy::OptionOutcome::StartTls) {
      if (tls == proxy::TlsMode::Off || handshake.tls_active()) __builtin_trap();
      handshake.tls_started();
      if (handshake.negotiated().structured_replies || !handshake.negotiated().contexts.empty()) __builtin_trap();
    }
    // With --tls require nothing reaches transmission in plain text.
    if (outcome == proxy::OptionOutcome::Transmission && tls == proxy::TlsMode::Require && !handshake.tls_active()) {
      __builtin_trap();
    }
    if (outcome == proxy::OptionOutcome::Transmission) break;
  }
  const wire::TransmissionLimits limits = proxy::transmission_limits(info, handshake.negotiated());
  const bool extended = handshake.negotiated().extended_headers;
  if (extended && !handshake.negotiated().structured_replies) __builtin_trap();  // extended replies are chunks
  const size_t body = extended ? wire::kExtendedRequestHeaderSize - 4 : wire::kRequestHeaderSize - 4;
  while (size - pos >= body) {
    wire::Bytes request;
    wire::put_u32(request, extended ? wire::kExtendedRequestMagic : wire::kRequestMagic);
    request.insert(request.end(), data + pos, data + pos + body);
    pos += body;
    auto header = extended ? wire::decode_extended_request_header(request) : wire::decode_request_header(request);
    if (!header) __builtin_trap();
    // The one request encoder writes compact headers (what bscache sends
    // upstream): a compact request re-encodes to its bytes; an extended one,
    // never sent by bscache, is checked by its decoder alone.
    if (!extended) {
      const wire::RequestBytes again = wire::encode_request(*header);
      if (!std::equal(again.begin(), again.end(), request.begin(), request.end())) __builtin_trap();
    }
    const uint16_t flags = wire::CommandFlags::from_wire(header->flags).to_wire();
    if ((flags & ~header->flags) != 0 || wire::CommandFlags::from_wire(flags).to_wire() != flags) __builtin_trap();
    const uint32_t error = wire::validate_request(*header, limits);
    // A WRITE's data must be bounded by the maximum payload, whatever header carried it.
    if (error == 0 && header->type == wire::kCmdWrite && header->length > limits.max_payload) __builtin_trap();
    // The payload flag is valid on WRITE alone (BLOCK_STATUS's is cleared by the session before validation).
    if (error == 0 && (header->flags & wire::kCmdFlagPayloadLen) && header->type != wire::kCmdWrite) __builtin_trap();
    // What validation lets through must really be inside the export.
    if (error == 0 && header->type != wire::kCmdFlush &&
        (header->offset > info.size || header->length > info.size - header->offset)) {
      __builtin_trap();
    }
  }
  return 0;
}
