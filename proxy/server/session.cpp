#include "proxy/server/session.hpp"

#include <spdlog/spdlog.h>

#include <array>

#include <boost/asio/post.hpp>

#include "proxy/server/handshake_driver.hpp"

namespace bscache::proxy {

using namespace wire;

namespace {
// A WRITE longer than we accept is read and thrown away up to this size so
// the connection survives; beyond it the client is not speaking NBD sanely.
constexpr uint64_t kMaxDiscard = uint64_t{256} * 1024 * 1024;
// Requests handled in a row from what one read brought before the session
// lets other clients' work run (their replies, their requests): a client
// pipelining hits must not hold the loop for a whole read-ahead.
constexpr unsigned kRequestsPerTurn = 32;
}  // namespace

Session::Session(ProxyContext& context, Socket socket, uint64_t id)
    : ctx_(context),
      stream_(std::move(socket)),
      id_(id),
      writer_(stream_, id, context.memory,
              {.start_drain = [this] { asio::co_spawn(ctx_.io, drain_replies(), asio::detached); },
               .progress = [this] { writer_progress(); }}),
      wakeup_(context.io) {}

awaitable<void> Session::run() {
  auto self = shared_from_this();
  try {
    auto negotiated = co_await negotiate(stream_, ctx_.exports, id_, ctx_.limits.handshake_timeout, ctx_.tls);
    if (negotiated) {
      export_ = std::move(negotiated->chosen);
      Export& chosen = **export_;
      upstream_ = &chosen.upstream();
      block_status_ = &chosen.block_status();
      metrics_ = &chosen.metrics();
      info_ = chosen.info();
      negotiated_ = std::move(negotiated->negotiated);
      limits_ = transmission_limits(info_, negotiated_);
      align_ = limits_.min_block < info_.min_block ? info_.min_block : 1;
      // Spliced data leaves as OFFSET_DATA/OFFSET_HOLE chunks in the order
      // upstream sent them, which needs structured replies, and bypasses
      // user space, which TLS cannot.
      splice_reads_ = ctx_.pipes && !stream_.tls() && negotiated_.structured_replies;
      splice_writes_ = ctx_.pipes && !stream_.tls();
      block_status_client_ = {.offered = &info_,
                              .selected = negotiated_.contexts,
                              .align = align_,
                              .extended_headers = negotiated_.extended_headers};
      spdlog::debug("connection {}: transmission, structured replies {}, extended headers {}, {} meta contexts", id_,
                    negotiated_.structured_replies, negotiated_.extended_headers, negotiated_.contexts.size());
      // Replies held back while requests already read are answered (see
      // transmission) leave before the session waits for more.
      stream_.read_ahead();
      stream_.before_wait([this] {
        requests_this_turn_ = 0;
        writer_.uncork();
      });
      co_await transmission();
    }
  } catch (const boost::system::system_error& e) {
    // A client that hangs up while we write its handshake replies (libnbd does
    // after a refusal) has simply left.
    const auto& ec = e.code();
    const bool left = ec == asio::error::broken_pipe || ec == asio::error::connection_reset || ec == asio::error::eof;
    if (left) spdlog::debug("connection {}: client left: {}", id_, ec.message());
    if (!left) spdlog::warn("connection {}: {}", id_, e.what());
  } catch (const std::exception& e) {
    spdlog::warn("connection {}: {}", id_, e.what());
  }
  cancelled_->store(true);
  stream_.close();
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
  if (!stopping_ || in_flight_ > 0 || !writer_.idle()) return;
  stream_.close();
}

size_t request_charge(uint16_t type, uint64_t length) {
  if (type != kCmdRead && type != kCmdWrite) return ClientMemory::kRequestCharge;
  // A buffer's size class, or pipe pages (one more per pipe for a partly filled one).
  return ClientMemory::kRequestCharge + PooledBuffer::footprint(length) + 4096;
}

// Back-pressure: too many requests in flight, or too many bytes held for
// this client (requests in flight plus replies it has not read yet).
bool Session::must_wait() const {
  return in_flight_ >= ctx_.limits.max_in_flight ||
         held_in_flight_ + writer_.backlog_bytes() >= ctx_.limits.max_backlog_bytes;
}

// Whether this client may take `more` bytes now: within its own limits
// (before a new request is read) and within what all clients may hold
// together. If not, the wake-up timer is what to wait on. No coroutine: this
// runs before every request, and the answer is almost always yes.
bool Session::room_for(size_t more, bool new_request) {
  if (new_request && must_wait()) {
    // Waiting for itself, not for memory: no place in the queue for room.
    if (memory_waiter_.is_linked()) ctx_.memory.went(memory_waiter_);
    return false;
  }
  const auto verdict = ctx_.memory.admit(memory_waiter_, held_in_flight_ + writer_.backlog_bytes(), more);
  if (verdict == ClientMemory::Verdict::Go) {
    paused_by_total_ = false;
    if (memory_waiter_.is_linked()) ctx_.memory.went(memory_waiter_);
    return true;
  }
  if (!paused_by_total_) ctx_.memory.count_pause();
  paused_by_total_ = true;
  ctx_.memory.wait(memory_waiter_, verdict, more);
  return false;
}

awaitable<void> Session::transmission() {
  std::array<uint8_t, kExtendedRequestHeaderSize> header_bytes{};
  const auto header =
      std::span(header_bytes).first(negotiated_.extended_headers ? kExtendedRequestHeaderSize : kRequestHeaderSize);
  // False when the client vanished (EOF or error mid-stream, no DISC): then
  // nobody waits for the answers to what it still has in flight.
  bool orderly = true;
  while (!writer_.broken()) {
    while (!writer_.broken() && !room_for(ClientMemory::kRequestCharge, true)) {
      // Replies held back are counted as this client's: once they are out
      // there may be room, and nothing else would wake the session for that.
      if (writer_.uncork()) continue;
      co_await wait_for_wakeup();
    }
    if (writer_.broken()) break;
    if (requests_this_turn_ >= kRequestsPerTurn && stream_.buffered() > 0) {
      writer_.uncork();
      requests_this_turn_ = 0;
      co_await asio::post(ctx_.io, use_awaitable);
    }
    // A client with several requests in this turn is pipelining: see whether
    // more came before its replies go out and the session waits.
    if (stream_.buffered() == 0 && requests_this_turn_ > 1) stream_.read_now();
    if (!co_await stream_.read_exact(header)) {
      orderly = false;
      break;
    }
    auto request =
        negotiated_.extended_headers ? decode_extended_request_header(header) : decode_request_header(header);
    if (!request) {
      spdlog::warn("connection {}: bad request magic, closing", id_);
      break;
    }
    if (request->type < kOpCount) ++metrics_->client_requests[request->type];
    spdlog::debug("connection {}: {} cookie={:#x} offset={} length={} flags={:#x}", id_, command_name(request->type),
                  request->cookie, request->offset, request->length, request->flags);
    if (request->type == kCmdDisc) break;  // the spec: finish what is in flight, then close
    // Which requests carry data after the header: every WRITE, and with
    // extended headers any other that says so. (The spec wants a WRITE to
    // say so too; qemu's client does not, and qemu-nbd takes it as written.)
    const bool has_payload =
        request->type == kCmdWrite || (negotiated_.extended_headers && (request->flags & kCmdFlagPayloadLen) != 0);
    if (has_payload && request->type != kCmdWrite) {
      const bool complete = co_await read_command_payload(*request);
      if (!complete) {
        orderly = false;
        break;
      }
    }

    // A READ or WRITE is charged its buffer before one is taken (a WRITE's
    // payload is read into it whether or not the request is valid).
    const bool valid = !stopping_ && validate_request(*request, limits_) == 0;
    size_t charged = 0;
    if ((valid && request->type == kCmdRead) ||
        (request->type == kCmdWrite && has_payload && request->length <= limits_.max_payload)) {
      const size_t charge = request_charge(request->type, request->length);
      while (!writer_.broken() && !room_for(charge, false)) {
        if (writer_.uncork()) continue;  // as above
        co_await wait_for_wakeup();
      }
      if (writer_.broken()) break;
      hold(charge);
      charged = charge;
    }
    WritePayload payload;
    if (request->type == kCmdWrite && has_payload) {
      if (request->length > limits_.max_payload) {
        if (request->length > kMaxDiscard || !co_await stream_.discard(request->length)) {
          spdlog::warn("connection {}: write of {} bytes is too large, closing", id_, request->length);
          orderly = false;
          break;
        }
      } else {
        const bool complete = co_await read_write_payload(request->length, payload);
        if (!complete) {
          unhold(charged);
          orderly = false;
          break;
        }
      }
    }
    // Replies answered inline wait for the others of this read (see before_wait).
    writer_.cork();
    ++requests_this_turn_;
    dispatch(*request, std::move(payload), charged);
  }
  writer_.uncork();
  if (!orderly || writer_.broken()) cancelled_->store(true);
  // Let requests in flight finish and their replies go out.
  while (in_flight_ > 0 || !writer_.idle()) {
    co_await wait_for_wakeup();
  }
}

// Into pipes that upstream's socket will be spliced from, or straight into
// the buffer that upstream will be sent from. False: the client is gone.
awaitable<bool> Session::read_write_payload(size_t length, WritePayload& payload) {
  if (splice_writes_ && length <= PipePool::kMaxPayload && upstream_->splices()) {
    payload.pipes = ctx_.pipes->acquire_for(length);
  }
  size_t spliced = 0;
  if (!payload.pipes.empty()) {
    const std::vector<int> sinks = write_ends(payload.pipes);
    const auto moved = co_await stream_.splice_in(sinks, length);
    if (!moved) co_return false;
    if (*moved == length) {
      payload.in_pipes = length;
      co_return true;
    }
    // A pipe filled up early: what is in the pipes moves to a buffer (a copy), the rest follows it there.
    spliced = *moved;
  }
  payload.buffer = ctx_.buffers.acquire(length);
  if (spliced > 0 && !PipePool::copy_out(payload.pipes, payload.buffer.span().first(spliced))) {
    co_return false;
  }
  payload.pipes.clear();
  const bool complete = co_await stream_.read_exact(payload.buffer.span().subspan(spliced));
  co_return complete;
}

// `charged`: what the caller already holds for this request (a READ's or
// WRITE's buffer, see transmission()); answered here, it is given back.
void Session::dispatch(const RequestHeader& request, WritePayload payload, size_t charged) {
  if (stopping_) {
    unhold(charged);
    reply_error(request, kErrShutdown, "server is shutting down");
    return;
  }
  if (uint32_t error = validate_request(request, limits_)) {
    unhold(charged);
    reply_error(request, error, "invalid request");
    return;
  }
  if (request.type == kCmdBlockStatus) {
    Bytes chunks;
    if (block_status_->try_answer(block_status_client_, request, chunks)) {
      unhold(charged);
      writer_.send(head_only(std::move(chunks)));
      return;
    }
  }
  const size_t held = request_charge(request.type, request.length);
  hold(held - charged);
  ++in_flight_;
  asio::co_spawn(ctx_.io, serve(request, std::move(payload), held), asio::detached);
}

void Session::hold(size_t bytes) {
  held_in_flight_ += bytes;
  ctx_.memory.charge(bytes);
}

void Session::unhold(size_t bytes) {
  held_in_flight_ -= bytes;
  ctx_.memory.release(bytes);
}

void Session::request_done(size_t held_bytes) {
  --in_flight_;
  unhold(held_bytes);
  wakeup_.notify();
  close_when_idle();
}

awaitable<void> Session::drain_replies() {
  auto self = shared_from_this();
  co_await writer_.drain();
}

void Session::writer_progress() {
  if (writer_.broken()) cancelled_->store(true);  // nobody will read what upstream sends
  wakeup_.notify();
  close_when_idle();
}

awaitable<void> Session::wait_for_wakeup() {
  writer_.uncork();
  return wakeup_.wait();
}

}  // namespace bscache::proxy
