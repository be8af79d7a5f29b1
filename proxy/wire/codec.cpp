#include "proxy/wire/codec.hpp"

#include <algorithm>

#include "proxy/wire/byte_order.hpp"

namespace bscache::wire {

// Appends through a fixed array so the byte order lives in byte_order.hpp alone.
template <size_t N, typename T, void (*Store)(uint8_t*, T)>
void put(Bytes& out, T v) {
  uint8_t bytes[N];
  Store(bytes, v);
  out.insert(out.end(), bytes, bytes + N);
}

void put_u16(Bytes& out, uint16_t v) {
  put<2, uint16_t, store_be16>(out, v);
}

void put_u32(Bytes& out, uint32_t v) {
  put<4, uint32_t, store_be32>(out, v);
}

void put_u64(Bytes& out, uint64_t v) {
  put<8, uint64_t, store_be64>(out, v);
}

void put_bytes(Bytes& out, std::string_view s) {
  out.insert(out.end(), s.begin(), s.end());
}

std::optional<uint16_t> ByteReader::u16() {
  if (remaining() < 2) return std::nullopt;
  const uint16_t v = load_be16(data_.data() + pos_);
  pos_ += 2;
  return v;
}

std::optional<uint32_t> ByteReader::u32() {
  if (remaining() < 4) return std::nullopt;
  const uint32_t v = load_be32(data_.data() + pos_);
  pos_ += 4;
  return v;
}

std::optional<uint64_t> ByteReader::u64() {
  if (remaining() < 8) return std::nullopt;
  const uint64_t v = load_be64(data_.data() + pos_);
  pos_ += 8;
  return v;
}

std::optional<std::string> ByteReader::string(size_t length) {
  if (remaining() < length) return std::nullopt;
  std::string s(reinterpret_cast<const char*>(data_.data() + pos_), length);
  pos_ += length;
  return s;
}

// ---- Handshake -------------------------------------------------------------

void encode_server_greeting(Bytes& out, uint16_t handshake_flags) {
  put_u64(out, kNbdMagic);
  put_u64(out, kIHaveOpt);
  put_u16(out, handshake_flags);
}

std::optional<OptionHeader> decode_option_header(ByteSpan bytes) {
  if (bytes.size() != kOptionHeaderSize) return std::nullopt;
  ByteReader r(bytes);
  if (r.u64() != kIHaveOpt) return std::nullopt;
  OptionHeader h;
  h.option = *r.u32();
  h.length = *r.u32();
  return h;
}

std::optional<InfoRequest> decode_info_request(ByteSpan payload) {
  ByteReader r(payload);
  auto name_len = r.u32();
  if (!name_len) return std::nullopt;
  auto name = r.string(*name_len);
  if (!name) return std::nullopt;
  auto count = r.u16();
  if (!count || r.remaining() != size_t{*count} * 2) return std::nullopt;
  InfoRequest req{std::move(*name), {}};
  req.requests.reserve(*count);
  for (uint16_t i = 0; i < *count; ++i) req.requests.push_back(*r.u16());
  return req;
}

std::optional<MetaContextRequest> decode_meta_context_request(ByteSpan payload) {
  ByteReader r(payload);
  auto name_len = r.u32();
  if (!name_len) return std::nullopt;
  auto name = r.string(*name_len);
  if (!name) return std::nullopt;
  auto count = r.u32();
  // Each query needs at least its 4-byte length: bound the count before reserving.
  if (!count || *count > r.remaining() / 4) return std::nullopt;
  MetaContextRequest req{std::move(*name), {}};
  req.queries.reserve(*count);
  for (uint32_t i = 0; i < *count; ++i) {
    auto len = r.u32();
    if (!len) return std::nullopt;
    auto query = r.string(*len);
    if (!query) return std::nullopt;
    req.queries.push_back(std::move(*query));
  }
  if (r.remaining() != 0) return std::nullopt;
  return req;
}

void encode_option_reply(Bytes& out, uint32_t option, uint32_t reply_type, std::string_view payload) {
  put_u64(out, kOptReplyMagic);
  put_u32(out, option);
  put_u32(out, reply_type);
  put_u32(out, static_cast<uint32_t>(payload.size()));
  put_bytes(out, payload);
}

void encode_option_request(Bytes& out, uint32_t option, ByteSpan payload) {
  put_u64(out, kIHaveOpt);
  put_u32(out, option);
  put_u32(out, static_cast<uint32_t>(payload.size()));
  out.insert(out.end(), payload.begin(), payload.end());
}

std::optional<OptionReplyHeader> decode_option_reply_header(ByteSpan bytes) {
  if (bytes.size() != kOptionReplyHeaderSize) return std::nullopt;
  ByteReader r(bytes);
  if (r.u64() != kOptReplyMagic) return std::nullopt;
  OptionReplyHeader h;
  h.option = *r.u32();
  h.type = *r.u32();
  h.length = *r.u32();
  return h;
}

void encode_info_request(Bytes& out, std::string_view export_name, std::span<const uint16_t> infos) {
  put_u32(out, static_cast<uint32_t>(export_name.size()));
  put_bytes(out, export_name);
  put_u16(out, static_cast<uint16_t>(infos.size()));
  for (const uint16_t info : infos) put_u16(out, info);
}

std::optional<InfoReply> decode_info_reply(ByteSpan payload) {
  ByteReader r(payload);
  const auto type = r.u16();
  if (!type) return std::nullopt;
  InfoReply info;
  info.type = *type;
  switch (*type) {
    case kInfoExport:
      if (r.remaining() != 10) return std::nullopt;
      info.size = *r.u64();
      info.tx_flags = *r.u16();
      break;
    case kInfoBlockSize:
      if (r.remaining() != 12) return std::nullopt;
      info.minimum = *r.u32();
      info.preferred = *r.u32();
      info.maximum = *r.u32();
      break;
    case kInfoName:
    case kInfoDescription: info.text = *r.string(r.remaining()); break;
    default: break;
  }
  return info;
}

std::optional<ServerReply> decode_server_reply(ByteSpan payload) {
  ByteReader r(payload);
  auto name_length = r.u32();
  if (!name_length) return std::nullopt;
  auto name = r.string(*name_length);
  if (!name) return std::nullopt;
  auto description = r.string(r.remaining());
  return ServerReply{std::move(*name), std::move(*description)};
}

namespace {
// Option reply header whose payload the caller appends right after.
void option_reply_header(Bytes& out, uint32_t option, uint32_t reply_type, uint32_t length) {
  put_u64(out, kOptReplyMagic);
  put_u32(out, option);
  put_u32(out, reply_type);
  put_u32(out, length);
}
}  // namespace

void encode_server_reply(Bytes& out, uint32_t option, std::string_view export_name, std::string_view description) {
  option_reply_header(out, option, kRepServer, static_cast<uint32_t>(4 + export_name.size() + description.size()));
  put_u32(out, static_cast<uint32_t>(export_name.size()));
  put_bytes(out, export_name);
  put_bytes(out, description);  // the rest of the payload: free text
}

void encode_info_export(Bytes& out, uint32_t option, uint64_t size, uint16_t tx_flags) {
  option_reply_header(out, option, kRepInfo, 12);
  put_u16(out, kInfoExport);
  put_u64(out, size);
  put_u16(out, tx_flags);
}

void encode_info_name(Bytes& out, uint32_t option, std::string_view name) {
  option_reply_header(out, option, kRepInfo, static_cast<uint32_t>(2 + name.size()));
  put_u16(out, kInfoName);
  put_bytes(out, name);
}

void encode_info_description(Bytes& out, uint32_t option, std::string_view description) {
  option_reply_header(out, option, kRepInfo, static_cast<uint32_t>(2 + description.size()));
  put_u16(out, kInfoDescription);
  put_bytes(out, description);
}

void encode_info_block_size(Bytes& out, uint32_t option, uint32_t minimum, uint32_t preferred, uint32_t maximum) {
  option_reply_header(out, option, kRepInfo, 14);
  put_u16(out, kInfoBlockSize);
  put_u32(out, minimum);
  put_u32(out, preferred);
  put_u32(out, maximum);
}

void encode_meta_context_reply(Bytes& out, uint32_t option, uint32_t context_id, std::string_view name) {
  option_reply_header(out, option, kRepMetaContext, static_cast<uint32_t>(4 + name.size()));
  put_u32(out, context_id);
  put_bytes(out, name);
}

void encode_export_name_reply(Bytes& out, uint64_t size, uint16_t tx_flags, bool no_zeroes) {
  put_u64(out, size);
  put_u16(out, tx_flags);
  if (!no_zeroes) out.insert(out.end(), 124, 0);
}

// ---- Transmission ----------------------------------------------------------

std::optional<RequestHeader> decode_request_header(ByteSpan bytes) {
  if (bytes.size() != kRequestHeaderSize) return std::nullopt;
  ByteReader r(bytes);
  if (r.u32() != kRequestMagic) return std::nullopt;
  RequestHeader h;
  h.flags = *r.u16();
  h.type = *r.u16();
  h.cookie = *r.u64();
  h.offset = *r.u64();
  h.length = *r.u32();
  return h;
}

std::optional<RequestHeader> decode_extended_request_header(ByteSpan bytes) {
  if (bytes.size() != kExtendedRequestHeaderSize) return std::nullopt;
  ByteReader r(bytes);
  if (r.u32() != kExtendedRequestMagic) return std::nullopt;
  RequestHeader h;
  h.flags = *r.u16();
  h.type = *r.u16();
  h.cookie = *r.u64();
  h.offset = *r.u64();
  h.length = *r.u64();
  return h;
}

RequestBytes encode_request(const RequestHeader& request, bool extended) {
  RequestBytes r;
  uint8_t* b = r.bytes_.data();
  store_be32(b, extended ? kExtendedRequestMagic : kRequestMagic);
  store_be16(b + 4, request.flags);
  store_be16(b + 6, request.type);
  store_be64(b + 8, request.cookie);
  store_be64(b + 16, request.offset);
  if (extended) {
    store_be64(b + 24, request.length);
    r.size_ = kExtendedRequestHeaderSize;
  } else {
    store_be32(b + 24, static_cast<uint32_t>(request.length));
    r.size_ = kRequestHeaderSize;
  }
  return r;
}

void encode_request_header(Bytes& out, const RequestHeader& request, bool extended) {
  const RequestBytes bytes = encode_request(request, extended);
  out.insert(out.end(), bytes.begin(), bytes.end());
}

std::optional<BlockStatusPayload> decode_block_status_payload(ByteSpan payload) {
  if (payload.size() < 12 || (payload.size() - 8) % 4 != 0) return std::nullopt;
  ByteReader r(payload);
  BlockStatusPayload decoded;
  decoded.effect_length = *r.u64();
  decoded.context_ids.reserve((payload.size() - 8) / 4);
  while (r.remaining() > 0) decoded.context_ids.push_back(*r.u32());
  return decoded;
}

void encode_simple_reply(Bytes& out, uint64_t cookie, uint32_t error) {
  put_u32(out, kSimpleReplyMagic);
  put_u32(out, error);
  put_u64(out, cookie);
}

void encode_structured_header(Bytes& out, uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length) {
  put_u32(out, kStructuredReplyMagic);
  put_u16(out, flags);
  put_u16(out, type);
  put_u64(out, cookie);
  put_u32(out, length);
}

void encode_reply_header(Bytes& out, const ReplyForm& form, uint16_t flags, uint16_t type, uint64_t cookie,
                         uint64_t length) {
  if (!form.extended) {
    encode_structured_header(out, flags, type, cookie, static_cast<uint32_t>(length));
    return;
  }
  put_u32(out, kExtendedReplyMagic);
  put_u16(out, flags);
  put_u16(out, type);
  put_u64(out, cookie);
  put_u64(out, form.request_offset);
  put_u64(out, length);
}

// The compact form's 32-bit lengths hold because a compact client's request
// length is 32-bit and its descriptors are clipped to it (clip_descriptors).
void encode_block_status_chunk(Bytes& out, uint64_t cookie, bool done, uint32_t context_id,
                               std::span<const Descriptor> descriptors, const ReplyForm& form) {
  const uint16_t flags = done ? kReplyFlagDone : 0;
  if (!form.extended) {
    encode_reply_header(out, form, flags, kReplyTypeBlockStatus, cookie, 4 + 8 * descriptors.size());
    put_u32(out, context_id);
    for (const auto& d : descriptors) {
      put_u32(out, static_cast<uint32_t>(d.length));
      put_u32(out, d.flags);
    }
    return;
  }
  encode_reply_header(out, form, flags, kReplyTypeBlockStatusExt, cookie, 8 + 16 * descriptors.size());
  put_u32(out, context_id);
  put_u32(out, static_cast<uint32_t>(descriptors.size()));
  for (const auto& d : descriptors) {
    put_u64(out, d.length);
    put_u64(out, d.flags);
  }
}

void encode_error_chunk(Bytes& out, uint64_t cookie, bool done, uint32_t error, std::string_view message,
                        const ReplyForm& form) {
  message = message.substr(0, 4096);
  encode_reply_header(out, form, done ? kReplyFlagDone : 0, kReplyTypeError, cookie, 6 + message.size());
  put_u32(out, error);
  put_u16(out, static_cast<uint16_t>(message.size()));
  put_bytes(out, message);
}

void encode_offset_data_header(Bytes& out, uint64_t cookie, bool done, uint64_t offset, uint32_t data_length,
                               const ReplyForm& form) {
  encode_reply_header(out, form, done ? kReplyFlagDone : 0, kReplyTypeOffsetData, cookie, uint64_t{8} + data_length);
  put_u64(out, offset);
}

void encode_offset_hole(Bytes& out, uint64_t cookie, bool done, uint64_t offset, uint32_t length,
                        const ReplyForm& form) {
  encode_reply_header(out, form, done ? kReplyFlagDone : 0, kReplyTypeOffsetHole, cookie, 12);
  put_u64(out, offset);
  put_u32(out, length);
}

void encode_read_chunk(Bytes& out, uint64_t cookie, bool done, const ReadChunk& chunk, const ReplyForm& form) {
  if (chunk.hole) {
    encode_offset_hole(out, cookie, done, chunk.offset, chunk.length, form);
  } else {
    encode_offset_data_header(out, cookie, done, chunk.offset, chunk.length, form);
  }
}

void encode_done(Bytes& out, uint64_t cookie, const ReplyForm& form) {
  encode_reply_header(out, form, kReplyFlagDone, kReplyTypeNone, cookie, 0);
}

// ---- Request validation ----------------------------------------------------

namespace {
// Flags a command may carry. FUA is the one flag the spec makes valid on every
// command once NBD_FLAG_SEND_FUA is advertised ("the server MUST accept all
// commands with this bit set (even by ignoring the bit)"): clients such as the
// kernel set it on reads and block status too. Where it means nothing (READ,
// FLUSH, CACHE, BLOCK_STATUS) it is ignored: the session forwards only the
// flags each upstream command understands. Every other flag is valid only on
// the commands the spec names for it.
uint16_t allowed_flags(uint16_t type, const TransmissionLimits& l) {
  const uint16_t fua = (l.tx_flags & kTxSendFua) ? kCmdFlagFua : 0;
  switch (type) {
    case kCmdWrite: return static_cast<uint16_t>(fua | (l.extended_headers ? kCmdFlagPayloadLen : 0));
    case kCmdRead:
      return static_cast<uint16_t>(fua | ((l.structured_replies && (l.tx_flags & kTxSendDf)) ? kCmdFlagDf : 0));
    case kCmdWriteZeroes:
      return static_cast<uint16_t>(fua | kCmdFlagNoHole | ((l.tx_flags & kTxSendFastZero) ? kCmdFlagFastZero : 0));
    case kCmdBlockStatus: return static_cast<uint16_t>(fua | kCmdFlagReqOne);
    case kCmdTrim:
    case kCmdFlush:
    case kCmdCache: return fua;
    default: return 0;
  }
}

uint16_t required_tx_flag(uint16_t type) {
  switch (type) {
    case kCmdFlush: return kTxSendFlush;
    case kCmdTrim: return kTxSendTrim;
    case kCmdWriteZeroes: return kTxSendWriteZeroes;
    case kCmdCache: return kTxSendCache;
    default: return 0;
  }
}
}  // namespace

uint32_t validate_request(const RequestHeader& r, const TransmissionLimits& l) {
  if (r.type > kCmdBlockStatus || r.type == kCmdDisc) return kErrInval;
  // A read-only export refuses every mutation with EPERM, even those it does
  // not advertise (TRIM, WRITE_ZEROES), so clients see why.
  const bool mutates = r.type == kCmdWrite || r.type == kCmdTrim || r.type == kCmdWriteZeroes;
  if (mutates && (l.tx_flags & kTxReadOnly)) return kErrPerm;
  if (uint16_t need = required_tx_flag(r.type); need && !(l.tx_flags & need)) return kErrInval;
  if (r.flags & ~allowed_flags(r.type, l)) return kErrInval;
  if (r.type == kCmdBlockStatus && !l.has_meta_contexts) return kErrInval;

  if (r.type == kCmdFlush) return (r.offset == 0 && r.length == 0) ? 0 : kErrInval;

  if (r.length == 0) return kErrInval;
  // Past the end, a WRITE or WRITE_ZEROES gets ENOSPC (the spec's advice, and
  // what nbdkit answers); anything else EINVAL.
  if (r.offset > l.export_size || r.length > l.export_size - r.offset) {
    return (r.type == kCmdWrite || r.type == kCmdWriteZeroes) ? kErrNoSpc : kErrInval;
  }
  const uint32_t align = l.min_block ? l.min_block : 1;
  if (r.offset % align != 0 || r.length % align != 0) return kErrInval;
  if ((r.type == kCmdRead || r.type == kCmdWrite) && r.length > l.max_payload) {
    return (r.type == kCmdRead && (r.flags & kCmdFlagDf)) ? kErrOverflow : kErrInval;
  }
  return 0;
}

const char* command_name(uint16_t type) {
  switch (type) {
    case kCmdRead: return "read";
    case kCmdWrite: return "write";
    case kCmdDisc: return "disc";
    case kCmdFlush: return "flush";
    case kCmdTrim: return "trim";
    case kCmdCache: return "cache";
    case kCmdWriteZeroes: return "write_zeroes";
    case kCmdBlockStatus: return "block_status";
    default: return "unknown";
  }
}

void clip_descriptors(std::span<const Descriptor> descriptors, uint64_t length, bool req_one,
                      std::vector<Descriptor>& out) {
  uint64_t covered = 0;
  size_t added = 0;
  for (const auto& d : descriptors) {
    const uint64_t piece = std::min(d.length, length - covered);
    if (piece == 0 || added == kMaxDescriptorsPerChunk) break;
    out.push_back({piece, d.flags});
    ++added;
    covered += piece;
    if (req_one) break;
  }
}

void cut_descriptors(std::span<const Descriptor> descriptors, uint64_t skip, uint64_t length, bool req_one,
                     std::vector<Descriptor>& out) {
  std::vector<Descriptor> rest;
  for (const auto& d : descriptors) {
    if (skip >= d.length) {
      skip -= d.length;
      continue;
    }
    rest.push_back({d.length - skip, d.flags});
    skip = 0;
  }
  clip_descriptors(rest, length, req_one, out);
}

}  // namespace bscache::wire
