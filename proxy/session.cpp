#include "proxy/session.hpp"

#include <libnbd.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>

#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/write.hpp>

#include "proxy/errors.hpp"

namespace bscache::proxy {

using namespace wire;

namespace {
// A WRITE longer than we accept is read and thrown away up to this size so
// the connection survives; beyond it the client is not speaking NBD sanely.
constexpr uint64_t kMaxDiscard = 256 * 1024 * 1024;
constexpr uint16_t kMutationFlags = kCmdFlagFua | kCmdFlagNoHole | kCmdFlagFastZero;
// Per-op counters cover the known commands; unknown ones are only logged
// (counting them under some op would break hits + misses = block-status requests).
void count(std::array<uint64_t, kOpCount>& counters, uint16_t type) {
  if (type < kOpCount) ++counters[type];
}
}  // namespace

Session::Session(ProxyContext& context, Socket socket, uint64_t id)
    : ctx_(context), socket_(std::move(socket)), id_(id), wakeup_(context.io) {
  wakeup_.expires_at(asio::steady_timer::time_point::max());
}

awaitable<void> Session::run() {
  auto self = shared_from_this();
  try {
    socket_.non_blocking(true);  // send() writes directly when it can
    if (co_await handshake()) co_await transmission();
  } catch (const std::exception& e) {
    spdlog::warn("connection {}: {}", id_, e.what());
  }
  boost::system::error_code ignored;
  socket_.shutdown(Socket::shutdown_both, ignored);
  socket_.close(ignored);
}

void Session::stop() {
  stopping_ = true;
  close_when_idle();
}

// While stopping, the connection closes once nothing is in flight and every
// reply is out. Not earlier: shutting the read side at once would make the
// client's pending sends fail (EPIPE) and it would never read the replies to
// writes that upstream did complete.
void Session::close_when_idle() {
  if (!stopping_ || in_flight_ > 0 || writing_ || !outbox_.empty()) return;
  boost::system::error_code ignored;
  socket_.shutdown(Socket::shutdown_both, ignored);
  socket_.close(ignored);
}

awaitable<bool> Session::read_exact(std::span<uint8_t> buffer) {
  boost::system::error_code ec;
  co_await asio::async_read(socket_, asio::buffer(buffer.data(), buffer.size()),
                            asio::redirect_error(use_awaitable, ec));
  if (ec && ec != asio::error::eof && ec != asio::error::operation_aborted) {
    spdlog::debug("connection {}: read failed: {}", id_, ec.message());
  }
  co_return !ec;
}

awaitable<bool> Session::discard(uint64_t length) {
  std::array<uint8_t, 64 * 1024> sink{};
  while (length > 0) {
    const size_t piece = std::min<uint64_t>(length, sink.size());
    if (!co_await read_exact(std::span(sink.data(), piece))) co_return false;
    length -= piece;
  }
  co_return true;
}

// ---- Handshake ---------------------------------------------------------------

awaitable<bool> Session::handshake() {
  // A client that never finishes the handshake must not hold a slot forever.
  auto finished = std::make_shared<bool>(false);
  asio::steady_timer deadline(ctx_.io);
  deadline.expires_after(ctx_.limits.handshake_timeout);
  deadline.async_wait([this, finished, self = shared_from_this()](boost::system::error_code ec) {
    if (ec || *finished) return;
    spdlog::warn("connection {}: handshake timed out", id_);
    boost::system::error_code ignored;
    socket_.close(ignored);
  });
  struct CancelOnExit {
    asio::steady_timer& timer;
    std::shared_ptr<bool> finished;
    ~CancelOnExit() {
      *finished = true;
      timer.cancel();
    }
  } cancel_on_exit{deadline, finished};

  Bytes out;
  encode_server_greeting(out, kFlagFixedNewstyle | kFlagNoZeroes);
  co_await asio::async_write(socket_, asio::buffer(out), use_awaitable);

  std::array<uint8_t, 4> flag_bytes{};
  if (!co_await read_exact(flag_bytes)) co_return false;
  const uint32_t client_flags = *ByteReader(flag_bytes).u32();
  if (client_flags & ~(kClientFlagFixedNewstyle | kClientFlagNoZeroes)) {
    spdlog::warn("connection {}: unknown client flags {:#x}, closing", id_, client_flags);
    co_return false;
  }
  if (!(client_flags & kClientFlagFixedNewstyle)) {
    spdlog::warn("connection {}: client does not speak fixed newstyle, closing", id_);
    co_return false;
  }

  Handshake handshake(ctx_.info, client_flags & kClientFlagNoZeroes);
  for (;;) {
    std::array<uint8_t, kOptionHeaderSize> header_bytes{};
    if (!co_await read_exact(header_bytes)) co_return false;
    auto header = decode_option_header(header_bytes);
    if (!header) {
      spdlog::warn("connection {}: bad option magic, closing", id_);
      co_return false;
    }
    out.clear();
    OptionOutcome outcome;
    if (header->length > kMaxOptionLength) {
      spdlog::warn("connection {}: option {} with {} byte payload refused", id_, header->option, header->length);
      if (!co_await discard(header->length)) co_return false;
      outcome = handshake.refuse_oversized(header->option, out);
    } else {
      Bytes payload(header->length);
      if (!co_await read_exact(payload)) co_return false;
      outcome = handshake.handle(header->option, payload, out);
    }
    co_await asio::async_write(socket_, asio::buffer(out), use_awaitable);
    if (outcome == OptionOutcome::Close) co_return false;
    if (outcome == OptionOutcome::Transmission) break;
  }

  negotiated_ = handshake.negotiated();
  limits_ = TransmissionLimits{ctx_.info.size,
                               ctx_.info.tx_flags,
                               ctx_.info.min_block,
                               ctx_.info.max_block,
                               negotiated_.structured_replies,
                               !negotiated_.contexts.empty()};
  only_base_allocation_ =
      negotiated_.contexts.size() == 1 && negotiated_.contexts[0] == static_cast<uint32_t>(ctx_.info.base_allocation);
  spdlog::debug("connection {}: transmission, structured replies {}, {} meta contexts", id_,
                negotiated_.structured_replies, negotiated_.contexts.size());
  co_return true;
}

// ---- Transmission ------------------------------------------------------------

awaitable<void> Session::transmission() {
  auto self = shared_from_this();
  std::array<uint8_t, kRequestHeaderSize> header_bytes{};
  while (!broken_) {
    while (in_flight_ >= ctx_.limits.max_in_flight && !broken_) co_await wait_for_wakeup();
    if (!co_await read_exact(header_bytes)) break;
    auto request = decode_request_header(header_bytes);
    if (!request) {
      spdlog::warn("connection {}: bad request magic, closing", id_);
      break;
    }
    count(ctx_.metrics.client_requests, request->type);
    spdlog::debug("connection {}: {} cookie={:#x} offset={} length={} flags={:#x}", id_, command_name(request->type),
                  request->cookie, request->offset, request->length, request->flags);
    if (request->type == kCmdDisc) break;

    Bytes payload;
    if (request->type == kCmdWrite) {
      if (request->length > limits_.max_payload) {
        if (request->length > kMaxDiscard || !co_await discard(request->length)) {
          spdlog::warn("connection {}: write of {} bytes is too large, closing", id_, request->length);
          break;
        }
      } else {
        payload.resize(request->length);
        if (!co_await read_exact(payload)) break;
      }
    }
    if (stopping_) {
      reply_nbd_error(*request, kErrShutdown, "server is shutting down");
      continue;
    }
    if (uint32_t error = validate_request(*request, limits_)) {
      count(ctx_.metrics.client_errors, request->type);
      reply_nbd_error(*request, error, "invalid request");
      continue;
    }
    if (request->type == kCmdBlockStatus && try_block_status_hit(*request)) continue;
    ++in_flight_;
    asio::co_spawn(ctx_.io, serve(*request, std::move(payload)), asio::detached);
  }
  // Let requests in flight finish and their replies go out.
  while (in_flight_ > 0 || writing_) co_await wait_for_wakeup();
}

awaitable<void> Session::wait_for_wakeup() {
  boost::system::error_code ignored;
  co_await wakeup_.async_wait(asio::redirect_error(use_awaitable, ignored));
}

void Session::request_done() {
  --in_flight_;
  wakeup_.cancel();
  close_when_idle();
}

awaitable<void> Session::serve(RequestHeader request, Bytes payload) {
  auto self = shared_from_this();
  try {
    switch (request.type) {
      case kCmdRead: co_await serve_read(request); break;
      case kCmdWrite:
      case kCmdTrim:
      case kCmdWriteZeroes: co_await serve_mutation(request, payload); break;
      case kCmdFlush: {
        ++ctx_.metrics.upstream_requests[kCmdFlush];
        auto result = co_await ctx_.upstream.flush(0);
        reply_status(request, result.error);
        break;
      }
      case kCmdCache: {
        ++ctx_.metrics.upstream_requests[kCmdCache];
        auto result = co_await ctx_.upstream.cache(request.length, request.offset, 0);
        reply_status(request, result.error);
        break;
      }
      case kCmdBlockStatus: co_await serve_block_status(request); break;
      default: reply_nbd_error(request, kErrInval, "unknown command");
    }
  } catch (const std::exception& e) {
    spdlog::error("connection {}: {} failed: {}", id_, command_name(request.type), e.what());
    reply_nbd_error(request, kErrIo, e.what());
  }
  request_done();
}

awaitable<void> Session::serve_read(const RequestHeader& request) {
  const size_t header = negotiated_.structured_replies ? kStructuredHeaderSize + 8 : kSimpleReplySize;
  // Upstream reads straight into the reply buffer, after room for the header.
  Bytes reply(header + request.length);
  ++ctx_.metrics.upstream_requests[kCmdRead];
  auto result = co_await ctx_.upstream.pread(std::span(reply.data() + header, request.length), request.offset,
                                             request.flags & kCmdFlagDf);
  if (result.error) {
    ++ctx_.metrics.upstream_errors[kCmdRead];
    reply_status(request, result.error);
    co_return;
  }
  Bytes head;
  if (!negotiated_.structured_replies) {
    encode_simple_reply(head, request.cookie, 0);
  } else if (std::any_of(result.chunks.begin(), result.chunks.end(), [](const ReadChunk& c) { return c.hole; })) {
    // Upstream sent holes: pass them on as OFFSET_HOLE chunks (the rare path, so copying is fine).
    std::sort(result.chunks.begin(), result.chunks.end(),
              [](const ReadChunk& a, const ReadChunk& b) { return a.offset < b.offset; });
    Bytes out;
    for (size_t i = 0; i < result.chunks.size(); ++i) {
      const auto& c = result.chunks[i];
      const bool done = i + 1 == result.chunks.size();
      if (c.hole) {
        encode_offset_hole(out, request.cookie, done, c.offset, c.length);
      } else {
        encode_offset_data_header(out, request.cookie, done, c.offset, c.length);
        const auto* data = reply.data() + header + (c.offset - request.offset);
        out.insert(out.end(), data, data + c.length);
      }
    }
    send(std::move(out));
    co_return;
  } else {
    encode_offset_data_header(head, request.cookie, true, request.offset, request.length);
  }
  std::copy(head.begin(), head.end(), reply.begin());
  send(std::move(reply));
}

awaitable<void> Session::serve_mutation(const RequestHeader& request, const Bytes& payload) {
  policy::Mutation kind = request.type == kCmdWrite  ? policy::Mutation::Write
                          : request.type == kCmdTrim ? policy::Mutation::Trim
                                                     : policy::Mutation::WriteZeroes;
  const uint32_t flags = request.flags & kMutationFlags;
  ++ctx_.metrics.upstream_requests[request.type];
  // Taken in the same step that sends the command upstream (see TaintTracker).
  auto ticket = ctx_.block_status.begin_mutation(request.offset, request.length);
  CommandResult result;
  switch (kind) {
    case policy::Mutation::Write: result = co_await ctx_.upstream.pwrite(payload, request.offset, flags); break;
    case policy::Mutation::Trim: result = co_await ctx_.upstream.trim(request.length, request.offset, flags); break;
    case policy::Mutation::WriteZeroes:
      result = co_await ctx_.upstream.zero(request.length, request.offset, flags);
      break;
  }
  ctx_.block_status.end_mutation(ticket, request.offset, request.length, kind, result.error == 0);
  if (result.error) ++ctx_.metrics.upstream_errors[request.type];
  reply_status(request, result.error);
}

bool Session::try_block_status_hit(const RequestHeader& request) {
  if (!only_base_allocation_) return false;
  if (!ctx_.block_status.try_answer(request.offset, request.length, request.flags & kCmdFlagReqOne, descriptors_)) {
    return false;
  }
  ++ctx_.metrics.block_status_hits;
  reply_base_allocation(request, descriptors_);
  return true;
}

awaitable<void> Session::serve_block_status(const RequestHeader& request) {
  if (!only_base_allocation_ || !ctx_.block_status.caching()) {
    co_await serve_passthrough_block_status(request);
    co_return;
  }
  ++ctx_.metrics.block_status_misses;
  std::vector<Descriptor> descriptors;
  int error = co_await ctx_.block_status.answer_after_miss(request.offset, request.length,
                                                           request.flags & kCmdFlagReqOne, descriptors);
  if (error) {
    reply_status(request, error);
  } else {
    reply_base_allocation(request, descriptors);
  }
}

// Contexts other than base:allocation are never cached: ask upstream and
// translate its per-context answer to this client's context ids.
awaitable<void> Session::serve_passthrough_block_status(const RequestHeader& request) {
  ++ctx_.metrics.block_status_misses;
  ++ctx_.metrics.upstream_requests[kCmdBlockStatus];
  const bool req_one = request.flags & kCmdFlagReqOne;
  auto result =
      co_await ctx_.upstream.block_status(request.length, request.offset, req_one ? LIBNBD_CMD_FLAG_REQ_ONE : 0);
  if (result.error) {
    ++ctx_.metrics.upstream_errors[kCmdBlockStatus];
    reply_status(request, result.error);
    co_return;
  }
  Bytes out;
  std::vector<Descriptor> clipped;
  for (size_t i = 0; i < negotiated_.contexts.size(); ++i) {
    const uint32_t context = negotiated_.contexts[i];
    const int upstream_index = ctx_.info.upstream_index[context];
    clipped.clear();
    if (upstream_index < 0) {
      clipped.push_back({request.length, 0});
    } else {
      uint64_t covered = 0;
      for (const auto& d : result.extents[static_cast<size_t>(upstream_index)]) {
        const auto piece = static_cast<uint32_t>(std::min<uint64_t>(d.length, request.length - covered));
        if (piece == 0) break;
        clipped.push_back({piece, d.flags});
        covered += piece;
        if (req_one) break;
      }
    }
    if (clipped.empty()) {
      reply_nbd_error(request, kErrIo, "upstream sent no extents for a selected context");
      co_return;
    }
    encode_block_status_chunk(out, request.cookie, i + 1 == negotiated_.contexts.size(), context + 1, clipped);
  }
  send(std::move(out));
}

void Session::reply_base_allocation(const RequestHeader& request, std::span<const Descriptor> descriptors) {
  Bytes out;
  out.reserve(kStructuredHeaderSize + 4 + 8 * descriptors.size());
  encode_block_status_chunk(out, request.cookie, true, static_cast<uint32_t>(ctx_.info.base_allocation) + 1,
                            descriptors);
  send(std::move(out));
}

void Session::reply_status(const RequestHeader& request, int error) {
  if (error == 0) {
    Bytes out;
    if (negotiated_.structured_replies) {
      encode_done(out, request.cookie);
    } else {
      encode_simple_reply(out, request.cookie, 0);
    }
    send(std::move(out));
    return;
  }
  count(ctx_.metrics.client_errors, request.type);
  reply_nbd_error(request, nbd_error_from_errno(error), strerror(error));
}

void Session::reply_nbd_error(const RequestHeader& request, uint32_t nbd_error, std::string_view message) {
  spdlog::debug("connection {}: {} at {}+{} fails: {}", id_, command_name(request.type), request.offset, request.length,
                message);
  Bytes out;
  if (negotiated_.structured_replies) {
    encode_error_chunk(out, request.cookie, true, nbd_error, message);
  } else {
    encode_simple_reply(out, request.cookie, nbd_error);
  }
  send(std::move(out));
}

// ---- Write queue ---------------------------------------------------------------

void Session::send(Bytes bytes) {
  if (broken_) return;
  if (!writing_ && outbox_.empty()) {
    // The common case, a small reply to an idle socket: write it now,
    // without a coroutine or a trip through the reactor. The socket is in
    // non-blocking mode, so a full buffer just leaves the rest for the queue.
    boost::system::error_code ec;
    const size_t written = socket_.write_some(asio::buffer(bytes), ec);
    if (!ec && written == bytes.size()) {
      close_when_idle();
      return;
    }
    if (ec && ec != asio::error::would_block && ec != asio::error::try_again) {
      spdlog::debug("connection {}: write failed: {}", id_, ec.message());
      broken_ = true;
      boost::system::error_code ignored;
      socket_.shutdown(Socket::shutdown_receive, ignored);
      return;
    }
    outbox_.push_back({std::move(bytes), written});  // the rest goes out from the queue
  } else {
    outbox_.push_back({std::move(bytes), 0});
  }
  if (!writing_) {
    writing_ = true;
    asio::co_spawn(ctx_.io, write_queue(), asio::detached);
  }
}

awaitable<void> Session::write_queue() {
  auto self = shared_from_this();
  std::vector<Outgoing> batch;
  std::vector<asio::const_buffer> buffers;
  while (!outbox_.empty() && !broken_) {
    // Everything queued goes out in one gathered write.
    batch.clear();
    buffers.clear();
    while (!outbox_.empty() && batch.size() < 64) {
      batch.push_back(std::move(outbox_.front()));
      outbox_.pop_front();
    }
    for (const auto& b : batch) buffers.push_back(asio::buffer(b.bytes.data() + b.sent, b.bytes.size() - b.sent));
    boost::system::error_code ec;
    co_await asio::async_write(socket_, buffers, asio::redirect_error(use_awaitable, ec));
    if (ec) {
      spdlog::debug("connection {}: write failed: {}", id_, ec.message());
      broken_ = true;
      outbox_.clear();
      boost::system::error_code ignored;
      socket_.shutdown(Socket::shutdown_receive, ignored);
    }
  }
  writing_ = false;
  wakeup_.cancel();
  close_when_idle();
}

}  // namespace bscache::proxy
