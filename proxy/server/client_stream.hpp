// ClientStream: a client connection's byte stream, plain or TLS.
//
// Everything a session and its handshake read or write goes through here, so
// they do not know whether the client sent STARTTLS: after start_tls() the
// same calls encrypt and decrypt. Reads return false at an expected end (EOF,
// a closed socket, a failed TLS record), never throw. Writes follow Asio's
// write_some rules: bytes written, or an error (would_block when nothing fits).
//
// In transmission (read_ahead()), a plain stream reads what the socket holds,
// up to kReadAhead bytes, in one call and hands requests out of that: a
// client with 16 requests queued costs one read, not 16. The session, which
// holds back the replies it answers inline meanwhile, is told before the
// stream waits for the client (before_wait), so they leave together in one
// write. Not during the handshake: bytes a client sends after STARTTLS's
// reply belong to the TLS session, which reads the socket itself.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include <boost/asio/buffer.hpp>
#include <boost/asio/generic/stream_protocol.hpp>

#include "proxy/io/asio.hpp"

namespace bscache::proxy {

class TlsServerCredentials;
class TlsSession;

class ClientStream {
 public:
  using Socket = asio::generic::stream_protocol::socket;
  using Buffers = std::span<const asio::const_buffer>;

  explicit ClientStream(Socket socket);
  ~ClientStream();
  ClientStream(const ClientStream&) = delete;
  ClientStream& operator=(const ClientStream&) = delete;

  // Most bytes one read takes ahead of what was asked for. Small: what a
  // WRITE's payload brings into it is copied (the rest is spliced), and a
  // page holds 146 requests (128 with extended headers).
  static constexpr size_t kReadAhead = 4096;

  Socket& socket() { return socket_; }
  bool tls() const { return tls_ != nullptr; }

  // From now on a plain stream reads ahead (see above). Called once the
  // handshake is over; with TLS, GnuTLS already reads whole records.
  void read_ahead();
  // Called whenever a read or splice is about to wait on the socket (it may
  // still find bytes there without waiting).
  void before_wait(std::function<void()> hook) { before_wait_ = std::move(hook); }
  // Bytes read from the socket and not handed out yet.
  size_t buffered() const { return ahead_end_ - ahead_begin_; }
  // When nothing is buffered: reads what the socket holds now, without
  // waiting (one system call, none if nothing is read ahead). For a client
  // that keeps requests in flight, more may have come while the last ones
  // were answered; reading them before the session waits saves the write
  // of the replies so far and the wait itself.
  void read_now();

  awaitable<bool> read_exact(std::span<uint8_t> buffer);
  awaitable<bool> discard(uint64_t length);

  // Writes what fits now, without waiting.
  size_t write_now(Buffers buffers, boost::system::error_code& ec);
  // Moves `length` bytes from the socket into pipes (the write ends of
  // PipePool::acquire_for's), waiting for the client as needed.
  // Returns the bytes moved; fewer than `length` means a pipe filled up
  // early (see PipePool), nullopt that the client is gone.
  awaitable<std::optional<size_t>> splice_in(std::span<const int> pipes, size_t length);
  // Moves up to `n` bytes from a pipe into the socket without waiting
  // (splice: no copy). Plain sockets only, not after STARTTLS.
  size_t splice_now(int pipe_fd, size_t n, boost::system::error_code& ec);
  // Waits until a write can make progress (with TLS, in the direction GnuTLS
  // last asked for). False: the socket closed.
  awaitable<bool> wait_writable() { return wait(!tls_wants_read_); }
  // Waits until something can be written, then writes what fits.
  awaitable<size_t> write_some(Buffers buffers, boost::system::error_code& ec);
  // Throws boost::system::system_error if the peer is gone (as asio::async_write does).
  awaitable<void> write_all(std::span<const uint8_t> bytes);

  // After STARTTLS was acknowledged: the TLS handshake, on the loop. False:
  // the peer failed it or left (logged); close the connection.
  awaitable<bool> start_tls(const TlsServerCredentials& credentials, uint64_t connection_id);

  void shutdown_receive();  // ends a pending read with an EOF
  void close();             // close_notify if TLS, then close

 private:
  awaitable<bool> wait(bool for_write);
  size_t tls_write_now(Buffers buffers, boost::system::error_code& ec);
  // Copies bytes read ahead into `into`; returns how many.
  size_t take_ahead(std::span<uint8_t> into);
  void waiting() {
    if (before_wait_) before_wait_();
  }

  Socket socket_;
  std::unique_ptr<TlsSession> tls_;
  bool tls_wants_read_ = false;     // direction of the last TLS write that could not finish
  std::vector<uint8_t> coalesced_;  // small pieces gathered into one TLS record
  std::vector<uint8_t> ahead_;      // read ahead: kReadAhead bytes once read_ahead() was called
  size_t ahead_begin_ = 0;          // ahead_[ahead_begin_, ahead_end_) is not handed out yet
  size_t ahead_end_ = 0;
  std::function<void()> before_wait_;
};

}  // namespace bscache::proxy
