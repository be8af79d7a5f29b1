#include "reply_parser.hpp"

#include <algorithm>
#include <cstdint>

#include "byte_order.hpp"
#include "protocol.hpp"

namespace bscache::wire {

namespace {
bool is_error_type(uint16_t type) {
  return (type & 0x8000) != 0;
}

// Bytes after the chunk header read with it, before any payload.
size_t prefix_of(uint16_t type) {
  if (type == kReplyTypeOffsetData) return 8;   // offset
  if (type == kReplyTypeOffsetHole) return 12;  // offset, length
  return 0;
}

// Whether the pieces of a READ describe every byte of it exactly once.
bool covers_exactly(std::vector<ReadChunk> pieces, uint64_t offset, uint64_t length) {
  std::sort(pieces.begin(), pieces.end(), [](const auto& a, const auto& b) { return a.offset < b.offset; });
  uint64_t at = offset;
  for (const auto& p : pieces) {
    if (p.offset != at) return false;  // a gap or an overlap
    at += p.length;
  }
  return at == offset + length;
}
}  // namespace

void ReplyParser::expect_header() {
  stage_ = Stage::Header;
  want_ = std::span<uint8_t>(header_, kSimpleHeader);
  filled_ = 0;
  target_ = nullptr;
}

std::span<uint8_t> ReplyParser::next() {
  if (failed() || stage_ == Stage::Sink) return {};
  if (want_.empty()) expect_header();  // first use
  return want_.subspan(filled_);
}

bool ReplyParser::fail(std::string why) {
  failure_ = std::move(why);
  want_ = {};
  return false;
}

bool ReplyParser::received(size_t n, std::vector<uint64_t>& done) {
  if (failed()) return false;
  filled_ += n;
  if (filled_ < (stage_ == Stage::Sink ? want_sink_ : want_.size())) return true;
  switch (stage_) {
    case Stage::Header: return header_complete(done);
    case Stage::ChunkRest: return chunk_rest_complete(done);
    case Stage::Payload:
    case Stage::Sink:
      if (chunk_type_ == kReplyTypeOffsetData) return chunk_finished(done);
      done.push_back(cookie_);  // a simple READ reply's data
      expect_header();
      return true;
    case Stage::ErrorChunk: {
      const uint32_t error = load_be32(scratch_.data());
      if (error == 0) return fail("an error chunk with error 0");
      if (target_->error == 0) target_->error = error;
      return chunk_finished(done);
    }
  }
  return fail("parser state");
}

bool ReplyParser::header_complete(std::vector<uint64_t>& done) {
  const uint32_t magic = load_be32(header_);
  if (magic == (extended_ ? kExtendedReplyMagic : kStructuredReplyMagic)) {
    // The type is known now: read the length (an extended header's offset
    // too) and the type's fixed prefix in one go.
    stage_ = Stage::ChunkRest;
    want_ = std::span<uint8_t>(header_, chunk_header_size() + prefix_of(load_be16(header_ + 6)));
    return true;  // filled_ stays: the first 16 bytes are in
  }
  if (extended_) return fail("a reply without the extended header on a connection that negotiated it");
  if (magic == kExtendedReplyMagic) return fail("an extended reply on a connection that did not negotiate it");
  if (magic != kSimpleReplyMagic) return fail("a reply with bad magic");
  cookie_ = load_be64(header_ + 8);
  target_ = lookup_(cookie_);
  if (!target_) return fail("a reply to a cookie not in flight");
  chunk_type_ = kReplyTypeNone;
  if (const uint32_t error = load_be32(header_ + 4)) {
    target_->error = error;  // no payload follows an error
  } else if (target_->type == kCmdRead && target_->length > 0) {
    target_->pieces.push_back({target_->offset, static_cast<uint32_t>(target_->length), false});
    return expect_payload(target_->offset, static_cast<uint32_t>(target_->length));
  }
  done.push_back(cookie_);
  expect_header();
  return true;
}

bool ReplyParser::chunk_rest_complete(std::vector<uint64_t>& done) {
  chunk_flags_ = load_be16(header_ + 4);
  chunk_type_ = load_be16(header_ + 6);
  cookie_ = load_be64(header_ + 8);
  // An extended header's offset (bytes 16 to 23) echoes the request's; it
  // says nothing the cookie does not, and is not checked (libnbd does not
  // fail a reply over it either).
  chunk_length_ = extended_ ? load_be64(header_ + 24) : load_be32(header_ + 16);
  const uint8_t* prefix = header_ + chunk_header_size();
  target_ = lookup_(cookie_);
  if (!target_) return fail("a reply chunk for a cookie not in flight");
  const bool read = target_->type == kCmdRead;
  const uint64_t start = target_->offset;
  const uint64_t end = start + target_->length;
  switch (chunk_type_) {
    case kReplyTypeNone:
      if (chunk_length_ != 0 || !(chunk_flags_ & kReplyFlagDone)) return fail("a NONE chunk with a length or not last");
      return chunk_finished(done);
    case kReplyTypeOffsetData: {
      if (!read || chunk_length_ <= 8) return fail("an OFFSET_DATA chunk for a non-READ or without data");
      const uint64_t at = load_be64(prefix);
      const uint64_t length = chunk_length_ - 8;
      // A READ is at most the maximum payload, so a piece of it fits 32 bits.
      if (at < start || at > end || length > end - at || length > UINT32_MAX) {
        return fail("an OFFSET_DATA chunk outside its READ");
      }
      target_->pieces.push_back({at, static_cast<uint32_t>(length), false});
      return expect_payload(at, static_cast<uint32_t>(length));
    }
    case kReplyTypeOffsetHole: {
      if (!read || chunk_length_ != 12) return fail("an OFFSET_HOLE chunk for a non-READ or of a wrong size");
      const uint64_t at = load_be64(prefix);
      const uint32_t length = load_be32(prefix + 8);
      if (length == 0 || at < start || at > end || length > end - at) {
        return fail("an OFFSET_HOLE chunk outside its READ");
      }
      target_->pieces.push_back({at, length, true});
      // Like libnbd: a hole reads as zeros, so the buffer is all upstream's
      // data whatever the caller sends from it (a client without structured
      // replies gets the hole as data). Not a copy: no payload byte moves.
      // A sink has no buffer: its reader sends the hole as a hole.
      if (!target_->sink) {
        if (target_->buffer.size() != target_->length) return fail("a READ buffer of the wrong size");
        std::fill_n(target_->buffer.begin() + static_cast<std::ptrdiff_t>(at - start), length, uint8_t{0});
      }
      return chunk_finished(done);
    }
    default:
      if (!is_error_type(chunk_type_)) return fail("an unexpected chunk type " + std::to_string(chunk_type_));
      if (chunk_length_ < 6 || chunk_length_ > kMaxScratch) return fail("an error chunk of a bad length");
      stage_ = Stage::ErrorChunk;
      scratch_.resize(chunk_length_);
      want_ = scratch_;
      filled_ = 0;
      return true;
  }
}

// The READ data for [at, at + length) comes next: into its place in the
// buffer, or to the sink.
bool ReplyParser::expect_payload(uint64_t at, uint32_t length) {
  filled_ = 0;
  if (target_->sink) {
    stage_ = Stage::Sink;
    want_sink_ = length;
    return true;
  }
  if (target_->buffer.size() != target_->length) return fail("a READ buffer of the wrong size");
  stage_ = Stage::Payload;
  want_ = target_->buffer.subspan(at - target_->offset, length);
  return true;
}

// A chunk is over: the reply too if it was the last.
bool ReplyParser::chunk_finished(std::vector<uint64_t>& done) {
  if (chunk_flags_ & kReplyFlagDone) {
    ReplyTarget& t = *target_;
    // Like libnbd: a READ whose chunks do not describe every byte exactly
    // once fails (its buffer holds bytes upstream never sent).
    if (t.type == kCmdRead && t.error == 0 && !covers_exactly(t.pieces, t.offset, t.length)) {
      t.error = kErrIo;
    }
    done.push_back(cookie_);
  }
  expect_header();
  return true;
}

}  // namespace bscache::wire
