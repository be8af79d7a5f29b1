// The NBD wire codec: pure functions over byte spans, no I/O.
//
// Decoders take exactly the bytes a message occupies and return nullopt (or an
// error value) for anything malformed, never reading past the span. Encoders
// append to a byte vector so a whole reply can be sent with one write.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "proxy/wire/protocol.hpp"

namespace bscache::wire {

// Like std::allocator, but a resize() leaves bytes uninitialised: a READ
// reply buffer is filled by upstream, so zeroing megabytes first is waste.
template <typename T>
struct DefaultInitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  using std::allocator<T>::allocator;
  template <typename U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

using Bytes = std::vector<uint8_t, DefaultInitAllocator<uint8_t>>;
using ByteSpan = std::span<const uint8_t>;

// Big-endian appends.
void put_u16(Bytes& out, uint16_t v);
void put_u32(Bytes& out, uint32_t v);
void put_u64(Bytes& out, uint64_t v);
void put_bytes(Bytes& out, std::string_view s);

// Bounds-checked big-endian reader: every getter fails once the span is exhausted.
class ByteReader {
 public:
  explicit ByteReader(ByteSpan data) : data_(data) {}
  std::optional<uint16_t> u16();
  std::optional<uint32_t> u32();
  std::optional<uint64_t> u64();
  std::optional<std::string> string(size_t length);
  size_t remaining() const { return data_.size() - pos_; }

 private:
  ByteSpan data_;
  size_t pos_ = 0;
};

// ---- Handshake -------------------------------------------------------------

void encode_server_greeting(Bytes& out, uint16_t handshake_flags);

struct OptionHeader {
  uint32_t option = 0;
  uint32_t length = 0;
};
// 16 bytes: IHAVEOPT, option, length. nullopt on a wrong size or magic.
std::optional<OptionHeader> decode_option_header(ByteSpan bytes);

// Payload of NBD_OPT_INFO / NBD_OPT_GO.
struct InfoRequest {
  std::string export_name;
  std::vector<uint16_t> requests;
};
std::optional<InfoRequest> decode_info_request(ByteSpan payload);

// Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
struct MetaContextRequest {
  std::string export_name;
  std::vector<std::string> queries;
};
std::optional<MetaContextRequest> decode_meta_context_request(ByteSpan payload);

void encode_option_reply(Bytes& out, uint32_t option, uint32_t reply_type, std::string_view payload = {});
// NBD_REP_SERVER: one export of a LIST reply, its description (may be empty) after the name.
void encode_server_reply(Bytes& out, uint32_t option, std::string_view export_name, std::string_view description = {});
void encode_info_export(Bytes& out, uint32_t option, uint64_t size, uint16_t tx_flags);
void encode_info_name(Bytes& out, uint32_t option, std::string_view name);
void encode_info_description(Bytes& out, uint32_t option, std::string_view description);
void encode_info_block_size(Bytes& out, uint32_t option, uint32_t minimum, uint32_t preferred, uint32_t maximum);
void encode_meta_context_reply(Bytes& out, uint32_t option, uint32_t context_id, std::string_view name);
// Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES.
void encode_export_name_reply(Bytes& out, uint64_t size, uint16_t tx_flags, bool no_zeroes);

// The client's side of the option haggling (bscache asking upstream itself).
void encode_option_request(Bytes& out, uint32_t option, ByteSpan payload = {});
struct OptionReplyHeader {
  uint32_t option = 0;
  uint32_t type = 0;  // NBD_REP_*
  uint32_t length = 0;
};
inline constexpr size_t kOptionReplyHeaderSize = 20;
// 20 bytes: magic, option, reply type, length. nullopt on a wrong size or magic.
std::optional<OptionReplyHeader> decode_option_reply_header(ByteSpan bytes);
// Payload of NBD_OPT_GO / NBD_OPT_INFO as a client sends it: the export name
// and the NBD_INFO types it asks for.
void encode_info_request(Bytes& out, std::string_view export_name, std::span<const uint16_t> infos);
// Payload of an NBD_REP_INFO reply, as a client reads it. Fields of other
// info types stay at their defaults; an info type this codec does not know
// is returned with its type alone (the spec: a client ignores it).
struct InfoReply {
  uint16_t type = 0;
  uint64_t size = 0;       // NBD_INFO_EXPORT
  uint16_t tx_flags = 0;   // NBD_INFO_EXPORT
  uint32_t minimum = 0;    // NBD_INFO_BLOCK_SIZE
  uint32_t preferred = 0;  // NBD_INFO_BLOCK_SIZE
  uint32_t maximum = 0;    // NBD_INFO_BLOCK_SIZE
  std::string text;        // NBD_INFO_NAME, NBD_INFO_DESCRIPTION
};
// nullopt if a known type has the wrong size.
std::optional<InfoReply> decode_info_reply(ByteSpan payload);
// Payload of NBD_REP_SERVER: the name, and the description after it.
struct ServerReply {
  std::string name;
  std::string description;
};
std::optional<ServerReply> decode_server_reply(ByteSpan payload);

// ---- Transmission ----------------------------------------------------------

struct RequestHeader {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  // The effect length (or a WRITE's payload length). 32 bits on the wire in
  // a compact header, 64 with extended headers.
  uint64_t length = 0;
  // Not a header field: BLOCK_STATUS with a payload (NBD_CMD_FLAG_PAYLOAD_LEN)
  // names the contexts it wants answers for; the session turns them into this
  // mask, bit i for the client's i-th selected context. 0: every context.
  uint64_t context_mask = 0;
};
// 28 bytes. nullopt on a wrong size or magic.
std::optional<RequestHeader> decode_request_header(ByteSpan bytes);
// 32 bytes (extended headers). nullopt on a wrong size or magic.
std::optional<RequestHeader> decode_extended_request_header(ByteSpan bytes);
// A request header as bscache sends it upstream: compact (28 bytes) or
// extended (32). Fixed storage: a request in flight keeps its header in it,
// without an allocation.
class RequestBytes {
 public:
  const uint8_t* data() const { return bytes_.data(); }
  size_t size() const { return size_; }
  const uint8_t* begin() const { return bytes_.data(); }
  const uint8_t* end() const { return bytes_.data() + size_; }

