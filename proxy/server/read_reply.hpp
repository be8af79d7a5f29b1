// The reply to a READ, whichever way its data travels (a pooled buffer, or
// pipes): the one place its headers are put in front of the data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "proxy/server/reply_writer.hpp"
#include "proxy/wire/codec.hpp"

namespace bscache::proxy {

// A structured reply of one chunk per piece upstream sent, in `chunks`' order
// (the last one done), with the headers `form` says (structured or extended).
// `place_data(chunk)` adds the pieces that carry a data chunk's bytes, after
// its header: a view of the buffer, or pipe pieces.
template <typename PlaceData>
void add_read_chunks(Reply& reply, uint64_t cookie, std::span<const wire::ReadChunk> chunks,
                     const wire::ReplyForm& form, PlaceData&& place_data) {
  auto& head = reply.head();
  for (size_t i = 0; i < chunks.size(); ++i) {
    const size_t from = head.size();
    wire::encode_read_chunk(head, cookie, i + 1 == chunks.size(), chunks[i], form);
    reply.add_head_piece(from);
    if (!chunks[i].hole) place_data(chunks[i]);
  }
}

// The whole READ as one piece of data, the payload buffer's bytes from
// `buffer_offset` on: one OFFSET_DATA chunk with structured replies (or
// extended headers: `form`), else a simple reply.
inline void add_read_data(Reply& reply, const wire::RequestHeader& request, bool structured,
                          const wire::ReplyForm& form, size_t buffer_offset) {
  if (!structured) {
    wire::encode_simple_reply(reply.head(), request.cookie, 0);
    reply.add_head_piece(0);
    reply.add_payload_piece(buffer_offset, request.length);
    return;
  }
  // A READ's length is at most the maximum payload (32 MiB), with extended headers too.
  const wire::ReadChunk whole{.offset = request.offset, .length = static_cast<uint32_t>(request.length), .hole = false};
  add_read_chunks(reply, request.cookie, std::span(&whole, 1), form,
                  [&](const wire::ReadChunk& c) { reply.add_payload_piece(buffer_offset, c.length); });
}

}  // namespace bscache::proxy
