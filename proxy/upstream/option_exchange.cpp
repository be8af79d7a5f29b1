#include "proxy/upstream/option_exchange.hpp"

#include <poll.h>
#include <sys/socket.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "proxy/wire/protocol.hpp"

namespace bscache::proxy {

namespace {
constexpr int kTimeoutMs = 30'000;
// An NBD_REP_INFO or an error message is far shorter (a name or a
// description is 4 KiB at most).
constexpr uint32_t kMaxGoReply = 64 * 1024;
}  // namespace

std::runtime_error OptionExchange::failure(const std::string& why) const {
  return std::runtime_error(what_ + ": " + why);
}

void OptionExchange::wait_for(short events) {
  pollfd p{.fd = fd_, .events = events, .revents = 0};
  int r = 0;
  do {
    r = ::poll(&p, 1, kTimeoutMs);
  } while (r == -1 && errno == EINTR);
  if (r == 0) throw failure("no answer in 30 s");
  if (r == -1) throw failure(std::string("poll: ") + strerror(errno));
}

void OptionExchange::send_all(wire::ByteSpan bytes) {
  while (!bytes.empty()) {
    const ssize_t n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n > 0) {
      bytes = bytes.subspan(static_cast<size_t>(n));
    } else if (n == -1 && (errno == EAGAIN || errno == EINTR)) {
      wait_for(POLLOUT);
    } else {
      throw failure(std::string("send: ") + strerror(errno));
    }
  }
}

void OptionExchange::recv_exact(std::span<uint8_t> into) {
  while (!into.empty()) {
    const ssize_t n = ::recv(fd_, into.data(), into.size(), 0);
    if (n > 0) {
      into = into.subspan(static_cast<size_t>(n));
    } else if (n == 0) {
      throw failure("upstream closed the connection");
    } else if (errno == EAGAIN || errno == EINTR) {
      wait_for(POLLIN);
    } else {
      throw failure(std::string("recv: ") + strerror(errno));
    }
  }
}

void OptionExchange::send(uint32_t option, wire::ByteSpan payload) {
  wire::Bytes request;
  wire::encode_option_request(request, option, payload);
  send_all(request);
}

OptionExchange::Reply OptionExchange::receive(uint32_t option, uint32_t max_length) {
  std::array<uint8_t, wire::kOptionReplyHeaderSize> header_bytes{};
  recv_exact(header_bytes);
  const auto header = wire::decode_option_reply_header(header_bytes);
  if (!header || header->option != option || header->length > max_length) throw failure("malformed reply");
  Reply reply{*header, wire::Bytes(header->length)};
  recv_exact(reply.payload);
  return reply;
}

bool negotiate_extended_headers(OptionExchange& exchange) {
  exchange.send(wire::kOptExtendedHeaders);
  const auto reply = exchange.receive(wire::kOptExtendedHeaders, kMaxGoReply);
  return reply.header.type == wire::kRepAck;
}

namespace {
// NBD_INFO_EXPORT's transmission flags, as libnbd's nbd_can_* read them.
void apply_tx_flags(UpstreamInfo& info, uint16_t f) {
  using namespace wire;
  info.read_only = f & kTxReadOnly;
  info.can_flush = f & kTxSendFlush;
  info.can_fua = f & kTxSendFua;
  info.rotational = f & kTxRotational;
  info.can_trim = f & kTxSendTrim;
  info.can_zero = f & kTxSendWriteZeroes;
  info.can_df = f & kTxSendDf;
  info.can_multi_conn = f & kTxCanMultiConn;
  info.can_cache = f & kTxSendCache;
  info.can_fast_zero = f & kTxSendFastZero;
}
}  // namespace

UpstreamInfo go_on_socket(OptionExchange& exchange, const std::string& export_name) {
  using namespace wire;
  static constexpr std::array<uint16_t, 3> kInfos{kInfoBlockSize, kInfoName, kInfoDescription};
  Bytes request;
  encode_info_request(request, export_name, kInfos);
  exchange.send(kOptGo, request);
  UpstreamInfo info;
  info.export_name = export_name;  // unless upstream names it canonically
  bool described = false;
  for (;;) {
    const auto reply = exchange.receive(kOptGo, kMaxGoReply);
    const uint32_t type = reply.header.type;
    if (type == kRepAck) break;
    if (type & kRepErrBit) {
      throw std::runtime_error("upstream refused the export (NBD_OPT_GO error " + std::to_string(type & ~kRepErrBit) +
                               "): " + std::string(reply.payload.begin(), reply.payload.end()));
    }
    if (type != kRepInfo) continue;  // the spec: a client ignores reply types it does not know
    const auto item = decode_info_reply(reply.payload);
    if (!item) throw std::runtime_error("NBD_OPT_GO: a malformed NBD_REP_INFO from upstream");
    switch (item->type) {
      case kInfoExport:
        info.size = item->size;
        apply_tx_flags(info, item->tx_flags);
        described = true;
        break;
      case kInfoBlockSize:
        info.min_block = item->minimum;
        info.preferred_block = item->preferred;
        info.max_block = item->maximum;
        info.advertises_block_size = true;
        break;
      case kInfoName: info.export_name = item->text; break;
      case kInfoDescription: info.description = item->text; break;
      default: break;
    }
  }
  if (!described) throw std::runtime_error("NBD_OPT_GO: upstream entered transmission without NBD_INFO_EXPORT");
  return info;
}

}  // namespace bscache::proxy