 private:
  friend RequestBytes encode_request(const RequestHeader& request, bool extended);
  std::array<uint8_t, kExtendedRequestHeaderSize> bytes_{};
  size_t size_ = 0;
};
// The one request encoder. Compact (the default): `request.length` must fit in
// 32 bits. Extended (the connection negotiated NBD_OPT_EXTENDED_HEADERS): a
// 64-bit length; a WRITE must then carry NBD_CMD_FLAG_PAYLOAD_LEN, which is
// the caller's to set, as every flag is.
RequestBytes encode_request(const RequestHeader& request, bool extended = false);
// Appends encode_request's bytes.
void encode_request_header(Bytes& out, const RequestHeader& request, bool extended = false);

// The payload of BLOCK_STATUS with NBD_CMD_FLAG_PAYLOAD_LEN: the effect
// length, then the ids of the contexts to answer for (at least one).
struct BlockStatusPayload {
  uint64_t effect_length = 0;
  std::vector<uint32_t> context_ids;
};
// nullopt unless 8 + 4n bytes with n >= 1.
std::optional<BlockStatusPayload> decode_block_status_payload(ByteSpan payload);

void encode_simple_reply(Bytes& out, uint64_t cookie, uint32_t error);
void encode_structured_header(Bytes& out, uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length);

// Which header a reply chunk takes: the structured one (20 bytes), or, once
// the client negotiated extended headers, the extended one (32 bytes, 64-bit
// length, and the offset of the request it answers). Every chunk encoder
// below takes one; the default is the structured header.
struct ReplyForm {
  bool extended = false;
  uint64_t request_offset = 0;  // extended: the request's offset, echoed in every chunk
};
void encode_reply_header(Bytes& out, const ReplyForm& form, uint16_t flags, uint16_t type, uint64_t cookie,
                         uint64_t length);

struct Descriptor {
  // 64 bits: an extended-headers client may be answered with extents longer
  // than 4 GiB. A compact client's are clipped to its 32-bit request length.
  uint64_t length = 0;
  uint32_t flags = 0;
  bool operator==(const Descriptor&) const = default;
};
// Upstream's descriptors as a reply to a request of `length` bytes may carry
// them: none past the request's end, only the first with REQ_ONE, and at
// most kMaxDescriptorsPerChunk.
void clip_descriptors(std::span<const Descriptor> descriptors, uint64_t length, bool req_one,
                      std::vector<Descriptor>& out);
// The same for a reply to a longer request that began `skip` bytes earlier
// (a query widened to whole blocks): the first `skip` bytes are dropped.
void cut_descriptors(std::span<const Descriptor> descriptors, uint64_t skip, uint64_t length, bool req_one,
                     std::vector<Descriptor>& out);
// BLOCK_STATUS (32-bit lengths) or, in the extended form, BLOCK_STATUS_EXT
// (a descriptor count, then 64-bit lengths and status).
void encode_block_status_chunk(Bytes& out, uint64_t cookie, bool done, uint32_t context_id,
                               std::span<const Descriptor> descriptors, const ReplyForm& form = {});
void encode_error_chunk(Bytes& out, uint64_t cookie, bool done, uint32_t error, std::string_view message,
                        const ReplyForm& form = {});
// Header and offset of an OFFSET_DATA chunk; the caller appends data_length bytes.
void encode_offset_data_header(Bytes& out, uint64_t cookie, bool done, uint64_t offset, uint32_t data_length,
                               const ReplyForm& form = {});
void encode_offset_hole(Bytes& out, uint64_t cookie, bool done, uint64_t offset, uint32_t length,
                        const ReplyForm& form = {});
// A piece of a READ's data as upstream sent it: bytes, or a hole, at a disk offset.
struct ReadChunk {
  uint64_t offset = 0;
  uint32_t length = 0;
  bool hole = false;
  bool operator==(const ReadChunk&) const = default;
};
// The one READ reply chunk encoder: an OFFSET_HOLE chunk, or an OFFSET_DATA
// chunk's header and offset (the caller sends its `length` bytes after it).
void encode_read_chunk(Bytes& out, uint64_t cookie, bool done, const ReadChunk& chunk, const ReplyForm& form = {});
void encode_done(Bytes& out, uint64_t cookie, const ReplyForm& form = {});

// ---- Request validation ----------------------------------------------------

// What the session negotiated and what the export allows.
struct TransmissionLimits {
  uint64_t export_size = 0;
  uint16_t tx_flags = 0;           // as advertised to the client
  uint32_t min_block = 1;          // offsets and lengths must be multiples
  uint32_t max_payload = 1 << 25;  // largest READ/WRITE length
  bool structured_replies = false;
  bool has_meta_contexts = false;  // SET_META_CONTEXT selected at least one
  bool extended_headers = false;   // WRITE then may carry NBD_CMD_FLAG_PAYLOAD_LEN
};

// Returns 0 if the request may go upstream, else the NBD error to reply with
// (EINVAL for malformed requests, ENOSPC for a WRITE or WRITE_ZEROES past the
// end, EPERM for writes to a read-only export, EOVERFLOW for a DF read larger
// than one chunk could hold). With extended headers a WRITE may carry
// NBD_CMD_FLAG_PAYLOAD_LEN (the spec says it must, but qemu's client, 8.2 to
// 10 at least, omits it and qemu-nbd accepts that: so does bscache); any
// other command carrying it is refused (the session consumes and decodes
// BLOCK_STATUS's payload and clears the flag before validating).
uint32_t validate_request(const RequestHeader& request, const TransmissionLimits& limits);

const char* command_name(uint16_t type);

}  // namespace bscache::wire
