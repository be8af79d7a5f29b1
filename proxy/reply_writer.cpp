#include "proxy/reply_writer.hpp"

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
  if (!pieces_.empty() && !pieces_.back().from_payload && pieces_.back().offset + pieces_.back().length == from) {
    pieces_.back().length += length;
  } else {
    pieces_.push_back({false, from, length});
  }
  size_ += length;
}

void Reply::add_payload_piece(size_t offset, size_t length) {
  if (length == 0) return;
  pieces_.push_back({true, offset, length});
  size_ += length;
}

void Reply::gather(size_t sent, std::vector<asio::const_buffer>& out) const {
  for (const auto& piece : pieces_) {
    if (sent >= piece.length) {
      sent -= piece.length;
      continue;
    }
    const uint8_t* base = (piece.from_payload ? payload_.data() : head_.data()) + piece.offset;
    out.emplace_back(base + sent, piece.length - sent);
    sent = 0;
  }
}

bool Reply::has_payload_pieces() const {
  return std::any_of(pieces_.begin(), pieces_.end(), [](const Piece& p) { return p.from_payload; });
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
  size_t sent = 0;
  if (idle()) {
    // The common case, a reply to an idle socket: write what fits now. The
    // socket is non-blocking, so a full buffer just leaves the rest queued.
    buffers_.clear();
    reply.gather(0, buffers_);
    boost::system::error_code ec;
    sent = stream_.write_now(buffers_, ec);
    if (!ec && sent == reply.size()) return;
    if (ec == asio::error::would_block || ec == asio::error::try_again) {
      sent = 0;
    } else if (ec) {
      break_connection(ec);
      return;
    }
  }
  backlog_bytes_ += reply.memory();
  queue_.push_back({std::move(reply), sent});
  if (!writing_) {
    writing_ = true;
    hooks_.start_drain();
  }
}

awaitable<void> ReplyWriter::drain() {
  while (!queue_.empty() && !broken_) {
    buffers_.clear();
    size_t gathered = 0;
    for (const auto& q : queue_) {
      if (gathered++ == kMaxRepliesPerWrite) break;
      q.reply.gather(q.sent, buffers_);
    }
    boost::system::error_code ec;
    size_t written = co_await stream_.write_some(buffers_, ec);
    if (ec) {
      break_connection(ec);
      break;
    }
    while (written > 0) {
      auto& front = queue_.front();
      const size_t left = front.reply.size() - front.sent;
      if (written < left) {
        front.sent += written;
        break;
      }
      written -= left;
      backlog_bytes_ -= front.reply.memory();
      queue_.pop_front();  // its payload buffer goes back to the pool
    }
    hooks_.progress();
  }
  writing_ = false;
  hooks_.progress();
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
