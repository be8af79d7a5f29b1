// The wire vocabulary's single homes: byte order, checked both ways.
#include <gtest/gtest.h>

#include "proxy/wire/byte_order.hpp"
#include "proxy/wire/codec.hpp"

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

}  // namespace
}  // namespace bscache::wire
