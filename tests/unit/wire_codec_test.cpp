// The NBD wire codec: exact bytes for every encoder (written out by hand from
// the spec), round trips, and malformed or short input rejected safely.
#include "proxy/wire/codec.hpp"

#include <gtest/gtest.h>

#include <random>

namespace bscache::wire {
namespace {

Bytes hex(std::initializer_list<int> bytes) {
  Bytes out;
  for (int b : bytes) out.push_back(static_cast<uint8_t>(b));
  return out;
}

TEST(WireCodec, ServerGreeting) {
  Bytes out;
  encode_server_greeting(out, kFlagFixedNewstyle | kFlagNoZeroes);
  EXPECT_EQ(out, hex({'N', 'B', 'D', 'M', 'A', 'G', 'I', 'C', 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 3}));
}

TEST(WireCodec, OptionHeader) {
  Bytes in = hex({'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 0, 0, 7, 0, 0, 1, 2});
  auto h = decode_option_header(in);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->option, 7u);
  EXPECT_EQ(h->length, 258u);
  in[0] = 'X';
  EXPECT_FALSE(decode_option_header(in)) << "bad magic";
  EXPECT_FALSE(decode_option_header(ByteSpan(in).first(15))) << "short";
}

TEST(WireCodec, OptionReplies) {
  Bytes out;
  encode_option_reply(out, kOptGo, kRepAck);
  EXPECT_EQ(out, hex({0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0}));
  out.clear();
  encode_info_export(out, kOptGo, 0x1122334455667788, 0x0105);
  EXPECT_EQ(out, hex({0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0,    0,    0,    7,    0,    0,    0,    3,
                      0, 0, 0,    12,   0,    0,    0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x01, 0x05}));
  out.clear();
  encode_info_block_size(out, kOptInfo, 512, 4096, 0x2000000);
  EXPECT_EQ(out.size(), 20u + 14u);
  EXPECT_EQ(Bytes(out.begin() + 20, out.end()), hex({0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0}));
  out.clear();
  encode_meta_context_reply(out, kOptSetMetaContext, 1, "base:allocation");
  EXPECT_EQ(out[19], 4 + 15);
  EXPECT_EQ(Bytes(out.begin() + 20, out.begin() + 24), hex({0, 0, 0, 1}));
  out.clear();
  encode_server_reply(out, kOptList, "disk");
  EXPECT_EQ(Bytes(out.begin() + 16, out.end()), hex({0, 0, 0, 8, 0, 0, 0, 4, 'd', 'i', 's', 'k'}));
}

TEST(WireCodec, CutDescriptorsDropsTheWidenedStart) {
  const std::vector<Descriptor> upstream{{512, 3}, {1024, 0}, {512, 3}};
  std::vector<Descriptor> out;
  cut_descriptors(upstream, 100, 1000, false, out);
  EXPECT_EQ(out, (std::vector<Descriptor>{{412, 3}, {588, 0}}));
  out.clear();
  cut_descriptors(upstream, 600, 5000, true, out);
  EXPECT_EQ(out, (std::vector<Descriptor>{{936, 0}})) << "REQ_ONE: the extent the query starts in";
  out.clear();
  cut_descriptors(upstream, 2048, 10, false, out);
  EXPECT_TRUE(out.empty()) << "nothing left past the reply";
}

// bscache asking upstream: the request it sends and the replies it reads back.
TEST(WireCodec, OptionRequestAndReplyDecoding) {
  Bytes out;
  encode_option_request(out, kOptList);
  EXPECT_EQ(out, hex({'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 0, 0, 3, 0, 0, 0, 0}));

  Bytes reply;
  encode_server_reply(reply, kOptList, "disk", "the disk");
  auto header = decode_option_reply_header(ByteSpan(reply).first(kOptionReplyHeaderSize));
  ASSERT_TRUE(header);
  EXPECT_EQ(header->option, kOptList);
  EXPECT_EQ(header->type, kRepServer);
  EXPECT_EQ(header->length, 4u + 4u + 8u);
  auto server = decode_server_reply(ByteSpan(reply).subspan(kOptionReplyHeaderSize));
  ASSERT_TRUE(server);
  EXPECT_EQ(server->name, "disk");
  EXPECT_EQ(server->description, "the disk");

  EXPECT_FALSE(decode_server_reply(hex({0, 0, 0, 5, 'd', 'i', 's', 'k'}))) << "name longer than the payload";
  EXPECT_FALSE(decode_server_reply(hex({0, 0}))) << "no name length";
  reply[0] ^= 1;
  EXPECT_FALSE(decode_option_reply_header(ByteSpan(reply).first(kOptionReplyHeaderSize))) << "bad magic";
  EXPECT_FALSE(decode_option_reply_header(ByteSpan(reply).first(19))) << "short";
}

TEST(WireCodec, ExportNameReply) {
  Bytes out;
  encode_export_name_reply(out, 1024, 3, true);
  EXPECT_EQ(out, hex({0, 0, 0, 0, 0, 0, 4, 0, 0, 3}));
  out.clear();
  encode_export_name_reply(out, 1024, 3, false);
  EXPECT_EQ(out.size(), 134u);
}

TEST(WireCodec, InfoRequest) {
  Bytes in = hex({0, 0, 0, 2, 'h', 'd', 0, 2, 0, 1, 0, 3});
  auto r = decode_info_request(in);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->export_name, "hd");
  EXPECT_EQ(r->requests, (std::vector<uint16_t>{1, 3}));
  EXPECT_FALSE(decode_info_request(hex({0, 0, 0, 2, 'h', 'd', 0, 3, 0, 1, 0, 3}))) << "count larger than the data";
  EXPECT_FALSE(decode_info_request(hex({0, 0, 0, 2, 'h', 'd', 0, 1, 0, 1, 0}))) << "trailing junk";
  EXPECT_FALSE(decode_info_request(hex({0xff, 0xff, 0xff, 0xff, 'a', 'b', 'c', 'd', 'e', 'f'}))) << "huge name";
  EXPECT_FALSE(decode_info_request({})) << "empty";
}

TEST(WireCodec, MetaContextRequest) {
  Bytes in = hex({0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 5, 'b', 'a', 's', 'e', ':', 0, 0, 0, 1, 'q'});
  auto r = decode_meta_context_request(in);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->queries, (std::vector<std::string>{"base:", "q"}));
  Bytes junk = in;
  junk.push_back(0);
  EXPECT_FALSE(decode_meta_context_request(junk)) << "trailing junk";
  EXPECT_FALSE(decode_meta_context_request(hex({0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}))) << "count beyond the data";
  EXPECT_FALSE(decode_meta_context_request(hex({0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 'a'}))) << "truncated query";
}

TEST(WireCodec, RequestHeaderRoundTrip) {
  RequestHeader r{kCmdFlagReqOne, kCmdBlockStatus, 0xdeadbeefcafef00d, 1 << 20, 65536};
  Bytes out;
  encode_request_header(out, r);
  EXPECT_EQ(out, hex({0x25, 0x60, 0x95, 0x13, 0, 8, 0, 7,    0xde, 0xad, 0xbe, 0xef, 0xca, 0xfe,
                      0xf0, 0x0d, 0,    0,    0, 0, 0, 0x10, 0,    0,    0,    1,    0,    0}));
  auto back = decode_request_header(out);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->cookie, r.cookie);
  EXPECT_EQ(back->offset, r.offset);
  EXPECT_EQ(back->length, r.length);
  EXPECT_EQ(back->flags, r.flags);
  out[0] = 0;
  EXPECT_FALSE(decode_request_header(out));
  EXPECT_FALSE(decode_request_header(ByteSpan(out).first(27)));
}

TEST(WireCodec, Replies) {
  Bytes out;
  encode_simple_reply(out, 0x0102030405060708, 22);
  EXPECT_EQ(out, hex({0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8}));
  out.clear();
  std::vector<Descriptor> d = {{4096, 3}, {8192, 0}};
  encode_block_status_chunk(out, 9, true, 1, d);
  EXPECT_EQ(out, hex({0x66, 0x8e, 0x33, 0xef, 0, 1, 0,    5, 0, 0, 0, 0, 0, 0, 0,    9, 0, 0, 0, 20,
                      0,    0,    0,    1,    0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 0x20, 0, 0, 0, 0, 0}));
  out.clear();
  encode_error_chunk(out, 9, true, 5, "io");
  EXPECT_EQ(out, hex({0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0,   0,
                      0,    9,    0,    0,    0, 8, 0,    0, 0, 5, 0, 2, 'i', 'o'}));
  out.clear();
  encode_offset_hole(out, 9, false, 512, 1024);
  EXPECT_EQ(Bytes(out.begin() + 4, out.begin() + 8), hex({0, 0, 0, 2}));
  EXPECT_EQ(Bytes(out.begin() + 16, out.end()), hex({0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 4, 0}));
  out.clear();
  encode_offset_data_header(out, 9, true, 0, 512);
  EXPECT_EQ(Bytes(out.begin() + 16, out.begin() + 20), hex({0, 0, 2, 8}));
  out.clear();
  encode_done(out, 9);
  EXPECT_EQ(out, hex({0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0}));
}

// ---- Extended headers ------------------------------------------------------

TEST(WireCodec, ExtendedRequestHeaderCarriesA64BitLength) {
  Bytes in =
      hex({0x21, 0xe4, 0x1c, 0x71, 0, 8, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0x2a,  // magic, REQ_ONE, BLOCK_STATUS, cookie
           0,    0,    0,    1,    0, 0, 0, 0,                             // offset 4 GiB
           0,    0,    1,    0,    0, 0, 0, 0});                           // length 1 TiB
  auto h = decode_extended_request_header(in);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->flags, kCmdFlagReqOne);
  EXPECT_EQ(h->type, kCmdBlockStatus);
  EXPECT_EQ(h->cookie, 42u);
  EXPECT_EQ(h->offset, uint64_t{1} << 32);
  EXPECT_EQ(h->length, uint64_t{1} << 40);
  EXPECT_FALSE(decode_request_header(ByteSpan(in).first(kRequestHeaderSize))) << "not a compact header";
  EXPECT_FALSE(decode_extended_request_header(ByteSpan(in).first(31)));
  in[0] = 0x25;
  EXPECT_FALSE(decode_extended_request_header(in));
}

TEST(WireCodec, ExtendedRepliesEchoTheOffsetWith64BitLengths) {
  const ReplyForm form{.extended = true, .request_offset = 0x1122334455667788};
  Bytes out;
  encode_done(out, 9, form);
  EXPECT_EQ(out, hex({0x6e, 0x8a, 0x27, 0x8c, 0,    1,    0,    0,    0, 0, 0, 0, 0, 0, 0, 9,
                      0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0, 0, 0, 0, 0, 0, 0, 0}));
  out.clear();
  encode_error_chunk(out, 9, true, 5, "io", form);
  ASSERT_EQ(out.size(), kExtendedReplyHeaderSize + 8);
  EXPECT_EQ(Bytes(out.begin() + 4, out.begin() + 8), hex({0, 1, 0x80, 1}));
  EXPECT_EQ(Bytes(out.begin() + 24, out.end()), hex({0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 5, 0, 2, 'i', 'o'}));
  out.clear();
  encode_offset_data_header(out, 9, false, 0x1122334455667788 + 512, 4096, form);
  ASSERT_EQ(out.size(), kExtendedReplyHeaderSize + 8);
  EXPECT_EQ(Bytes(out.begin() + 4, out.begin() + 8), hex({0, 0, 0, 1}));
  EXPECT_EQ(Bytes(out.begin() + 24, out.begin() + 32), hex({0, 0, 0, 0, 0, 0, 0x10, 8}));
  out.clear();
  encode_offset_hole(out, 9, true, 0x1122334455667788, 512, form);
  EXPECT_EQ(out.size(), kExtendedReplyHeaderSize + 12);
}

TEST(WireCodec, BlockStatusExtCarriesACountAnd64BitDescriptors) {
  const ReplyForm form{.extended = true, .request_offset = 0};
  const std::vector<Descriptor> one_tib_hole = {{uint64_t{1} << 40, kStateHole | kStateZero}};
  Bytes out;
  encode_block_status_chunk(out, 7, true, 1, one_tib_hole, form);
  EXPECT_EQ(out, hex({0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 6,  0, 0, 0, 0, 0, 0, 0, 7,  // DONE, BLOCK_STATUS_EXT, cookie
                      0,    0,    0,    0,    0, 0, 0, 0,                           // offset
                      0,    0,    0,    0,    0, 0, 0, 24,                          // 8 + 16 payload bytes
                      0,    0,    0,    1,    0, 0, 0, 1,                           // context 1, one descriptor
                      0,    0,    1,    0,    0, 0, 0, 0,                           // 1 TiB
                      0,    0,    0,    0,    0, 0, 0, 3}));                        // hole, zero
}

TEST(WireCodec, BlockStatusPayloadIsAnEffectLengthAndContextIds) {
  const Bytes two = hex({0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 3});
  auto decoded = decode_block_status_payload(two);
  ASSERT_TRUE(decoded);
  EXPECT_EQ(decoded->effect_length, uint64_t{1} << 34);
  EXPECT_EQ(decoded->context_ids, (std::vector<uint32_t>{1, 3}));
  EXPECT_FALSE(decode_block_status_payload(ByteSpan(two).first(8))) << "no context";
  EXPECT_FALSE(decode_block_status_payload(ByteSpan(two).first(14))) << "a partial id";
  EXPECT_FALSE(decode_block_status_payload({}));
}

TEST(WireCodec, ClipKeepsAtMostTheSpecsDescriptorsPerChunk) {
  const std::vector<Descriptor> many(kMaxDescriptorsPerChunk + 5, Descriptor{512, 0});
  std::vector<Descriptor> out;
  clip_descriptors(many, uint64_t{1} << 40, false, out);
  EXPECT_EQ(out.size(), kMaxDescriptorsPerChunk);
}

TEST(WireCodec, ByteReaderNeverReadsPastTheEnd) {
  Bytes in = hex({1, 2, 3});
  ByteReader r(in);
  EXPECT_EQ(r.u16(), 0x0102);
  EXPECT_FALSE(r.u16());
  EXPECT_FALSE(r.u32());
  EXPECT_FALSE(r.string(2));
  EXPECT_EQ(r.string(1), std::string("\3"));
  EXPECT_EQ(r.remaining(), 0u);
}

class Validate : public ::testing::Test {
 protected:
  TransmissionLimits limits{1 << 30,
                            static_cast<uint16_t>(kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendTrim |
                                                  kTxSendWriteZeroes | kTxSendDf | kTxSendCache),
                            512,
                            1 << 25,
                            true,
                            true};
  uint32_t check(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags = 0) {
    return validate_request({flags, type, 1, offset, length}, limits);
  }
};

TEST_F(Validate, ExtendedHeadersTake64BitLengthsAndWritesMaySayPayloadLen) {
  limits.export_size = uint64_t{1} << 44;
  limits.extended_headers = true;
  const uint64_t sixteen_gib = uint64_t{16} << 30;
  EXPECT_EQ(validate_request({0, kCmdBlockStatus, 1, 0, sixteen_gib}, limits), 0u);
  EXPECT_EQ(validate_request({kCmdFlagReqOne, kCmdBlockStatus, 1, 0, uint64_t{1} << 40}, limits), 0u);
  EXPECT_EQ(validate_request({0, kCmdTrim, 1, 0, sixteen_gib}, limits), 0u);
  EXPECT_EQ(validate_request({kCmdFlagFua, kCmdWriteZeroes, 1, 4096, sixteen_gib}, limits), 0u);
  EXPECT_EQ(validate_request({0, kCmdCache, 1, 0, sixteen_gib}, limits), 0u);
  EXPECT_EQ(validate_request({0, kCmdRead, 1, 0, sixteen_gib}, limits), kErrInval) << "READ stays bounded";
  EXPECT_EQ(validate_request({kCmdFlagPayloadLen, kCmdWrite, 1, 0, 4096}, limits), 0u);
  EXPECT_EQ(validate_request({0, kCmdWrite, 1, 0, 4096}, limits), 0u) << "qemu's client omits the flag";
  EXPECT_EQ(validate_request({kCmdFlagPayloadLen, kCmdWrite, 1, 0, sixteen_gib}, limits), kErrInval);
  EXPECT_EQ(validate_request({kCmdFlagPayloadLen, kCmdTrim, 1, 0, 4096}, limits), kErrInval);
  EXPECT_EQ(validate_request({kCmdFlagPayloadLen, kCmdBlockStatus, 1, 0, 12}, limits), kErrInval)
      << "a filter the session could not take";
  EXPECT_EQ(validate_request({0, kCmdTrim, 1, (uint64_t{1} << 44) - 512, 1024}, limits), kErrInval) << "past the end";
  limits.extended_headers = false;
  EXPECT_EQ(check(kCmdWrite, 0, 4096, kCmdFlagPayloadLen), kErrInval) << "compact: no such flag";
}

TEST_F(Validate, EveryCommandWithGoodArguments) {
  EXPECT_EQ(check(kCmdRead, 0, 4096), 0u);
  EXPECT_EQ(check(kCmdRead, 0, 4096, kCmdFlagDf), 0u);
  EXPECT_EQ(check(kCmdWrite, 512, 512, kCmdFlagFua), 0u);
  EXPECT_EQ(check(kCmdFlush, 0, 0), 0u);
  EXPECT_EQ(check(kCmdTrim, 0, 1 << 20), 0u);
  EXPECT_EQ(check(kCmdCache, 0, 1 << 20), 0u);
  EXPECT_EQ(check(kCmdWriteZeroes, 0, 1 << 20, kCmdFlagNoHole | kCmdFlagFua), 0u);
  EXPECT_EQ(check(kCmdBlockStatus, 0, 1 << 30, kCmdFlagReqOne), 0u);
}

// The spec: with NBD_FLAG_SEND_FUA advertised "the server MUST accept all
// commands with this bit set (even by ignoring the bit)"; without it, a
// client must not set it.
TEST_F(Validate, FuaIsAcceptedOnEveryCommandOnceAdvertised) {
  EXPECT_EQ(check(kCmdRead, 0, 4096, kCmdFlagFua), 0u);
  EXPECT_EQ(check(kCmdRead, 0, 4096, kCmdFlagFua | kCmdFlagDf), 0u);
  EXPECT_EQ(check(kCmdWrite, 0, 4096, kCmdFlagFua), 0u);
  EXPECT_EQ(check(kCmdFlush, 0, 0, kCmdFlagFua), 0u);
  EXPECT_EQ(check(kCmdTrim, 0, 4096, kCmdFlagFua), 0u);
  EXPECT_EQ(check(kCmdCache, 0, 4096, kCmdFlagFua), 0u);
  EXPECT_EQ(check(kCmdWriteZeroes, 0, 4096, kCmdFlagFua), 0u);
  EXPECT_EQ(check(kCmdBlockStatus, 0, 4096, kCmdFlagFua), 0u);
  EXPECT_EQ(check(kCmdBlockStatus, 0, 4096, kCmdFlagFua | kCmdFlagReqOne), 0u);
  EXPECT_EQ(check(kCmdBlockStatus, 0, 4096, kCmdFlagFua | kCmdFlagNoHole), kErrInval) << "only FUA is valid everywhere";

  limits.tx_flags &= static_cast<uint16_t>(~kTxSendFua);
  for (uint16_t type : {kCmdRead, kCmdWrite, kCmdTrim, kCmdCache, kCmdWriteZeroes, kCmdBlockStatus}) {
    EXPECT_EQ(check(type, 0, 4096, kCmdFlagFua), kErrInval) << command_name(type) << ": FUA not advertised";
  }
  EXPECT_EQ(check(kCmdFlush, 0, 0, kCmdFlagFua), kErrInval) << "flush: FUA not advertised";
}

TEST_F(Validate, MalformedRequestsAreInvalid) {
  EXPECT_EQ(check(42, 0, 512), kErrInval) << "unknown command";
  EXPECT_EQ(check(kCmdDisc, 0, 0), kErrInval);
  EXPECT_EQ(check(kCmdRead, 0, 512, 0x80), kErrInval) << "unknown flag";
  EXPECT_EQ(check(kCmdRead, 0, 512, kCmdFlagReqOne), kErrInval) << "REQ_ONE on a read";
  EXPECT_EQ(check(kCmdWrite, 0, 512, kCmdFlagNoHole), kErrInval) << "NO_HOLE on a write";
  EXPECT_EQ(check(kCmdWriteZeroes, 0, 512, kCmdFlagFastZero), kErrInval) << "FAST_ZERO not advertised";
  EXPECT_EQ(check(kCmdRead, 1 << 30, 512), kErrInval) << "past the end";
  // Past the end, writes get ENOSPC (the spec's advice; nbdkit 1.32 answers
  // so, qemu-nbd 7.2 EINVAL); every other command EINVAL, as both answer.
  EXPECT_EQ(check(kCmdWrite, 1 << 30, 512), kErrNoSpc) << "write past the end";
  EXPECT_EQ(check(kCmdWriteZeroes, (1 << 30) - 512, 1024), kErrNoSpc) << "write-zeroes straddling the end";
  EXPECT_EQ(check(kCmdWrite, UINT64_MAX - 511, 1024), kErrNoSpc) << "write: offset + length overflows";
  EXPECT_EQ(check(kCmdTrim, 1 << 30, 512), kErrInval) << "trim past the end";
  EXPECT_EQ(check(kCmdCache, 1 << 30, 512), kErrInval) << "cache past the end";
  EXPECT_EQ(check(kCmdBlockStatus, 1 << 30, 512), kErrInval) << "block status past the end";
  EXPECT_EQ(check(kCmdRead, UINT64_MAX - 511, 1024), kErrInval) << "offset + length overflows";
  EXPECT_EQ(check(kCmdRead, 0, 0), kErrInval) << "zero length";
  EXPECT_EQ(check(kCmdRead, 100, 512), kErrInval) << "misaligned";
  EXPECT_EQ(check(kCmdRead, 0, (1 << 25) + 512), kErrInval) << "larger than the maximum";
  EXPECT_EQ(check(kCmdRead, 0, (1 << 25) + 512, kCmdFlagDf), kErrOverflow);
  EXPECT_EQ(check(kCmdFlush, 512, 0), kErrInval);
}

TEST_F(Validate, UnadvertisedCommandsAndReadOnly) {
  limits.tx_flags = kTxHasFlags;
  EXPECT_EQ(check(kCmdTrim, 0, 512), kErrInval);
  EXPECT_EQ(check(kCmdCache, 0, 512), kErrInval);
  EXPECT_EQ(check(kCmdWrite, 0, 512, kCmdFlagFua), kErrInval) << "FUA not advertised";
  limits.tx_flags = kTxHasFlags | kTxReadOnly;
  EXPECT_EQ(check(kCmdWrite, 0, 512), kErrPerm);
  EXPECT_EQ(check(kCmdTrim, 0, 512), kErrPerm);
  EXPECT_EQ(check(kCmdWriteZeroes, 0, 512), kErrPerm);
  EXPECT_EQ(check(kCmdRead, 0, 512), 0u);
  limits.has_meta_contexts = false;
  EXPECT_EQ(check(kCmdBlockStatus, 0, 512), kErrInval) << "no meta context negotiated";
}

// What each decoder accepts, encoded again. Every decoder takes exactly the
// bytes of one message, so an accepted input must re-encode to itself: a
// decoder that skipped trailing bytes, misread a length or a field would not.
Bytes reencode_info(const InfoRequest& r) {
  Bytes out;
  put_u32(out, static_cast<uint32_t>(r.export_name.size()));
  put_bytes(out, r.export_name);
  put_u16(out, static_cast<uint16_t>(r.requests.size()));
  for (uint16_t type : r.requests) put_u16(out, type);
  return out;
}

Bytes reencode_meta(const MetaContextRequest& r) {
  Bytes out;
  put_u32(out, static_cast<uint32_t>(r.export_name.size()));
  put_bytes(out, r.export_name);
  put_u32(out, static_cast<uint32_t>(r.queries.size()));
  for (const auto& q : r.queries) {
    put_u32(out, static_cast<uint32_t>(q.size()));
    put_bytes(out, q);
  }
  return out;
}

// Mostly well-formed messages with one random defect (or none): a length or
// count off by a little, a byte flipped, truncated, or extended. Pure random
// bytes would almost never get past the first length field.
class Mutator {
 public:
  explicit Mutator(unsigned seed) : rng_(seed) {}
  Bytes info_or_meta(bool meta) {
    Bytes b;
    const uint32_t name = rng_() % 6;
    put_u32(b, name);
    for (uint32_t i = 0; i < name; ++i) b.push_back(static_cast<uint8_t>('a' + rng_() % 26));
    const uint32_t count = rng_() % 4;
    if (meta) {
      put_u32(b, count);
      for (uint32_t i = 0; i < count; ++i) {
        const uint32_t len = rng_() % 5;
        put_u32(b, len);
        for (uint32_t j = 0; j < len; ++j) b.push_back(static_cast<uint8_t>(rng_()));
      }
    } else {
      put_u16(b, static_cast<uint16_t>(count));
      for (uint32_t i = 0; i < count; ++i) put_u16(b, static_cast<uint16_t>(rng_() % 5));
    }
    return damage(std::move(b));
  }
  Bytes header(size_t size, uint64_t magic, int magic_bytes) {
    Bytes b;
    for (int i = magic_bytes - 1; i >= 0; --i) b.push_back(static_cast<uint8_t>(magic >> (8 * i)));
    while (b.size() < size) b.push_back(static_cast<uint8_t>(rng_()));
    return damage(std::move(b));
  }
  // The last message was left well-formed.
  bool intact() const { return intact_; }

