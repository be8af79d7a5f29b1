// The wire vocabulary's single homes: byte order, the request encoder, the
// READ chunk encoder, the command flags and the errno <-> NBD error mapping,
// each checked both ways.
#include <gtest/gtest.h>

#include <cerrno>

#include "proxy/wire/byte_order.hpp"
#include "proxy/wire/codec.hpp"
#include "proxy/wire/command_flags.hpp"
#include "proxy/wire/errors.hpp"

namespace bscache::wire {
namespace {

TEST(WireVocabulary, ByteOrderIsBigEndianBothWays) {
  uint8_t bytes[8] = {};
  store_be64(bytes, 0x0102030405060708);
  EXPECT_EQ((std::vector<uint8_t>(bytes, bytes + 8)), (std::vector<uint8_t>{1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(load_be64(bytes), 0x0102030405060708u);
  EXPECT_EQ(load_be32(bytes + 4), 0x05060708u);
  EXPECT_EQ(load_be16(bytes + 6), 0x0708u);
  store_be32(bytes, 0xfffefdfc);
  store_be16(bytes + 4, 0x8001);
  EXPECT_EQ(load_be32(bytes), 0xfffefdfcu);
  EXPECT_EQ(load_be16(bytes + 4), 0x8001u);
  Bytes appended;
  put_u64(appended, 0x0102030405060708);
  EXPECT_EQ(ByteReader(appended).u64(), 0x0102030405060708u);
}

TEST(WireVocabulary, OneRequestEncoderForBothForms) {
  const RequestHeader r{kCmdFlagFua, kCmdWrite, 7, 1 << 20, 4096};
  const RequestBytes fixed = encode_request(r);
  Bytes appended;
  encode_request_header(appended, r);
  EXPECT_EQ(appended, Bytes(fixed.begin(), fixed.end()));
  const auto back = decode_request_header(fixed);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->type, kCmdWrite);
  EXPECT_EQ(back->flags, kCmdFlagFua);
}

TEST(WireVocabulary, ExtendedRequestsCarry64BitLengths) {
  const RequestHeader r{kCmdFlagFua, kCmdWriteZeroes, 7, uint64_t{5} << 30, uint64_t{5} << 30 | 4096};
  const RequestBytes extended = encode_request(r, true);
  ASSERT_EQ(extended.size(), kExtendedRequestHeaderSize);
  EXPECT_FALSE(decode_request_header(ByteSpan(extended.data(), kRequestHeaderSize)));
  const auto back = decode_extended_request_header(extended);
  ASSERT_TRUE(back);
  EXPECT_EQ(back->type, kCmdWriteZeroes);
  EXPECT_EQ(back->flags, kCmdFlagFua);
  EXPECT_EQ(back->cookie, 7u);
  EXPECT_EQ(back->offset, uint64_t{5} << 30);
  EXPECT_EQ(back->length, uint64_t{5} << 30 | 4096);
  Bytes appended;
  encode_request_header(appended, r, true);
  EXPECT_EQ(appended, Bytes(extended.begin(), extended.end()));
  EXPECT_EQ(encode_request(r).size(), kRequestHeaderSize);
}

// What bscache asks in its own NBD_OPT_GO, and the infos a server answers
// (encoded by bscache's own server side), read back.
TEST(WireVocabulary, InfoRequestsAndRepliesRoundTrip) {
  Bytes request;
  const std::vector<uint16_t> infos{kInfoBlockSize, kInfoName};
  encode_info_request(request, "disk0", infos);
  const auto decoded = decode_info_request(request);
  ASSERT_TRUE(decoded);
  EXPECT_EQ(decoded->export_name, "disk0");
  EXPECT_EQ(decoded->requests, infos);

  auto payload_of = [](const Bytes& reply) {
    const auto header = decode_option_reply_header(ByteSpan(reply.data(), kOptionReplyHeaderSize));
    EXPECT_TRUE(header && header->type == kRepInfo && header->option == kOptGo);
    return decode_info_reply(ByteSpan(reply).subspan(kOptionReplyHeaderSize));
  };
  Bytes reply;
  encode_info_export(reply, kOptGo, uint64_t{17} << 30, kTxHasFlags | kTxSendTrim);
  auto info = payload_of(reply);
  ASSERT_TRUE(info);
  EXPECT_EQ(info->type, kInfoExport);
  EXPECT_EQ(info->size, uint64_t{17} << 30);
  EXPECT_EQ(info->tx_flags, kTxHasFlags | kTxSendTrim);
  reply.clear();
  encode_info_block_size(reply, kOptGo, 512, 4096, 32 << 20);
  info = payload_of(reply);
  ASSERT_TRUE(info);
  EXPECT_EQ(info->type, kInfoBlockSize);
  EXPECT_EQ(info->minimum, 512u);
  EXPECT_EQ(info->preferred, 4096u);
  EXPECT_EQ(info->maximum, 32u << 20);
  reply.clear();
  encode_info_name(reply, kOptGo, "canonical");
  info = payload_of(reply);
  ASSERT_TRUE(info);
  EXPECT_EQ(info->text, "canonical");
  // A known type of the wrong size is malformed; an unknown one is passed over.
  const uint8_t short_export[] = {0, 0, 1, 2, 3};
  EXPECT_FALSE(decode_info_reply(short_export));
  const uint8_t unknown[] = {0, 99, 1, 2, 3};
  ASSERT_TRUE(decode_info_reply(unknown));
  EXPECT_EQ(decode_info_reply(unknown)->type, 99);
}

TEST(WireVocabulary, ReadChunksEncodeAsHoleOrDataHeader) {
  Bytes hole, data, expected;
  encode_read_chunk(hole, 9, false, {.offset = 512, .length = 1024, .hole = true});
  encode_offset_hole(expected, 9, false, 512, 1024);
  EXPECT_EQ(hole, expected);
  expected.clear();
  encode_read_chunk(data, 9, true, {.offset = 0, .length = 512, .hole = false});
  encode_offset_data_header(expected, 9, true, 0, 512);
  EXPECT_EQ(data, expected);
}

TEST(WireVocabulary, CommandFlagsRoundTripEveryBit) {
  constexpr uint16_t known = kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf | kCmdFlagReqOne | kCmdFlagFastZero;
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto flags = CommandFlags::from_wire(static_cast<uint16_t>(bits));
    ASSERT_EQ(flags.to_wire(), bits & known) << bits;
    ASSERT_EQ(CommandFlags::from_wire(flags.to_wire()), flags) << bits;
  }
  EXPECT_EQ(CommandFlags{.fua = true}.to_wire(), kCmdFlagFua);
  EXPECT_EQ(CommandFlags{.no_hole = true}.to_wire(), kCmdFlagNoHole);
  EXPECT_EQ(CommandFlags{.fast_zero = true}.to_wire(), kCmdFlagFastZero);
  EXPECT_EQ(CommandFlags{.df = true}.to_wire(), kCmdFlagDf);
  EXPECT_EQ(CommandFlags{.req_one = true}.to_wire(), kCmdFlagReqOne);
}

TEST(WireVocabulary, ErrnoAndNbdErrorsBothWays) {
  for (uint32_t code :
       {0u, kErrPerm, kErrIo, kErrNoMem, kErrInval, kErrNoSpc, kErrOverflow, kErrNotSup, kErrShutdown}) {
    EXPECT_EQ(proxy::nbd_error_from_errno(proxy::errno_from_nbd(code)), code) << code;
  }
  EXPECT_EQ(proxy::errno_from_nbd(kErrShutdown), ESHUTDOWN);
  EXPECT_EQ(proxy::errno_from_nbd(12345), EINVAL);  // not a code the protocol names
  EXPECT_EQ(proxy::nbd_error_from_errno(ECONNRESET), kErrShutdown);
  EXPECT_EQ(proxy::nbd_error_from_errno(EBADF), kErrIo);
}

}  // namespace
}  // namespace bscache::wire
