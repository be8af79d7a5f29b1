// ReplyParser: the client side of the NBD transmission phase, reading what an
// upstream server sends back. No I/O: the caller asks where the next bytes
// go (next()), receives into exactly that span, and reports how many came.
//
// Why it says where bytes go instead of taking a buffer: a READ payload must
// land in the buffer the client's reply is sent from (no copy by bscache), so
// the parser never over-reads. It asks for a reply's header, then for the
// rest of a structured chunk's header once the type is known, then for the
// payload straight into the command's buffer: three receives for a
// structured READ reply, two for a simple one. A READ can instead have its
// payload go to a sink the caller moves bytes into itself (a pipe it splices
// the socket into): the parser then only says how many bytes are due there.
//
// Handles simple replies and the structured chunks a data command can get:
// NONE, OFFSET_DATA, OFFSET_HOLE, ERROR, ERROR_OFFSET and unknown error types;
// on a connection that negotiated extended headers, the same chunks behind
// the 32-byte extended reply header instead (and no simple reply: the spec
// allows none there). Each form is refused on a connection of the other.
// Anything else (a BLOCK_STATUS chunk, an unknown cookie, a chunk outside its
// READ, a READ whose chunks do not cover it exactly) is a protocol error: the
// connection is unusable after it. A READ buffer is handed back as success
// only when every byte of it was written by upstream or described as a hole
// (and then zeroed, as libnbd does).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "proxy/wire/codec.hpp"

namespace bscache::wire {

// What the parser needs about a command in flight, and what it fills in.
struct ReplyTarget {
  uint16_t type = 0;          // NBD command
  uint64_t offset = 0;        // READ: the disk offset buffer[0] stands for
  uint64_t length = 0;        // READ: bytes asked for
  std::span<uint8_t> buffer;  // READ: where the data goes (`length` bytes), unless `sink`
  // READ: the data goes to a sink of the caller's (pipes, say) in the order
  // it arrives (see sink_bytes()); holes are only described in `pieces`, and
  // there is no buffer to zero.
  bool sink = false;
  // Filled in while the reply arrives.
  uint32_t error = 0;             // the first NBD error upstream reported, 0 if none
  std::vector<ReadChunk> pieces;  // READ: the chunks, in order received (a simple reply's data is one)
};

class ReplyParser {
 public:
  // The command a cookie names, or null if none is in flight.
  using Lookup = std::function<ReplyTarget*(uint64_t cookie)>;
  // `extended`: the connection negotiated NBD_OPT_EXTENDED_HEADERS.
  explicit ReplyParser(Lookup lookup, bool extended = false) : lookup_(std::move(lookup)), extended_(extended) {}

  // Where the next bytes from upstream go; empty only if failed() or sink_bytes() > 0.
  std::span<uint8_t> next();
  // Bytes of a sink READ's payload due now: the caller moves up to this many
  // from upstream into the target's sink and reports them with received().
  uint64_t sink_bytes() const { return stage_ == Stage::Sink ? want_sink_ - filled_ : 0; }
  // The cookie of the reply being read (valid while sink_bytes() > 0).
  uint64_t cookie() const { return cookie_; }
  // `n` bytes were received into next(). Cookies of replies that completed
  // are appended to `done`. False on a protocol error (see failure()).
  bool received(size_t n, std::vector<uint64_t>& done);

  bool failed() const { return !failure_.empty(); }
  const std::string& failure() const { return failure_; }
  // Whether bytes of a reply have arrived that it has not finished with.
  bool mid_reply() const { return stage_ != Stage::Header || filled_ > 0; }

 private:
  enum class Stage : uint8_t { Header, ChunkRest, Payload, Sink, ErrorChunk };

  bool expect_payload(uint64_t at, uint32_t length);

  bool header_complete(std::vector<uint64_t>& done);
  bool chunk_rest_complete(std::vector<uint64_t>& done);
  bool chunk_finished(std::vector<uint64_t>& done);
  bool fail(std::string why);
  void expect_header();

  // Every reply starts with 16 bytes laid out alike in all three forms
  // (magic, then a simple reply's error and cookie, or a chunk's flags, type
  // and cookie); the rest of a chunk header follows.
  static constexpr size_t kSimpleHeader = 16;
  static constexpr size_t kChunkHeader = 20;
  static constexpr size_t kExtendedHeader = 32;
  // Longest chunk payload read into scratch_ (errors, hole descriptions).
  static constexpr uint32_t kMaxScratch = 64 * 1024;

  size_t chunk_header_size() const { return extended_ ? kExtendedHeader : kChunkHeader; }

  Lookup lookup_;
  const bool extended_;
  Stage stage_ = Stage::Header;
  uint8_t header_[kExtendedHeader + 12] = {};  // chunk header plus an OFFSET_DATA/HOLE prefix
  std::vector<uint8_t> scratch_;               // an error chunk's payload
  std::span<uint8_t> want_;                    // the current piece's destination
  size_t filled_ = 0;                          // bytes of want_ (or of the sink's share) received
  uint64_t want_sink_ = 0;                     // Stage::Sink: the payload's length
  // The reply being read.
  uint64_t cookie_ = 0;
  ReplyTarget* target_ = nullptr;
  uint16_t chunk_flags_ = 0;
  uint16_t chunk_type_ = 0;
  uint64_t chunk_length_ = 0;  // 64 bits in an extended header
  std::string failure_;
};

}  // namespace bscache::wire
