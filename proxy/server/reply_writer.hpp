// ReplyWriter: everything a session sends in transmission, in one queue.
//
// A Reply is a few header bytes plus, for READ, a view of the pooled buffer
// upstream read the data into; it leaves in one gathered write (writev), so
// the payload is never copied to put a header in front of it. Or, for a READ
// spliced through pipes (see PipePool), header pieces and pipe pieces: the
// headers leave by writev, the pipes' bytes by splice, in order. Small replies
// to an idle socket are written at once, without a trip through the reactor,
// unless the writer is corked: the session answers the requests it read in
// one go (cache hits, refusals) corked, and uncorks before it waits, so their
// replies leave in one write. Anything that does not fit in the socket buffer
// waits in the queue, whose unsent bytes are the session's reply backlog (see
// SessionLimits).
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <vector>

#include <boost/asio/buffer.hpp>
#include <boost/container/small_vector.hpp>

#include "proxy/io/asio.hpp"
#include "proxy/io/buffer_pool.hpp"
#include "proxy/io/client_memory.hpp"
#include "proxy/io/pipe_pool.hpp"
#include "proxy/server/client_stream.hpp"
#include "proxy/wire/codec.hpp"

namespace bscache::proxy {

class Reply {
 public:
  Reply() = default;
  // small_vector's move is not declared noexcept, but moving trivially
  // copyable pieces (inline) or stealing its heap block cannot throw.
  Reply(Reply&&) noexcept = default;             // NOLINT(bugprone-exception-escape)
  Reply& operator=(Reply&&) noexcept = default;  // NOLINT(bugprone-exception-escape)

  // Header bytes are appended here by the wire encoders.
  wire::Bytes& head() { return head_; }
  // Marks head()[from, end) as the next piece of the reply.
  void add_head_piece(size_t from);
  // Marks payload()[offset, offset + length) as the next piece.
  void add_payload_piece(size_t offset, size_t length);
  // Takes the buffer the payload pieces point into.
  void set_payload(PooledBuffer payload) { payload_ = std::move(payload); }
  // The next `length` bytes of pipe `index` (see set_pipes) are the next piece.
  void add_pipe_piece(size_t index, size_t length);
  // Takes the pipes the pipe pieces come from.
  void set_pipes(std::vector<PooledPipe> pipes) { pipes_ = std::move(pipes); }

  // Bytes to send.
  size_t size() const { return size_; }
  // Bytes the reply keeps alive until it is sent, as the allocator and the
  // kernel take them: the heap blocks of its header bytes and piece lists,
  // its whole payload buffer (its size class: a 1-byte READ holds 4 KiB, a
  // READ answered with holes sends little of it), and the pages its pipes
  // hold. Not the Reply object itself: the queue holding it counts that.
  size_t memory() const;
  bool has_payload_pieces() const;
  // The unsent part, from byte `sent` on, as buffers for a gathered write, up
  // to the first pipe piece. True if that is the whole rest of the reply.
  bool gather(size_t sent, std::vector<asio::const_buffer>& out) const;
  struct PipeBytes {
    int fd = -1;
    size_t left = 0;
  };
  // If byte `sent` is in a pipe piece: its pipe and the bytes of it left to send.
  PipeBytes pipe_at(size_t sent) const;

 private:
  enum class Source : uint8_t { Head, Payload, Pipe };
  struct Piece {
    Source source;
    size_t offset;  // in head_ or payload_; for Source::Pipe, the pipe's index
    size_t length;
  };
  wire::Bytes head_;
  PooledBuffer payload_;
  std::vector<PooledPipe> pipes_;
  size_t pipe_bytes_ = 0;  // the pipe pieces' lengths
  boost::container::small_vector<Piece, 3> pieces_;
  size_t size_ = 0;
};

// Convenience: a reply that is only header bytes (status, errors, block status).
Reply head_only(wire::Bytes bytes);

class ReplyWriter {
 public:
  struct Hooks {
    std::function<void()> start_drain;  // spawn drain() keeping the session alive
    std::function<void()> progress;     // bytes left the backlog, or the writer broke
  };
  ReplyWriter(ClientStream& stream, uint64_t connection_id, ClientMemory& memory, Hooks hooks);
  ~ReplyWriter();
  ReplyWriter(const ReplyWriter&) = delete;
  ReplyWriter& operator=(const ReplyWriter&) = delete;

  void send(Reply reply);
  awaitable<void> drain();
  // While corked, send() only queues. uncork() writes what is queued;
  // true if there was something to write (so the backlog may have shrunk).
  void cork() { corked_ = true; }
  bool uncork();

  // Memory held by replies queued and not yet fully written: each one's
  // Reply::memory and its place in the queue. Also charged to `memory`.
  size_t backlog_bytes() const { return backlog_bytes_; }
  // What a queued reply holds (Reply::memory plus its place in the queue).
  static size_t held_by(const Reply& reply);
  bool idle() const { return !writing_ && queue_.empty(); }
  // A write failed: the client is gone. Everything queued was dropped.
  bool broken() const { return broken_; }

 private:
  void break_connection(const boost::system::error_code& ec);
  void write_or_drain();
  // Writes queued replies until the socket is full (false) or all are out
  // (true); a failure breaks the connection (false).
  bool write_ready();
  void advance(size_t written);

  struct Queued {  // NOLINT(bugprone-exception-escape): see Reply's move
    Reply reply;
    size_t sent = 0;
  };
  void drop_queue();

  ClientStream& stream_;
  uint64_t id_;
  ClientMemory& memory_;
  Hooks hooks_;
  std::deque<Queued> queue_;
  size_t backlog_bytes_ = 0;
  bool writing_ = false;
  bool corked_ = false;
  bool broken_ = false;
  bool long_queue_ = false;                  // the queue grew long since it was last replaced
  std::vector<asio::const_buffer> buffers_;  // reused by every write
};

}  // namespace bscache::proxy
