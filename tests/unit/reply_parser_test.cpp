// ReplyParser: upstream's replies, fed in pieces of random sizes as a socket
// would deliver them, land where they belong; malformed replies are refused.
#include "proxy/wire/reply_parser.hpp"

#include <gtest/gtest.h>

#include <map>
#include <random>

#include "proxy/wire/codec.hpp"

namespace bscache::wire {
namespace {

struct Harness {
  // `extended`: the connection negotiated extended headers.
  explicit Harness(bool extended = false)
      : parser(
            [this](uint64_t cookie) -> ReplyTarget* {
              auto it = in_flight.find(cookie);
              return it == in_flight.end() ? nullptr : &it->second;
            },
            extended) {}
  std::map<uint64_t, ReplyTarget> in_flight;
  ReplyParser parser;
  std::vector<uint64_t> done;
  Bytes sunk;  // what the parser said goes to a sink, in order
  std::mt19937 rng{7};

  // Feeds `stream` in random pieces no larger than what the parser asks for.
  bool feed(const Bytes& stream) {
    size_t at = 0;
    while (at < stream.size()) {
      if (const uint64_t due = parser.sink_bytes()) {
        EXPECT_TRUE(parser.next().empty());
        const size_t n = std::min({static_cast<size_t>(due), stream.size() - at, size_t{1} + rng() % 40000});
        sunk.insert(sunk.end(), stream.begin() + static_cast<long>(at), stream.begin() + static_cast<long>(at + n));
        at += n;
        if (!parser.received(n, done)) return false;
        continue;
      }
      auto want = parser.next();
      if (want.empty()) return false;
      size_t n = std::min({want.size(), stream.size() - at, size_t{1} + rng() % 40000});
      std::copy_n(stream.begin() + static_cast<long>(at), n, want.begin());
      at += n;
      if (!parser.received(n, done)) return false;
    }
    return true;
  }
};

Bytes pattern(size_t n, uint8_t seed) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(seed + i * 7);
  return b;
}

ReplyTarget read_of(uint64_t offset, std::span<uint8_t> buffer) {
  ReplyTarget t;
  t.type = kCmdRead;
  t.offset = offset;
  t.length = buffer.size();
  t.buffer = buffer;
  return t;
}

ReplyTarget sink_read_of(uint64_t offset, uint64_t length) {
  ReplyTarget t;
  t.type = kCmdRead;
  t.offset = offset;
  t.length = length;
  t.sink = true;
  return t;
}

ReplyTarget command(uint16_t type) {
  ReplyTarget t;
  t.type = type;
  return t;
}

void append(Bytes& out, const Bytes& more) {
  out.insert(out.end(), more.begin(), more.end());
}

TEST(ReplyParser, SimpleReadLandsInTheBuffer) {
  Harness h;
  std::vector<uint8_t> buffer(100000);
  h.in_flight[5] = read_of(4096, buffer);
  h.in_flight[6] = command(kCmdWrite);
  Bytes stream;
  encode_simple_reply(stream, 6, 0);
  encode_simple_reply(stream, 5, 0);
  const Bytes data = pattern(buffer.size(), 3);
  append(stream, data);
  ASSERT_TRUE(h.feed(stream)) << h.parser.failure();
  EXPECT_EQ(h.done, (std::vector<uint64_t>{6, 5}));
  EXPECT_TRUE(std::equal(buffer.begin(), buffer.end(), data.begin()));
  EXPECT_EQ(h.in_flight[5].error, 0u);
  EXPECT_FALSE(h.parser.mid_reply());
}

TEST(ReplyParser, SinkReadsSayWhereTheirDataIsDueAndTouchNoBuffer) {
  Harness h;
  h.in_flight[1] = sink_read_of(0, 70000);
  h.in_flight[2] = sink_read_of(1 << 20, uint64_t{3} * 65536);
  h.in_flight[3] = sink_read_of(0, 4096);
  Bytes stream;
  encode_simple_reply(stream, 1, 0);
  const Bytes simple = pattern(70000, 1);
  append(stream, simple);
  // Structured, out of order: the sink gets the data in the order it came.
  const Bytes last = pattern(65536, 2), first = pattern(65536, 3);
  encode_offset_data_header(stream, 2, false, (1 << 20) + 2 * 65536, 65536);
  append(stream, last);
  encode_offset_hole(stream, 2, false, (1 << 20) + 65536, 65536);
  encode_offset_data_header(stream, 2, true, 1 << 20, 65536);
  append(stream, first);
  encode_simple_reply(stream, 3, kErrIo);  // no payload follows
  ASSERT_TRUE(h.feed(stream)) << h.parser.failure();
  EXPECT_EQ(h.done, (std::vector<uint64_t>{1, 2, 3}));
  Bytes expected = simple;
  append(expected, last);
  append(expected, first);
  EXPECT_EQ(h.sunk, expected);
  EXPECT_EQ(h.in_flight[1].error, 0u);
  EXPECT_EQ(h.in_flight[2].error, 0u);
  EXPECT_EQ(h.in_flight[3].error, kErrIo);
  const auto& pieces = h.in_flight[2].pieces;
  ASSERT_EQ(pieces.size(), 3u);
  EXPECT_TRUE(pieces[0].offset == (1 << 20) + 2 * 65536 && pieces[0].length == 65536 && !pieces[0].hole);
  EXPECT_TRUE(pieces[1].offset == (1 << 20) + 65536 && pieces[1].hole);
  EXPECT_TRUE(pieces[2].offset == (1 << 20) && !pieces[2].hole);
  EXPECT_EQ(h.in_flight[1].pieces.size(), 1u);
  EXPECT_FALSE(h.parser.mid_reply());
}

TEST(ReplyParser, SinkReadsNotCoveredExactlyFail) {
  Harness h;
  h.in_flight[1] = sink_read_of(0, 8192);
  Bytes stream;
  encode_offset_data_header(stream, 1, true, 0, 4096);
  append(stream, pattern(4096, 1));
  ASSERT_TRUE(h.feed(stream)) << h.parser.failure();
  EXPECT_EQ(h.in_flight[1].error, kErrIo);
}

TEST(ReplyParser, SimpleErrorHasNoPayload) {
  Harness h;
  std::vector<uint8_t> buffer(512);
  h.in_flight[1] = read_of(0, buffer);
  h.in_flight[2] = command(kCmdFlush);
  Bytes stream;
  encode_simple_reply(stream, 1, kErrIo);
  encode_simple_reply(stream, 2, 0);
  ASSERT_TRUE(h.feed(stream)) << h.parser.failure();
  EXPECT_EQ(h.done, (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(h.in_flight[1].error, kErrIo);
}

TEST(ReplyParser, StructuredChunksInAnyOrderWithHoles) {
  Harness h;
  std::vector<uint8_t> buffer(size_t{3} * 65536, 0xee);
  std::vector<uint8_t> other(4096);
  h.in_flight[9] = read_of(1 << 20, buffer);
  h.in_flight[10] = read_of(0, other);
  const Bytes last = pattern(65536, 1), first = pattern(65536, 2), small = pattern(4096, 9);
  Bytes stream;
  encode_offset_data_header(stream, 9, false, (1 << 20) + 2 * 65536, 65536);
  append(stream, last);
  // Another command's reply between two chunks of this one.
  encode_offset_data_header(stream, 10, true, 0, 4096);
  append(stream, small);
  encode_offset_hole(stream, 9, false, (1 << 20) + 65536, 65536);
  encode_offset_data_header(stream, 9, false, 1 << 20, 65536);
  append(stream, first);
  encode_done(stream, 9);
  ASSERT_TRUE(h.feed(stream)) << h.parser.failure();
  EXPECT_EQ(h.done, (std::vector<uint64_t>{10, 9}));
  const auto& t = h.in_flight[9];
  EXPECT_EQ(t.error, 0u);
  ASSERT_EQ(t.pieces.size(), 3u);
  EXPECT_TRUE(t.pieces[1].hole);
  EXPECT_TRUE(std::equal(first.begin(), first.end(), buffer.begin()));
  EXPECT_TRUE(std::equal(last.begin(), last.end(), buffer.begin() + std::ptrdiff_t{2} * 65536));
  EXPECT_TRUE(std::all_of(buffer.begin() + 65536, buffer.begin() + std::ptrdiff_t{2} * 65536, [](uint8_t b) {
    return b == 0;
  })) << "a hole reads as zeros";
  EXPECT_TRUE(std::equal(small.begin(), small.end(), other.begin()));
}

TEST(ReplyParser, ChunksThatDoNotCoverTheReadFailTheRead) {
  Harness h;
  std::vector<uint8_t> buffer(8192);
  h.in_flight[1] = read_of(0, buffer);
  h.in_flight[2] = read_of(0, buffer);
  h.in_flight[3] = command(kCmdWrite);
  Bytes stream;
  encode_offset_data_header(stream, 1, true, 0, 4096);  // half of it
  append(stream, pattern(4096, 0));
  encode_offset_data_header(stream, 2, false, 0, 4096);  // the first half twice
  append(stream, pattern(4096, 0));
  encode_offset_hole(stream, 2, true, 0, 4096);
  encode_simple_reply(stream, 3, 0);  // the connection goes on
  ASSERT_TRUE(h.feed(stream)) << h.parser.failure();
  EXPECT_EQ(h.done, (std::vector<uint64_t>{1, 2, 3}));
  EXPECT_EQ(h.in_flight[1].error, kErrIo);
  EXPECT_EQ(h.in_flight[2].error, kErrIo);
}

TEST(ReplyParser, ErrorChunks) {
  Harness h;
  std::vector<uint8_t> buffer(4096);
  h.in_flight[1] = read_of(0, buffer);
  h.in_flight[2] = command(kCmdTrim);
  Bytes stream;
  encode_error_chunk(stream, 1, false, kErrNoSpc, "first");
  encode_error_chunk(stream, 1, true, kErrIo, "second");
  encode_error_chunk(stream, 2, true, kErrPerm, "");
  ASSERT_TRUE(h.feed(stream)) << h.parser.failure();
  EXPECT_EQ(h.done, (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(h.in_flight[1].error, kErrNoSpc) << "the first error counts";
  EXPECT_EQ(h.in_flight[2].error, kErrPerm);
}

TEST(ReplyParser, ProtocolErrorsStopTheConnection) {
  std::vector<uint8_t> buffer(4096);
  auto fails = [&](const Bytes& stream) {
    Harness h;
    h.in_flight[1] = read_of(4096, buffer);
    h.in_flight[2] = command(kCmdWrite);
    const bool ok = h.feed(stream);
    EXPECT_TRUE(h.parser.failed() || !ok);
    EXPECT_TRUE(h.parser.next().empty());
    return !ok && !h.parser.failure().empty();
  };
  Bytes s;
  encode_simple_reply(s, 77, 0);
  EXPECT_TRUE(fails(s)) << "unknown cookie";
  s.clear();
  encode_block_status_chunk(s, 1, true, 1, std::vector<Descriptor>{{4096, 0}});
  EXPECT_TRUE(fails(s)) << "block status on a data connection";
  s.clear();
  encode_offset_data_header(s, 1, true, 0, 4096);
  append(s, pattern(4096, 0));
  EXPECT_TRUE(fails(s)) << "data before the READ's offset";
  s.clear();
  encode_offset_hole(s, 1, true, 4096, 8192);
  EXPECT_TRUE(fails(s)) << "hole past the READ's end";
  s.clear();
  encode_offset_data_header(s, 2, true, 0, 16);
  append(s, pattern(16, 0));
  EXPECT_TRUE(fails(s)) << "data for a WRITE";
  s.clear();
  encode_error_chunk(s, 2, true, 0, "no error");
  EXPECT_TRUE(fails(s)) << "error chunk with error 0";
  s = pattern(16, 5);
  EXPECT_TRUE(fails(s)) << "bad magic";
  s.clear();
  encode_structured_header(s, 0, kReplyTypeNone, 2, 0);
  EXPECT_TRUE(fails(s)) << "NONE without DONE";
}

TEST(ReplyParser, ManyRepliesRandomlySplit) {
  Harness h;
  std::mt19937 rng(11);
  std::vector<std::vector<uint8_t>> buffers(200);
  std::vector<Bytes> expected(200);
  Bytes stream;
  for (uint64_t c = 0; c < buffers.size(); ++c) {
    const size_t len = 1 + rng() % 200000;
    buffers[c].resize(len);
    expected[c] = pattern(len, static_cast<uint8_t>(c));
    h.in_flight[c] = read_of(c << 30, buffers[c]);
    if (c % 2) {
      encode_simple_reply(stream, c, 0);
      append(stream, expected[c]);
    } else {
      const size_t half = len / 2;
      if (half) {
        encode_offset_data_header(stream, c, false, c << 30, static_cast<uint32_t>(half));
        stream.insert(stream.end(), expected[c].begin(), expected[c].begin() + static_cast<long>(half));
      }
      encode_offset_data_header(stream, c, true, (c << 30) + half, static_cast<uint32_t>(len - half));
      stream.insert(stream.end(), expected[c].begin() + static_cast<long>(half), expected[c].end());
    }
  }
  ASSERT_TRUE(h.feed(stream)) << h.parser.failure();
  ASSERT_EQ(h.done.size(), buffers.size());
  for (uint64_t c = 0; c < buffers.size(); ++c) {
    EXPECT_EQ(h.in_flight[c].error, 0u) << c;
    EXPECT_TRUE(std::equal(buffers[c].begin(), buffers[c].end(), expected[c].begin())) << c;
  }
}

// Extended headers: every reply is a 32-byte chunk header, 64-bit length and
// the request's offset; READ data, holes, errors and NONE land as in the
// structured form, buffers and sinks alike.
TEST(ReplyParser, ExtendedRepliesLandLikeStructuredOnes) {
  Harness h(true);
  std::vector<uint8_t> buffer(size_t{3} * 65536, 0xee);
  const uint64_t at = uint64_t{9} << 30;  // past 4 GiB
  h.in_flight[1] = read_of(at, buffer);
  h.in_flight[2] = sink_read_of(at, 8192);
  h.in_flight[3] = command(kCmdTrim);
  h.in_flight[4] = command(kCmdWriteZeroes);
  h.in_flight[5] = command(kCmdWrite);
  const ReplyForm form{.extended = true, .request_offset = at};
  const Bytes last = pattern(65536, 1), first = pattern(65536, 2), sunk = pattern(8192, 3);
  Bytes stream;
  encode_offset_data_header(stream, 1, false, at + 2 * 65536, 65536, form);
  append(stream, last);
  encode_offset_data_header(stream, 2, true, at, 8192, form);
  append(stream, sunk);
  encode_offset_hole(stream, 1, false, at + 65536, 65536, form);
  encode_done(stream, 3, {.extended = true, .request_offset = 0});
  encode_offset_data_header(stream, 1, true, at, 65536, form);
  append(stream, first);
  encode_error_chunk(stream, 4, true, kErrNoSpc, "full", {.extended = true, .request_offset = 0});
  encode_error_chunk(stream, 5, false, kErrIo, "first", form);
  encode_done(stream, 5, form);
  ASSERT_TRUE(h.feed(stream)) << h.parser.failure();
  EXPECT_EQ(h.done, (std::vector<uint64_t>{2, 3, 1, 4, 5}));
  EXPECT_EQ(h.in_flight[1].error, 0u);
  EXPECT_TRUE(std::equal(first.begin(), first.end(), buffer.begin()));
  EXPECT_TRUE(std::all_of(buffer.begin() + 65536, buffer.begin() + std::ptrdiff_t{2} * 65536, [](uint8_t b) {
    return b == 0;
  })) << "a hole reads as zeros";
  EXPECT_TRUE(std::equal(last.begin(), last.end(), buffer.begin() + std::ptrdiff_t{2} * 65536));
  EXPECT_EQ(h.sunk, sunk);
  EXPECT_EQ(h.in_flight[2].error, 0u);
  EXPECT_EQ(h.in_flight[3].error, 0u);
  EXPECT_EQ(h.in_flight[4].error, kErrNoSpc);
  EXPECT_EQ(h.in_flight[5].error, kErrIo);
  EXPECT_FALSE(h.parser.mid_reply());
}

TEST(ReplyParser, EachHeaderFormOnlyWhereNegotiated) {
  std::vector<uint8_t> buffer(4096);
  auto fails = [&](const Bytes& stream, bool extended) {
    Harness h(extended);
    h.in_flight[1] = read_of(4096, buffer);
    h.in_flight[2] = command(kCmdTrim);
    const bool ok = h.feed(stream);
    if (!ok) {
      EXPECT_TRUE(h.parser.next().empty()) << "a failed parser asks for nothing more";
    }
    return !ok && !h.parser.failure().empty();
  };
  const ReplyForm extended{.extended = true, .request_offset = 4096};
  Bytes s;
  encode_simple_reply(s, 2, 0);
  EXPECT_TRUE(fails(s, true)) << "a simple reply after extended headers";
  s.clear();
  encode_done(s, 2);
  EXPECT_TRUE(fails(s, true)) << "a structured chunk after extended headers";
  s.clear();
  encode_done(s, 2, extended);
  EXPECT_TRUE(fails(s, false)) << "an extended chunk without extended headers";
  EXPECT_FALSE(fails(s, true));
  s.clear();
  // A 64-bit length no READ of bscache's can hold.
  encode_reply_header(s, extended, kReplyFlagDone, kReplyTypeOffsetData, 1, (uint64_t{1} << 33) + 8);
  put_u64(s, 4096);
  EXPECT_TRUE(fails(s, true)) << "an OFFSET_DATA chunk longer than 32 bits";
  s.clear();
  encode_reply_header(s, extended, kReplyFlagDone, kReplyTypeError, 2, uint64_t{1} << 32 | 6);
  put_u32(s, kErrIo);
  put_u16(s, 0);
  EXPECT_TRUE(fails(s, true)) << "an error chunk whose 64-bit length is cut to 32 bits would look fine";
  s.clear();
  encode_block_status_chunk(s, 2, true, 1, std::vector<Descriptor>{{uint64_t{8} << 30, 0}}, extended);
  EXPECT_TRUE(fails(s, true)) << "BLOCK_STATUS_EXT on a data connection";
}

}  // namespace
}  // namespace bscache::wire
