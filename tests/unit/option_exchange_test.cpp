// bscache's own option haggling with upstream (what open_wire_upstream does
// on libnbd's option-mode socket): NBD_OPT_EXTENDED_HEADERS accepted or
// refused, and NBD_OPT_GO's infos read into UpstreamInfo. The "server" is the
// other end of a socketpair, its replies written before the client asks
// (they fit the socket's buffer), encoded by bscache's own server side.
#include "proxy/upstream/option_exchange.hpp"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <stdexcept>
#include <string>
#include <utility>

#include "proxy/wire/codec.hpp"
#include "proxy/wire/protocol.hpp"

namespace bscache::proxy {
namespace {

using namespace wire;

struct SocketPair {
  SocketPair() { EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, fds.data()), 0); }
  ~SocketPair() {
    ::close(fds[0]);
    ::close(fds[1]);
  }
  SocketPair(const SocketPair&) = delete;
  SocketPair& operator=(const SocketPair&) = delete;
  int client() const { return fds[0]; }
  void serve(const Bytes& replies) const {
    ASSERT_EQ(::send(fds[1], replies.data(), replies.size(), 0), static_cast<ssize_t>(replies.size()));
  }
  // What the client sent: one option request.
  std::pair<OptionHeader, Bytes> request() const {
    Bytes bytes(4096);
    const ssize_t n = ::recv(fds[1], bytes.data(), bytes.size(), 0);
    EXPECT_GE(n, static_cast<ssize_t>(kOptionHeaderSize));
    bytes.resize(static_cast<size_t>(n));
    const auto header = decode_option_header(ByteSpan(bytes.data(), kOptionHeaderSize));
    EXPECT_TRUE(header);
    return {*header, Bytes(bytes.begin() + kOptionHeaderSize, bytes.end())};
  }
  std::array<int, 2> fds{-1, -1};
};

TEST(OptionExchange, ExtendedHeadersAcceptedOrRefused) {
  {
    SocketPair pair;
    Bytes replies;
    encode_option_reply(replies, kOptExtendedHeaders, kRepAck);
    pair.serve(replies);
    OptionExchange exchange(pair.client(), "test");
    EXPECT_TRUE(negotiate_extended_headers(exchange));
    const auto [header, payload] = pair.request();
    EXPECT_EQ(header.option, kOptExtendedHeaders);
    EXPECT_TRUE(payload.empty()) << "the option takes no payload";
  }
  {
    SocketPair pair;  // nbdkit 1.32
    Bytes replies;
    encode_option_reply(replies, kOptExtendedHeaders, kRepErrUnsup, "unknown option");
    pair.serve(replies);
    OptionExchange exchange(pair.client(), "test");
    EXPECT_FALSE(negotiate_extended_headers(exchange));
  }
  {
    SocketPair pair;  // a reply to another option is no answer
    Bytes replies;
    encode_option_reply(replies, kOptGo, kRepAck);
    pair.serve(replies);
    OptionExchange exchange(pair.client(), "test");
    EXPECT_THROW(negotiate_extended_headers(exchange), std::runtime_error);
  }
}

TEST(OptionExchange, GoReadsTheExportUpstreamDescribes) {
  SocketPair pair;
  Bytes replies;
  encode_info_export(replies, kOptGo, uint64_t{17} << 30,
                     kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendTrim | kTxSendWriteZeroes | kTxCanMultiConn |
                         kTxSendCache | kTxSendFastZero | kTxSendDf);
  encode_info_block_size(replies, kOptGo, 512, 4096, 32 << 20);
  encode_option_reply(replies, kOptGo, 77, "a reply type from the future");
  encode_info_name(replies, kOptGo, "canonical");
  encode_info_description(replies, kOptGo, "a disk");
  encode_option_reply(replies, kOptGo, kRepAck);
  pair.serve(replies);
  OptionExchange exchange(pair.client(), "test");
  const UpstreamInfo info = go_on_socket(exchange, "disk0");
  const auto [header, payload] = pair.request();
  EXPECT_EQ(header.option, kOptGo);
  const auto asked = decode_info_request(payload);
  ASSERT_TRUE(asked);
  EXPECT_EQ(asked->export_name, "disk0");
  EXPECT_NE(std::find(asked->requests.begin(), asked->requests.end(), kInfoBlockSize), asked->requests.end());
  EXPECT_EQ(info.size, uint64_t{17} << 30);
  EXPECT_TRUE(info.can_flush && info.can_fua && info.can_trim && info.can_zero && info.can_multi_conn &&
              info.can_cache && info.can_fast_zero && info.can_df);
  EXPECT_FALSE(info.read_only || info.rotational);
  EXPECT_TRUE(info.advertises_block_size);
  EXPECT_EQ(info.min_block, 512u);
  EXPECT_EQ(info.preferred_block, 4096u);
  EXPECT_EQ(info.max_block, 32u << 20);
  EXPECT_EQ(info.export_name, "canonical");
  EXPECT_EQ(info.description, "a disk");
  EXPECT_TRUE(info.contexts.empty()) << "this GO selects no meta context";
}

TEST(OptionExchange, GoRefusedOrIncompleteThrows) {
  {
    SocketPair pair;
    Bytes replies;
    encode_option_reply(replies, kOptGo, kRepErrUnknown, "no such export");
    pair.serve(replies);
    OptionExchange exchange(pair.client(), "test");
    try {
      go_on_socket(exchange, "nope");
      FAIL() << "a refused GO must throw";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("no such export"), std::string::npos) << e.what();
    }
  }
  {
    SocketPair pair;  // transmission without NBD_INFO_EXPORT: no size, no flags
    Bytes replies;
    encode_option_reply(replies, kOptGo, kRepAck);
    pair.serve(replies);
    OptionExchange exchange(pair.client(), "test");
    EXPECT_THROW(go_on_socket(exchange, ""), std::runtime_error);
  }
}

}  // namespace
}  // namespace bscache::proxy
