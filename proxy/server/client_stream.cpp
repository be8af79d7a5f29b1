#include "proxy/server/client_stream.hpp"

#include <fcntl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <array>

#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/write.hpp>

#include "proxy/io/pipe_pool.hpp"
#include "proxy/server/tls/tls_server.hpp"

namespace bscache::proxy {

namespace {
// TLS records carry at most 16 KiB of data.
constexpr size_t kMaxRecord = size_t{16} * 1024;
}  // namespace

ClientStream::ClientStream(Socket socket) : socket_(std::move(socket)) {
  // write_now must never block, and GnuTLS reads and writes the descriptor
  // itself; Asio's async operations are unaffected.
  socket_.non_blocking(true);
}

ClientStream::~ClientStream() = default;

void ClientStream::read_ahead() {
  if (!tls_) ahead_.resize(kReadAhead);
}

size_t ClientStream::take_ahead(std::span<uint8_t> into) {
  const size_t n = std::min(into.size(), buffered());
  std::copy_n(ahead_.begin() + static_cast<ptrdiff_t>(ahead_begin_), n, into.begin());
  ahead_begin_ += n;
  return n;
}

void ClientStream::read_now() {
  if (ahead_.empty() || buffered() > 0) return;
  boost::system::error_code ec;
  const size_t n = socket_.read_some(asio::buffer(ahead_), ec);
  // An error (the socket closed meanwhile) is for the next read_exact to find.
  ahead_begin_ = 0;
  ahead_end_ = ec ? 0 : n;
}

awaitable<bool> ClientStream::wait(bool for_write) {
  waiting();
  boost::system::error_code ec;
  co_await socket_.async_wait(for_write ? Socket::wait_write : Socket::wait_read,
                              asio::redirect_error(use_awaitable, ec));
  co_return !ec;
}

awaitable<bool> ClientStream::read_exact(std::span<uint8_t> buffer) {
  if (!tls_) {
    size_t got = take_ahead(buffer);
    boost::system::error_code ec;
    // Asio reads at once where the socket may hold bytes and waits on the
    // reactor only after a read came back short: one system call per read
    // when the client keeps sending.
    while (got < buffer.size() && buffer.size() - got < ahead_.size()) {
      waiting();
      const size_t n = co_await socket_.async_read_some(asio::buffer(ahead_), asio::redirect_error(use_awaitable, ec));
      if (ec) co_return false;
      ahead_begin_ = 0;
      ahead_end_ = n;
      got += take_ahead(buffer.subspan(got));
    }
    if (got == buffer.size()) co_return true;
    // What is left is larger than a read ahead: straight into its place.
    waiting();
    co_await asio::async_read(socket_, asio::buffer(buffer.subspan(got).data(), buffer.size() - got),
                              asio::redirect_error(use_awaitable, ec));
    co_return !ec;
  }
  // GnuTLS may hold decrypted bytes of a record already read, so it is asked
  // first and the socket waited on only when it has nothing.
  size_t got = 0;
  while (got < buffer.size()) {
    TlsResult r = tls_->recv(buffer.subspan(got));
    switch (r.status) {
      case TlsIo::Done: got += r.bytes; break;
      case TlsIo::WantRead:
      case TlsIo::WantWrite:
        if (!co_await wait(r.status == TlsIo::WantWrite)) co_return false;
        break;
      case TlsIo::Closed: co_return false;
      case TlsIo::Failed: spdlog::debug("TLS read failed: {}", tls_->error()); co_return false;
    }
  }
  co_return true;
}

awaitable<bool> ClientStream::discard(uint64_t length) {
  std::array<uint8_t, size_t{64} * 1024> sink;
  while (length > 0) {
    const size_t piece = std::min<uint64_t>(length, sink.size());
    if (!co_await read_exact(std::span(sink.data(), piece))) co_return false;
    length -= piece;
  }
  co_return true;
}

size_t ClientStream::write_now(Buffers buffers, boost::system::error_code& ec) {
  if (tls_) return tls_write_now(buffers, ec);
  return socket_.write_some(buffers, ec);
}

awaitable<std::optional<size_t>> ClientStream::splice_in(std::span<const int> pipes, size_t length) {
  size_t moved = 0;
  // Bytes read ahead are written into the pipes first (a copy of at most kReadAhead).
  while (moved < length && buffered() > 0) {
    const auto share = PipePool::share_at(moved, length);
    const ssize_t n = ::write(pipes[share.index], ahead_.data() + ahead_begin_, std::min(share.bytes, buffered()));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) co_return moved;  // a pipe filled up early, as below
    if (n <= 0) co_return std::nullopt;
    moved += static_cast<size_t>(n);
    ahead_begin_ += static_cast<size_t>(n);
  }
  while (moved < length) {
    const auto share = PipePool::share_at(moved, length);
    const int pipe = pipes[share.index];
    const ssize_t n =
        ::splice(socket_.native_handle(), nullptr, pipe, nullptr, share.bytes, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n > 0) {
      moved += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n == 0 || errno != EAGAIN) co_return std::nullopt;  // EOF mid-payload, or an error
    // Nothing to read yet, or the pipe is full (then it is not writable).
    pollfd room{.fd = pipe, .events = POLLOUT, .revents = 0};
    if (::poll(&room, 1, 0) != 1) co_return moved;
    const bool readable = co_await wait(false);
    if (!readable) co_return std::nullopt;
  }
  co_return moved;
}

