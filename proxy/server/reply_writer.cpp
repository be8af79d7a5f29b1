#include "proxy/server/reply_writer.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

#include <boost/asio/redirect_error.hpp>

namespace bscache::proxy {

namespace {
// Buffers gathered into one writev: Asio passes at most 64 per call.
constexpr size_t kMaxBuffersPerWrite = 64;
// A queue longer than this has grown its deque's map: it is replaced once empty.
constexpr size_t kLongQueue = 1024;
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

size_t Reply::memory() const {
  constexpr size_t kPage = 4096;
  const size_t pipe_pages = pipes_.empty() ? 0 : ((pipe_bytes_ + kPage - 1) / kPage + pipes_.size()) * kPage;
  const size_t pieces_heap =
      pieces_.capacity() > pieces_.static_capacity ? heap_block(pieces_.capacity() * sizeof(Piece)) : 0;
  return heap_block(head_.capacity()) + payload_.capacity() + pipe_pages + pieces_heap +
         heap_block(pipes_.capacity() * sizeof(PooledPipe));
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

// A deque stores its elements in blocks of 512 bytes or one element, plus a
// pointer in its map: a queued reply takes its own size there.
size_t ReplyWriter::held_by(const Reply& reply) {
  return sizeof(Queued) + sizeof(void*) + reply.memory();
}

ReplyWriter::ReplyWriter(ClientStream& stream, uint64_t connection_id, ClientMemory& memory, Hooks hooks)
    : stream_(stream), id_(connection_id), memory_(memory), hooks_(std::move(hooks)) {}

ReplyWriter::~ReplyWriter() {
  drop_queue();
}

void ReplyWriter::drop_queue() {
  std::deque<Queued>().swap(queue_);
  long_queue_ = false;
  memory_.release(backlog_bytes_);
  backlog_bytes_ = 0;
}

void ReplyWriter::send(Reply reply) {
  if (broken_) return;  // the client is gone: nobody to tell
  const size_t held = held_by(reply);
  backlog_bytes_ += held;
  memory_.charge(held);
  queue_.push_back({std::move(reply), 0});
  if (queue_.size() > kLongQueue) long_queue_ = true;
  if (writing_ || corked_) return;  // drain() or uncork() gets to it
  write_or_drain();
}

bool ReplyWriter::uncork() {
  corked_ = false;
  if (writing_ || broken_ || queue_.empty()) return false;
  write_or_drain();
  return true;
}

// The common case, replies to an idle socket: write what fits now. The
// socket is non-blocking, so a full buffer just leaves the rest queued.
void ReplyWriter::write_or_drain() {
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
      for (const auto& q : queue_) {
        if (buffers_.size() >= kMaxBuffersPerWrite || !q.reply.gather(q.sent, buffers_)) break;
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
    const size_t held = held_by(front.reply);
    backlog_bytes_ -= held;
    memory_.release(held);
    queue_.pop_front();  // its payload buffer or pipe goes back to the pool
  }
  // A deque keeps the map of every block it ever had: once a long queue is
  // empty, give that back too.
  if (queue_.empty() && long_queue_) {
    std::deque<Queued>().swap(queue_);
    long_queue_ = false;
  }
}

void ReplyWriter::break_connection(const boost::system::error_code& ec) {
  spdlog::debug("connection {}: write failed: {}", id_, ec.message());
  broken_ = true;
  drop_queue();
  stream_.shutdown_receive();  // ends the session's read loop
  hooks_.progress();
}

}  // namespace bscache::proxy
