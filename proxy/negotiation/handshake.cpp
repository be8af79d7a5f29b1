#include "proxy/negotiation/handshake.hpp"

#include <algorithm>

namespace bscache::proxy {

using namespace wire;

TransmissionLimits transmission_limits(const ExportInfo& info, const Negotiated& negotiated) {
  TransmissionLimits limits;
  limits.export_size = info.size;
  limits.tx_flags = client_tx_flags(info, negotiated);
  // Without the client's agreement to upstream's minimum block size, any
  // alignment is valid (the spec's default minimum of 1).
  limits.min_block = negotiated.block_size_agreed ? info.min_block : 1;
  limits.max_payload = info.max_block;  // already capped to kMaxPayload
  limits.structured_replies = negotiated.structured_replies;
  limits.extended_headers = negotiated.extended_headers;
  limits.has_meta_contexts = !negotiated.contexts.empty();
  return limits;
}

uint16_t client_tx_flags(const ExportInfo& info, const Negotiated& negotiated) {
  const bool filterable = negotiated.extended_headers && !negotiated.contexts.empty() &&
                          negotiated.contexts.size() <= kMaxFilterableContexts;
  return static_cast<uint16_t>(info.tx_flags | (filterable ? kTxBlockStatusPayload : 0));
}

Handshake::Handshake(bool client_no_zeroes, TlsMode tls) : tls_(tls) {
  negotiated_.no_zeroes = client_no_zeroes;
}

Handshake::Handshake(const ExportInfo& fixed, bool client_no_zeroes, TlsMode tls) : Handshake(client_no_zeroes, tls) {
  fixed_ = &fixed;
}

void Handshake::tls_started() {
  tls_active_ = true;
  const bool no_zeroes = negotiated_.no_zeroes;  // client flags came before any option
  negotiated_ = Negotiated{};
  negotiated_.no_zeroes = no_zeroes;
}

// --tls require: before TLS every option but STARTTLS and ABORT is refused alike.
bool Handshake::refused_before_tls(uint32_t option) const {
  return tls_ == TlsMode::Require && !tls_active_ && option != kOptStartTls && option != kOptAbort;
}

OptionNeed Handshake::needs(uint32_t option, ByteSpan payload) const {
  if (fixed_ || refused_before_tls(option)) return {};
  switch (option) {
    case kOptExportName:
      if (negotiated_.extended_headers) return {};  // refused whatever is found (see handle)
      return {OptionNeed::Kind::Export, std::string(payload.begin(), payload.end())};
    case kOptList: return payload.empty() ? OptionNeed{OptionNeed::Kind::List, {}} : OptionNeed{};
    case kOptInfo:
    case kOptGo:
      if (auto request = decode_info_request(payload)) return {OptionNeed::Kind::Export, request->export_name};
      return {};
    case kOptListMetaContext:
    case kOptSetMetaContext:
      if (option == kOptSetMetaContext && !negotiated_.structured_replies) return {};
      if (auto request = decode_meta_context_request(payload)) return {OptionNeed::Kind::Export, request->export_name};
      return {};
    default: return {};
  }
}

const ExportInfo* Handshake::chosen(uint32_t option, const OptionContext& context, Bytes& reply) const {
  if (fixed_) return fixed_;
  if (context.choice && context.choice->info) return context.choice->info;
  // EXPORT_NAME has no error reply: the caller closes instead.
  if (option != kOptExportName) {
    encode_option_reply(reply, option, context.choice ? context.choice->error : kRepErrUnknown,
                        context.choice ? context.choice->message : "unknown export");
  }
  return nullptr;
}

OptionOutcome Handshake::refuse_oversized(uint32_t option, Bytes& reply) {
  if (refused_before_tls(option)) {
    if (option == kOptExportName) return OptionOutcome::Close;
    encode_option_reply(reply, option, kRepErrTlsReqd, "TLS is required: send NBD_OPT_STARTTLS first");
    return OptionOutcome::Continue;
  }
  encode_option_reply(reply, option, kRepErrTooBig, "option payload too large");
  // EXPORT_NAME has no error reply: the only answer is to close.
  return option == kOptExportName ? OptionOutcome::Close : OptionOutcome::Continue;
}

OptionOutcome Handshake::handle(uint32_t option, ByteSpan payload, Bytes& reply, OptionContext context) {
  if (refused_before_tls(option)) {
    // EXPORT_NAME has no error reply: the only answer is to close.
    if (option == kOptExportName) return OptionOutcome::Close;
    encode_option_reply(reply, option, kRepErrTlsReqd, "TLS is required: send NBD_OPT_STARTTLS first");
    return OptionOutcome::Continue;
  }
  switch (option) {
    case kOptExportName: {
      // The spec forbids it after extended headers: EXPORT_NAME's reply could
      // not say which header form transmission uses. No error reply exists.
      if (negotiated_.extended_headers) return OptionOutcome::Close;
      const ExportInfo* info = chosen(option, context, reply);
      if (!info) return OptionOutcome::Close;
      const std::string name(payload.begin(), payload.end());
      if (!fixed_ && !negotiated_.contexts.empty() && name != negotiated_.contexts_export) negotiated_.contexts.clear();
      encode_export_name_reply(reply, info->size, client_tx_flags(*info, negotiated_), negotiated_.no_zeroes);
      return OptionOutcome::Transmission;
    }
    case kOptAbort: encode_option_reply(reply, option, kRepAck); return OptionOutcome::Close;
    case kOptList: return handle_list(payload, reply, context);
    case kOptStartTls: return handle_start_tls(payload, reply);
    case kOptInfo:
    case kOptGo: {
      if (!decode_info_request(payload)) {
        encode_option_reply(reply, option, kRepErrInvalid, "malformed INFO/GO request");
        return OptionOutcome::Continue;
      }
      const ExportInfo* info = chosen(option, context, reply);
      return info ? handle_info_or_go(option, payload, reply, *info) : OptionOutcome::Continue;
    }
    case kOptStructuredReply: return handle_structured_reply(payload, reply);
    case kOptListMetaContext:
    case kOptSetMetaContext: {
      if (option == kOptSetMetaContext && !negotiated_.structured_replies) {
        encode_option_reply(reply, option, kRepErrInvalid, "SET_META_CONTEXT needs structured replies first");
        return OptionOutcome::Continue;
      }
      if (!decode_meta_context_request(payload)) {
        encode_option_reply(reply, option, kRepErrInvalid, "malformed meta context request");
        return OptionOutcome::Continue;
      }
      const ExportInfo* info = chosen(option, context, reply);
      return info ? handle_meta_context(option, payload, reply, *info) : OptionOutcome::Continue;
    }
    case kOptExtendedHeaders: return handle_extended_headers(payload, reply);
    default: encode_option_reply(reply, option, kRepErrUnsup, "unknown option"); return OptionOutcome::Continue;
  }
}

OptionOutcome Handshake::handle_list(ByteSpan payload, Bytes& reply, const OptionContext& context) {
  if (!payload.empty()) {
    encode_option_reply(reply, kOptList, kRepErrInvalid, "LIST takes no payload");
    return OptionOutcome::Continue;
  }
  if (fixed_) {
    encode_server_reply(reply, kOptList, fixed_->name, fixed_->description);
  } else if (context.listing && !context.listing->listed()) {
    // Upstream's refusal, as upstream gave it: an empty list would say it has no exports.
    encode_option_reply(reply, kOptList, context.listing->error, context.listing->message);
    return OptionOutcome::Continue;
  } else if (context.listing) {
    for (const auto& entry : context.listing->exports) {
      encode_server_reply(reply, kOptList, entry.name, entry.description);
    }
  }
  encode_option_reply(reply, kOptList, kRepAck);
  return OptionOutcome::Continue;
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

OptionOutcome Handshake::handle_structured_reply(ByteSpan payload, Bytes& reply) {
  if (!payload.empty()) {
    encode_option_reply(reply, kOptStructuredReply, kRepErrInvalid, "STRUCTURED_REPLY takes no payload");
  } else if (negotiated_.extended_headers) {
    // The spec: extended headers take precedence, and already imply chunks.
    encode_option_reply(reply, kOptStructuredReply, kRepErrExtHeaderReqd, "extended headers are already negotiated");
  } else {
    negotiated_.structured_replies = true;
    encode_option_reply(reply, kOptStructuredReply, kRepAck);
  }
  return OptionOutcome::Continue;
}

// Offered to every client, whatever upstream speaks: the session answers
// with extended replies itself and splits commands longer than upstream
// takes. Meta contexts chosen before stay chosen (they need chunks, which
// extended headers keep).
OptionOutcome Handshake::handle_extended_headers(ByteSpan payload, Bytes& reply) {
  if (!payload.empty()) {
    encode_option_reply(reply, kOptExtendedHeaders, kRepErrInvalid, "EXTENDED_HEADERS takes no payload");
  } else if (negotiated_.extended_headers) {
    encode_option_reply(reply, kOptExtendedHeaders, kRepErrInvalid, "extended headers are already negotiated");
  } else {
    negotiated_.extended_headers = true;
    negotiated_.structured_replies = true;
    encode_option_reply(reply, kOptExtendedHeaders, kRepAck);
  }
  return OptionOutcome::Continue;
}

OptionOutcome Handshake::handle_info_or_go(uint32_t option, ByteSpan payload, Bytes& reply, const ExportInfo& info) {
  const auto request = decode_info_request(payload);  // checked by handle()
  const bool asked_block_size =
      std::find(request->requests.begin(), request->requests.end(), kInfoBlockSize) != request->requests.end();
  // Upstream needs alignment the client has not agreed to (the spec's rules,
  // and qemu-nbd's answers): INFO is refused with BLOCK_SIZE_REQD after the
  // other infos; GO is served at minimum 1, bscache aligning its requests.
  const bool unagreed = info.min_block > 1 && !asked_block_size;
  // NBD_INFO_EXPORT is sent whether asked for or not.
  // Payload filtering is offered only over the contexts this export's GO keeps.
  const bool contexts_kept = fixed_ || request->export_name == negotiated_.contexts_export;
  encode_info_export(reply, option, info.size, contexts_kept ? client_tx_flags(info, negotiated_) : info.tx_flags);
  for (uint16_t type : request->requests) {
    switch (type) {
      case kInfoName: encode_info_name(reply, option, info.name); break;
      case kInfoDescription:
        if (!info.description.empty()) encode_info_description(reply, option, info.description);
        break;
      case kInfoBlockSize:
        if (info.advertise_block_size) {
          encode_info_block_size(reply, option, info.min_block, info.preferred_block, info.max_block);
        }
        break;
      default: break;  // unknown info requests are ignored, as the spec says
    }
  }
  if (unagreed && option == kOptInfo) {
    encode_option_reply(reply, option, kRepErrBlockSizeReqd, "request NBD_INFO_BLOCK_SIZE to use this export");
    return OptionOutcome::Continue;
  }
  if (unagreed) encode_info_block_size(reply, option, 1, info.preferred_block, info.max_block);
  encode_option_reply(reply, option, kRepAck);
  if (option != kOptGo) return OptionOutcome::Continue;
  negotiated_.block_size_agreed = asked_block_size;
  // Contexts chosen for another export do not carry over (the spec; nbdkit
  // does the same). A fixed export is every name's.
  if (!fixed_ && !negotiated_.contexts.empty() && request->export_name != negotiated_.contexts_export) {
    negotiated_.contexts.clear();
  }
  return OptionOutcome::Transmission;
}

OptionOutcome Handshake::handle_meta_context(uint32_t option, ByteSpan payload, Bytes& reply, const ExportInfo& info) {
  const bool set = option == kOptSetMetaContext;
  const auto request = decode_meta_context_request(payload);  // checked by handle()
  std::vector<uint32_t> chosen;
  if (!set && request->queries.empty()) {
    for (uint32_t i = 0; i < info.contexts.size(); ++i) chosen.push_back(i);
  }
  for (const auto& query : request->queries) {
    for (uint32_t i : match_contexts(info, query, !set)) {
      if (std::find(chosen.begin(), chosen.end(), i) == chosen.end()) chosen.push_back(i);
    }
  }
  for (uint32_t i : chosen) encode_meta_context_reply(reply, option, set ? i + 1 : 0, info.contexts[i]);
  if (set) {
    negotiated_.contexts = chosen;
    negotiated_.contexts_export = request->export_name;
  }
  encode_option_reply(reply, option, kRepAck);
  return OptionOutcome::Continue;
}

}  // namespace bscache::proxy
