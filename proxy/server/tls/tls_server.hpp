// TLS for clients (bscache in the server role), with GnuTLS.
//
// Credentials are loaded once at start, in nbdkit's layout so users can reuse
// their files: a certificate directory (ca-cert.pem, server-cert.pem,
// server-key.pem, optional ca-crl.pem) or a PSK file of `username:hexkey`
// lines. GnuTLS reads the PSK file at every TLS handshake, so edits take effect
// for the next client without a signal.
//
// A TlsSession never blocks: each call returns at once and says whether it
// needs the socket readable or writable. ClientStream does the waiting on the
// loop, so session.cpp never learns whether its client speaks TLS.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include <boost/asio/generic/stream_protocol.hpp>

#include "proxy/io/asio.hpp"
#include "proxy/negotiation/handshake.hpp"
#include "proxy/server/config.hpp"

namespace bscache::proxy {

enum class TlsIo {
  Done,       // `bytes` were received or sent
  WantRead,   // call again once the socket is readable
  WantWrite,  // call again once the socket is writable
  Closed,     // the peer ended the session (close_notify or EOF)
  Failed,     // see TlsSession::error()
};

struct TlsResult {
  TlsIo status;
  size_t bytes = 0;
};

class TlsSession {
 public:
  using Socket = asio::generic::stream_protocol::socket;
  ~TlsSession();
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;

  TlsIo handshake();
  TlsResult recv(std::span<uint8_t> out);
  // Sends at most one record of `data`. WantRead/WantWrite mean the record
  // was taken but not yet all sent: call send_pending() until it is Done,
  // which reports the bytes of `data` that record carried.
  TlsResult send(std::span<const uint8_t> data);
  bool has_pending_send() const { return pending_send_; }
  TlsResult send_pending();
  // Best effort close_notify; never waits.
  void bye();

  const std::string& error() const { return error_; }
  // "TLS1.3 AES-256-GCM, PSK user alice" and the like, for the log.
  std::string describe() const;

 private:
  friend class TlsServerCredentials;
  struct Impl;
  explicit TlsSession(std::unique_ptr<Impl> impl);
  TlsResult io_result(long long rc, bool sending);
  std::unique_ptr<Impl> impl_;
  bool pending_send_ = false;
  std::string error_;
};

class TlsServerCredentials {
 public:
  using Socket = asio::generic::stream_protocol::socket;
  // Loads and checks everything; throws std::runtime_error naming the file.
  explicit TlsServerCredentials(const TlsServerOptions& options);
  ~TlsServerCredentials();
  TlsServerCredentials(const TlsServerCredentials&) = delete;
  TlsServerCredentials& operator=(const TlsServerCredentials&) = delete;

  TlsMode mode() const { return mode_; }
  // A server session over `socket`, which must outlive it. The session reads
  // the socket's descriptor at every call, so once the socket is closed (by a
  // deadline, say) it fails with EBADF instead of touching a reused number.
  std::unique_ptr<TlsSession> new_session(Socket& socket) const;
  std::string describe() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  TlsMode mode_;
};

}  // namespace bscache::proxy
