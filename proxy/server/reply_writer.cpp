#include "proxy/server/reply_writer.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

#include <boost/asio/redirect_error.hpp>

namespace bscache::proxy {

namespace {
// Replies gathered into one writev; Asio passes at most 64 buffers per call anyway.
constexpr size_t kMaxRepliesPerWrite = 32;
}  // namespace

void Reply::add_head_piece(size_t from) {
  const size_t length = head_.size() - from;
  if (length == 0) return;
  const bool extends = !pieces_.empty() && pieces_.back().source == Source::Head &&
                       pieces_.back().offset + pieces_.back().length == from;
  if (extends) {
    pieces_.back().length += length;
  } else {
    pieces_.push_back({Source::Head, from, length});
  }
  size_ += length;
}

void Reply::add_payload_piece(size_t offset, size_t length) {
  if (length == 0) return;
  pieces_.push_back({Source::Payload, offset, length});
  size_ += length;
}

void Reply::add_pipe_piece(size_t index, size_t length) {
  if (length == 0) return;
  pieces_.push_back({Source::Pipe, index, length});
  size_ += length;
  pipe_bytes_ += length;
}

bool Reply::gather(size_t sent, std::vector<asio::const_buffer>& out) const {
  for (const auto& piece : pieces_) {
    if (sent >= piece.length) {
      sent -= piece.length;
      continue;
    }
    if (piece.source == Source::Pipe) return false;
    const uint8_t* base = (piece.source == Source::Payload ? payload_.data() : head_.data()) + piece.offset;
    out.emplace_back(base + sent, piece.length - sent);
    sent = 0;
  }
  return true;
}

Reply::PipeBytes Reply::pipe_at(size_t sent) const {
  for (const auto& piece : pieces_) {
    if (sent < piece.length) {
      if (piece.source != Source::Pipe) return {};
      return {pipes_[piece.offset].read_fd(), piece.length - sent};
    }
    sent -= piece.length;
  }
  return {};
}

bool Reply::has_payload_pieces() const {
  return std::any_of(pieces_.begin(), pieces_.end(), [](const Piece& p) { return p.source != Source::Head; });
}

Reply head_only(wire::Bytes bytes) {
  Reply reply;
  reply.head() = std::move(bytes);
  reply.add_head_piece(0);
  return reply;
}

ReplyWriter::ReplyWriter(ClientStream& stream, uint64_t connection_id, Hooks hooks)
    : stream_(stream), id_(connection_id), hooks_(std::move(hooks)) {}

void ReplyWriter::send(Reply reply) {
  if (broken_) return;  // the client is gone: nobody to tell
  backlog_bytes_ += reply.memory();
  queue_.push_back({std::move(reply), 0});
  if (writing_) return;  // drain() gets to it
  // The common case, a reply to an idle socket: write what fits now. The
  // socket is non-blocking, so a full buffer just leaves the rest queued.
  if (write_ready() || broken_) return;
  writing_ = true;
  hooks_.start_drain();
}

awaitable<void> ReplyWriter::drain() {
  for (;;) {
    if (write_ready() || broken_) break;
    hooks_.progress();
    // (Not in the if's condition: GCC 12 miscompiles a co_await there.)
    const bool writable = co_await stream_.wait_writable();
    if (!writable) {
      break_connection(asio::error::operation_aborted);
      break;
    }
  }
  writing_ = false;
  hooks_.progress();
}

bool ReplyWriter::write_ready() {
  while (!queue_.empty()) {
    boost::system::error_code ec;
    size_t written = 0;
    const Queued& front = queue_.front();
    if (const auto pipe = front.reply.pipe_at(front.sent); pipe.left > 0) {
      written = stream_.splice_now(pipe.fd, pipe.left, ec);
    } else {
      buffers_.clear();
      size_t gathered = 0;
      for (const auto& q : queue_) {
        if (gathered++ == kMaxRepliesPerWrite || !q.reply.gather(q.sent, buffers_)) break;
      }
      written = stream_.write_now(buffers_, ec);
    }
    if (ec == asio::error::would_block || ec == asio::error::try_again) return false;
    if (!ec && written == 0) ec = asio::error::eof;  // a pipe ran dry: its reply cannot be finished
    if (ec) {
      break_connection(ec);
      return false;
    }
    advance(written);
  }
  return true;
}

void ReplyWriter::advance(size_t written) {
  while (written > 0) {
    auto& front = queue_.front();
    const size_t left = front.reply.size() - front.sent;
    if (written < left) {
      front.sent += written;
      return;
    }
    written -= left;
    backlog_bytes_ -= front.reply.memory();
    queue_.pop_front();  // its payload buffer or pipe goes back to the pool
  }
}

void ReplyWriter::break_connection(const boost::system::error_code& ec) {
  spdlog::debug("connection {}: write failed: {}", id_, ec.message());
  broken_ = true;
  queue_.clear();
  backlog_bytes_ = 0;
  stream_.shutdown_receive();  // ends the session's read loop
  hooks_.progress();
}

}  // namespace bscache::proxy
