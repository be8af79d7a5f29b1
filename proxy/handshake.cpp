#include "proxy/handshake.hpp"

#include <algorithm>

namespace bscache::proxy {

using namespace wire;

TransmissionLimits transmission_limits(const ExportInfo& info, const Negotiated& negotiated) {
  TransmissionLimits limits;
  limits.export_size = info.size;
  limits.tx_flags = info.tx_flags;
  limits.min_block = info.min_block;
  limits.max_payload = info.max_block;  // already capped to kMaxPayload
  limits.structured_replies = negotiated.structured_replies;
  limits.has_meta_contexts = !negotiated.contexts.empty();
  return limits;
}

Handshake::Handshake(const ExportInfo& info, bool client_no_zeroes, TlsMode tls) : info_(info), tls_(tls) {
  negotiated_.no_zeroes = client_no_zeroes;
}

void Handshake::tls_started() {
  tls_active_ = true;
  const bool no_zeroes = negotiated_.no_zeroes;  // client flags came before any option
  negotiated_ = Negotiated{};
  negotiated_.no_zeroes = no_zeroes;
}

OptionOutcome Handshake::refuse_oversized(uint32_t option, Bytes& reply) {
  if (tls_ == TlsMode::Require && !tls_active_ && option != kOptStartTls && option != kOptAbort) {
    // Before TLS every option but STARTTLS and ABORT is refused alike, whatever its size.
    if (option == kOptExportName) return OptionOutcome::Close;
    encode_option_reply(reply, option, kRepErrTlsReqd, "TLS is required: send NBD_OPT_STARTTLS first");
    return OptionOutcome::Continue;
  }
  encode_option_reply(reply, option, kRepErrTooBig, "option payload too large");
  // EXPORT_NAME has no error reply: the only answer is to close.
  return option == kOptExportName ? OptionOutcome::Close : OptionOutcome::Continue;
}

OptionOutcome Handshake::handle(uint32_t option, ByteSpan payload, Bytes& reply) {
  if (tls_ == TlsMode::Require && !tls_active_ && option != kOptStartTls && option != kOptAbort) {
    // EXPORT_NAME has no error reply: the only answer is to close.
    if (option == kOptExportName) return OptionOutcome::Close;
    encode_option_reply(reply, option, kRepErrTlsReqd, "TLS is required: send NBD_OPT_STARTTLS first");
    return OptionOutcome::Continue;
  }
  switch (option) {
    case kOptExportName:
      // Any name selects the one export bscache proxies, as nbdkit does.
      encode_export_name_reply(reply, info_.size, info_.tx_flags, negotiated_.no_zeroes);
      return OptionOutcome::Transmission;
    case kOptAbort: encode_option_reply(reply, option, kRepAck); return OptionOutcome::Close;
    case kOptList:
      if (!payload.empty()) {
        encode_option_reply(reply, option, kRepErrInvalid, "LIST takes no payload");
        return OptionOutcome::Continue;
      }
      encode_server_reply(reply, option, info_.name);
      encode_option_reply(reply, option, kRepAck);
      return OptionOutcome::Continue;
    case kOptStartTls: return handle_start_tls(payload, reply);
    case kOptInfo:
    case kOptGo: return handle_info_or_go(option, payload, reply);
    case kOptStructuredReply:
      if (!payload.empty()) {
        encode_option_reply(reply, option, kRepErrInvalid, "STRUCTURED_REPLY takes no payload");
      } else {
        negotiated_.structured_replies = true;
        encode_option_reply(reply, option, kRepAck);
      }
      return OptionOutcome::Continue;
    case kOptListMetaContext:
    case kOptSetMetaContext: return handle_meta_context(option, payload, reply);
    case kOptExtendedHeaders:
      encode_option_reply(reply, option, kRepErrUnsup, "extended headers are not supported");
      return OptionOutcome::Continue;
    default: encode_option_reply(reply, option, kRepErrUnsup, "unknown option"); return OptionOutcome::Continue;
  }
}

OptionOutcome Handshake::handle_start_tls(ByteSpan payload, Bytes& reply) {
  if (!payload.empty()) {
    encode_option_reply(reply, kOptStartTls, kRepErrInvalid, "STARTTLS takes no payload");
  } else if (tls_ == TlsMode::Off) {
    encode_option_reply(reply, kOptStartTls, kRepErrPolicy, "TLS is not enabled on this server (--tls)");
  } else if (tls_active_) {
    encode_option_reply(reply, kOptStartTls, kRepErrInvalid, "TLS is already negotiated");
  } else {
    encode_option_reply(reply, kOptStartTls, kRepAck);
    return OptionOutcome::StartTls;
  }
  return OptionOutcome::Continue;
}

OptionOutcome Handshake::handle_info_or_go(uint32_t option, ByteSpan payload, Bytes& reply) {
  auto request = decode_info_request(payload);
  if (!request) {
    encode_option_reply(reply, option, kRepErrInvalid, "malformed INFO/GO request");
    return OptionOutcome::Continue;
  }
  // NBD_INFO_EXPORT is sent whether asked for or not.
  encode_info_export(reply, option, info_.size, info_.tx_flags);
  for (uint16_t type : request->requests) {
    switch (type) {
      case kInfoName: encode_info_name(reply, option, info_.name); break;
      case kInfoDescription:
        if (!info_.description.empty()) encode_info_description(reply, option, info_.description);
        break;
      case kInfoBlockSize:
        if (info_.advertise_block_size) {
          encode_info_block_size(reply, option, info_.min_block, info_.preferred_block, info_.max_block);
        }
        break;
      default: break;  // unknown info requests are ignored, as the spec says
    }
  }
  encode_option_reply(reply, option, kRepAck);
  return option == kOptGo ? OptionOutcome::Transmission : OptionOutcome::Continue;
}

OptionOutcome Handshake::handle_meta_context(uint32_t option, ByteSpan payload, Bytes& reply) {
  const bool set = option == kOptSetMetaContext;
  if (set && !negotiated_.structured_replies) {
    encode_option_reply(reply, option, kRepErrInvalid, "SET_META_CONTEXT needs structured replies first");
    return OptionOutcome::Continue;
  }
  auto request = decode_meta_context_request(payload);
  if (!request) {
    encode_option_reply(reply, option, kRepErrInvalid, "malformed meta context request");
    return OptionOutcome::Continue;
  }
  std::vector<uint32_t> chosen;
  if (!set && request->queries.empty()) {
    for (uint32_t i = 0; i < info_.contexts.size(); ++i) chosen.push_back(i);
  }
  for (const auto& query : request->queries) {
    for (uint32_t i : match_contexts(info_, query, !set)) {
      if (std::find(chosen.begin(), chosen.end(), i) == chosen.end()) chosen.push_back(i);
    }
  }
  for (uint32_t i : chosen) encode_meta_context_reply(reply, option, set ? i + 1 : 0, info_.contexts[i]);
  if (set) negotiated_.contexts = chosen;
  encode_option_reply(reply, option, kRepAck);
  return OptionOutcome::Continue;
}

}  // namespace bscache::proxy