size_t ClientStream::splice_now(int pipe_fd, size_t n, boost::system::error_code& ec) {
  ec = {};
  for (;;) {
    const ssize_t moved =
        ::splice(pipe_fd, nullptr, socket_.native_handle(), nullptr, n, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (moved >= 0) return static_cast<size_t>(moved);
    if (errno == EINTR) continue;
    ec =
        errno == EAGAIN ? asio::error::would_block : boost::system::error_code(errno, boost::system::system_category());
    return 0;
  }
}

// Records are cut from the buffers as they come; pieces smaller than a record
// (reply headers, the tail of a payload) are gathered with what follows into
// one record, so a READ reply is not a 16-byte record followed by its data.
// A record GnuTLS took but could not send yet is reported once it is sent,
// and the caller, as with any short write, passes the same bytes again.
size_t ClientStream::tls_write_now(Buffers buffers, boost::system::error_code& ec) {
  ec = {};
  size_t total = 0;
  if (tls_->has_pending_send()) {
    TlsResult r = tls_->send_pending();
    if (r.status != TlsIo::Done) {
      tls_wants_read_ = r.status == TlsIo::WantRead;
      ec = r.status == TlsIo::Failed ? asio::error::broken_pipe : asio::error::would_block;
      return 0;
    }
    total = r.bytes;
  }
  size_t index = 0, offset = total;  // position in `buffers` of the next unsent byte
  auto advance = [&](size_t n) {
    offset += n;
    while (index < buffers.size() && offset >= buffers[index].size()) offset -= buffers[index++].size();
  };
  advance(0);
  while (index < buffers.size()) {
    const auto* first = static_cast<const uint8_t*>(buffers[index].data()) + offset;
    const size_t first_left = buffers[index].size() - offset;
    std::span<const uint8_t> record;
    if (first_left >= kMaxRecord || index + 1 == buffers.size()) {
      record = {first, std::min(first_left, kMaxRecord)};
    } else {
      coalesced_.clear();
      for (size_t i = index, skip = offset; i < buffers.size() && coalesced_.size() < kMaxRecord; ++i, skip = 0) {
        const auto* p = static_cast<const uint8_t*>(buffers[i].data()) + skip;
        const size_t take = std::min(buffers[i].size() - skip, kMaxRecord - coalesced_.size());
        coalesced_.insert(coalesced_.end(), p, p + take);
      }
      record = coalesced_;
    }
    TlsResult r = tls_->send(record);
    if (r.status != TlsIo::Done) {
      tls_wants_read_ = r.status == TlsIo::WantRead;
      if (total == 0) ec = r.status == TlsIo::Failed ? asio::error::broken_pipe : asio::error::would_block;
      if (r.status == TlsIo::Failed) spdlog::debug("TLS write failed: {}", tls_->error());
      return total;
    }
    total += r.bytes;
    advance(r.bytes);
  }
  return total;
}

awaitable<size_t> ClientStream::write_some(Buffers buffers, boost::system::error_code& ec) {
  if (!tls_) {
    size_t n = co_await socket_.async_write_some(buffers, asio::redirect_error(use_awaitable, ec));
    co_return n;
  }
  for (;;) {
    size_t n = tls_write_now(buffers, ec);
    if (ec != asio::error::would_block) co_return n;
    if (!co_await wait(!tls_wants_read_)) {
      ec = asio::error::operation_aborted;
      co_return 0;
    }
  }
}

awaitable<void> ClientStream::write_all(std::span<const uint8_t> bytes) {
  if (!tls_) {
    co_await asio::async_write(socket_, asio::buffer(bytes.data(), bytes.size()), use_awaitable);
    co_return;
  }
  while (!bytes.empty()) {
    boost::system::error_code ec;
    const asio::const_buffer buffer(bytes.data(), bytes.size());
    size_t n = co_await write_some(Buffers(&buffer, 1), ec);
    if (ec) throw boost::system::system_error(ec);
    bytes = bytes.subspan(n);
  }
}

awaitable<bool> ClientStream::start_tls(const TlsServerCredentials& credentials, uint64_t connection_id) {
  tls_ = credentials.new_session(socket_);
  for (;;) {
    const TlsIo status = tls_->handshake();
    if (status == TlsIo::Done) {
      spdlog::info("connection {}: TLS: {}", connection_id, tls_->describe());
      co_return true;
    }
    if (status == TlsIo::Closed) {
      spdlog::warn("connection {}: client left during the TLS handshake", connection_id);
      co_return false;
    }
    if (status == TlsIo::Failed) {
      spdlog::warn("connection {}: TLS handshake failed: {}", connection_id, tls_->error());
      co_return false;
    }
    // A failed wait: the handshake deadline closed the socket (it logged why).
    if (!co_await wait(status == TlsIo::WantWrite)) co_return false;
  }
}

void ClientStream::shutdown_receive() {
  boost::system::error_code ignored;
  socket_.shutdown(Socket::shutdown_receive, ignored);
}

void ClientStream::close() {
  if (!socket_.is_open()) return;
  if (tls_) tls_->bye();
  boost::system::error_code ignored;
  socket_.shutdown(Socket::shutdown_both, ignored);
  socket_.close(ignored);
}

}  // namespace bscache::proxy