 private:
  Bytes damage(Bytes b) {
    const unsigned defect = rng_() % 5;
    intact_ = defect == 0;
    switch (defect) {
      case 0: break;
      case 1:
        if (!b.empty()) b[rng_() % b.size()] ^= static_cast<uint8_t>(1 + rng_() % 255);
        break;
      case 2: b.resize(rng_() % (b.size() + 1)); break;
      case 3: b.push_back(static_cast<uint8_t>(rng_())); break;
      case 4:  // a small count or length
        if (b.size() >= 4) b[3] = static_cast<uint8_t>(rng_() % 8);
        break;
    }
    return b;
  }
  std::mt19937 rng_;
  bool intact_ = true;
};

TEST(WireCodec, DecodersAcceptExactlyWhatReencodesToTheInput) {
  Mutator gen(12345);
  int accepted = 0, rejected = 0;
  auto tally = [&](bool ok) { ++(ok ? accepted : rejected); };
  for (int i = 0; i < 20000; ++i) {
    const Bytes info = gen.info_or_meta(false);
    if (auto r = decode_info_request(info)) {
      ASSERT_EQ(reencode_info(*r), info) << "INFO request, case " << i;
      tally(true);
    } else {
      ASSERT_FALSE(gen.intact()) << "a well-formed INFO request was refused, case " << i;
      tally(false);
    }
    const Bytes meta = gen.info_or_meta(true);
    if (auto r = decode_meta_context_request(meta)) {
      ASSERT_EQ(reencode_meta(*r), meta) << "meta context request, case " << i;
      tally(true);
    } else {
      ASSERT_FALSE(gen.intact()) << "a well-formed meta context request was refused, case " << i;
      tally(false);
    }
    const Bytes option = gen.header(kOptionHeaderSize, kIHaveOpt, 8);
    if (auto h = decode_option_header(option)) {
      Bytes again;
      put_u64(again, kIHaveOpt);
      put_u32(again, h->option);
      put_u32(again, h->length);
      ASSERT_EQ(again, option) << "option header, case " << i;
      tally(true);
    } else {
      ASSERT_TRUE(option.size() != kOptionHeaderSize || ByteReader(option).u64() != kIHaveOpt)
          << "a well-formed option header was refused, case " << i;
      tally(false);
    }
    const Bytes request = gen.header(kRequestHeaderSize, kRequestMagic, 4);
    if (auto h = decode_request_header(request)) {
      Bytes again;
      encode_request_header(again, *h);
      ASSERT_EQ(again, request) << "request header, case " << i;
      tally(true);
    } else {
      ASSERT_TRUE(request.size() != kRequestHeaderSize || ByteReader(request).u32() != kRequestMagic)
          << "a well-formed request header was refused, case " << i;
      tally(false);
    }
  }
  // Both outcomes must be common, or the loop above tested nothing.
  EXPECT_GT(accepted, 10000);
  EXPECT_GT(rejected, 10000);
}

}  // namespace
}  // namespace bscache::wire
