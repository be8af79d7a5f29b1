#include "proxy/server/tls/tls_server.hpp"

#include <gnutls/gnutls.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include <cerrno>
#include <filesystem>
#include <stdexcept>

namespace bscache::proxy {

namespace {

std::runtime_error tls_failure(const std::string& what, int rc) {
  return std::runtime_error(what + ": " + gnutls_strerror(rc));
}

bool readable_file(const std::filesystem::path& path) {
  std::error_code ec;
  return std::filesystem::is_regular_file(path, ec);
}

// Transport over the socket's current descriptor (-1 once closed: EBADF).
using Socket = asio::generic::stream_protocol::socket;

int current_fd(gnutls_transport_ptr_t ptr) {
  auto* socket = static_cast<Socket*>(ptr);
  return socket->is_open() ? socket->native_handle() : -1;
}

}  // namespace

// ---- credentials ----

struct TlsServerCredentials::Impl {
  gnutls_certificate_credentials_t certificates = nullptr;
  gnutls_psk_server_credentials_t psk = nullptr;
  gnutls_priority_t priority = nullptr;
  bool verify_peer = false;
  std::string description;
  ~Impl() {
    if (certificates) gnutls_certificate_free_credentials(certificates);
    if (psk) gnutls_psk_free_server_credentials(psk);
    if (priority) gnutls_priority_deinit(priority);
  }
};

TlsServerCredentials::TlsServerCredentials(const TlsServerOptions& options)
    : impl_(std::make_unique<Impl>()), mode_(options.mode) {
  namespace fs = std::filesystem;
  if (options.certificates_dir.empty() == options.psk_file.empty()) {
    throw std::runtime_error("--tls needs exactly one of --tls-certificates DIR and --tls-psk FILE");
  }
  std::string priority = options.priority;
  if (!options.psk_file.empty()) {
    if (!readable_file(options.psk_file)) throw std::runtime_error("--tls-psk: no such file: " + options.psk_file);
    struct stat st {};
    if (stat(options.psk_file.c_str(), &st) == 0 && (st.st_mode & 077) != 0) {
      spdlog::warn("--tls-psk: {} is readable by others (mode {:o}); keys belong in a 0600 file", options.psk_file,
                   st.st_mode & 0777);
    }
    if (int rc = gnutls_psk_allocate_server_credentials(&impl_->psk); rc < 0) throw tls_failure("GnuTLS", rc);
    if (int rc = gnutls_psk_set_server_credentials_file(impl_->psk, options.psk_file.c_str()); rc < 0) {
      throw tls_failure("--tls-psk " + options.psk_file, rc);
    }
    // DHE-PSK needs groups; RFC 7919's, as for certificates.
    gnutls_psk_set_server_known_dh_params(impl_->psk, GNUTLS_SEC_PARAM_MEDIUM);
    priority += ":+ECDHE-PSK:+DHE-PSK:+PSK";
    impl_->description = "PSK from " + options.psk_file;
  } else {
    const fs::path dir = options.certificates_dir;
    const fs::path ca = dir / "ca-cert.pem", crl = dir / "ca-crl.pem", cert = dir / "server-cert.pem",
                   key = dir / "server-key.pem";
    for (const auto& needed : {cert, key}) {
      if (!readable_file(needed)) throw std::runtime_error("--tls-certificates: no such file: " + needed.string());
    }
    if (options.verify_peer && !readable_file(ca)) {
      throw std::runtime_error("--tls-verify-peer needs the client CA in " + ca.string());
    }
    if (int rc = gnutls_certificate_allocate_credentials(&impl_->certificates); rc < 0) throw tls_failure("GnuTLS", rc);
    if (readable_file(ca)) {
      if (int rc = gnutls_certificate_set_x509_trust_file(impl_->certificates, ca.c_str(), GNUTLS_X509_FMT_PEM);
          rc < 0) {
        throw tls_failure(ca.string(), rc);
      }
    }
    if (readable_file(crl)) {
      if (int rc = gnutls_certificate_set_x509_crl_file(impl_->certificates, crl.c_str(), GNUTLS_X509_FMT_PEM);
          rc < 0) {
        throw tls_failure(crl.string(), rc);
      }
    }
    if (int rc =
            gnutls_certificate_set_x509_key_file(impl_->certificates, cert.c_str(), key.c_str(), GNUTLS_X509_FMT_PEM);
        rc < 0) {
      throw tls_failure(cert.string() + " / " + key.string(), rc);
    }
    gnutls_certificate_set_known_dh_params(impl_->certificates, GNUTLS_SEC_PARAM_MEDIUM);
    impl_->verify_peer = options.verify_peer;
    impl_->description = "X.509 from " + dir.string() + (options.verify_peer ? ", client certificates verified" : "");
  }
  // At least TLS 1.2 whatever the priority string allows.
  priority += ":-VERS-TLS1.1:-VERS-TLS1.0";
  const char* error_at = nullptr;
  if (int rc = gnutls_priority_init(&impl_->priority, priority.c_str(), &error_at); rc < 0) {
    throw std::runtime_error("--tls-priority '" + options.priority + "': " + gnutls_strerror(rc) +
                             (error_at ? std::string(" at '") + error_at + "'" : ""));
  }
}

TlsServerCredentials::~TlsServerCredentials() = default;

std::string TlsServerCredentials::describe() const {
  return impl_->description;
}

// ---- sessions ----

struct TlsSession::Impl {
  gnutls_session_t session = nullptr;
  ~Impl() {
    if (session) gnutls_deinit(session);
  }
};

namespace {

ssize_t pull(gnutls_transport_ptr_t ptr, void* data, size_t size) {
  ssize_t n = ::recv(current_fd(ptr), data, size, 0);
  return n;
}

ssize_t push(gnutls_transport_ptr_t ptr, const giovec_t* iov, int count) {
  msghdr msg{};
  msg.msg_iov = const_cast<iovec*>(reinterpret_cast<const iovec*>(iov));  // NOLINT: giovec_t is iovec's twin
  msg.msg_iovlen = static_cast<size_t>(count);
  return ::sendmsg(current_fd(ptr), &msg, MSG_NOSIGNAL);
}

// Only called with a zero timeout here (the session is non-blocking).
int pull_timeout(gnutls_transport_ptr_t ptr, unsigned int) {
  pollfd p{.fd = current_fd(ptr), .events = POLLIN, .revents = 0};
  return ::poll(&p, 1, 0);
}

}  // namespace

std::unique_ptr<TlsSession> TlsServerCredentials::new_session(Socket& socket) const {
  auto impl = std::make_unique<TlsSession::Impl>();
  if (int rc = gnutls_init(&impl->session, GNUTLS_SERVER | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL); rc < 0) {
    throw tls_failure("gnutls_init", rc);
  }
  gnutls_session_t s = impl->session;
  if (int rc = gnutls_priority_set(s, impl_->priority); rc < 0) throw tls_failure("gnutls_priority_set", rc);
  if (impl_->psk) {
    gnutls_credentials_set(s, GNUTLS_CRD_PSK, impl_->psk);
  } else {
    gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, impl_->certificates);
    if (impl_->verify_peer) {
      gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
      gnutls_session_set_verify_cert(s, nullptr, 0);  // the chain must lead to ca-cert.pem
    } else {
      gnutls_certificate_server_set_request(s, GNUTLS_CERT_IGNORE);
    }
  }
  gnutls_transport_set_ptr(s, &socket);
  gnutls_transport_set_pull_function(s, pull);
  gnutls_transport_set_vec_push_function(s, push);
  gnutls_transport_set_pull_timeout_function(s, pull_timeout);
  gnutls_handshake_set_timeout(s, 0);  // the handshake deadline is ours (--handshake-timeout)
  return std::unique_ptr<TlsSession>(new TlsSession(std::move(impl)));  // NOLINT: private constructor
}

TlsSession::TlsSession(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TlsSession::~TlsSession() = default;

TlsResult TlsSession::io_result(long long rc, bool sending) {
  if (rc >= 0) return {TlsIo::Done, static_cast<size_t>(rc)};
  const int error = static_cast<int>(rc);
  if (error == GNUTLS_E_AGAIN || error == GNUTLS_E_INTERRUPTED) {
    if (sending) pending_send_ = true;
    return {gnutls_record_get_direction(impl_->session) ? TlsIo::WantWrite : TlsIo::WantRead};
  }
  if (error == GNUTLS_E_PREMATURE_TERMINATION) return {TlsIo::Closed};
  error_ = gnutls_strerror(error);
  return {TlsIo::Failed};
}

TlsIo TlsSession::handshake() {
  for (;;) {
    const int rc = gnutls_handshake(impl_->session);
    if (rc == GNUTLS_E_SUCCESS) return TlsIo::Done;
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) {
      return gnutls_record_get_direction(impl_->session) ? TlsIo::WantWrite : TlsIo::WantRead;
    }
    if (!gnutls_error_is_fatal(rc)) continue;  // a warning alert: carry on
    error_ = gnutls_strerror(rc);
    if (rc == GNUTLS_E_PREMATURE_TERMINATION) return TlsIo::Closed;
    return TlsIo::Failed;
  }
}

TlsResult TlsSession::recv(std::span<uint8_t> out) {
  for (;;) {
    const ssize_t rc = gnutls_record_recv(impl_->session, out.data(), out.size());
    if (rc == 0) return {TlsIo::Closed};
    if (rc < 0 && rc != GNUTLS_E_AGAIN && rc != GNUTLS_E_INTERRUPTED && !gnutls_error_is_fatal(static_cast<int>(rc))) {
      continue;  // a warning alert, or a rehandshake request we ignore
    }
    return io_result(rc, false);
  }
}

TlsResult TlsSession::send(std::span<const uint8_t> data) {
  return io_result(gnutls_record_send(impl_->session, data.data(), data.size()), true);
}

TlsResult TlsSession::send_pending() {
  TlsResult r = io_result(gnutls_record_send(impl_->session, nullptr, 0), true);
  if (r.status == TlsIo::Done || r.status == TlsIo::Failed) pending_send_ = false;
  return r;
}

void TlsSession::bye() {
  gnutls_bye(impl_->session, GNUTLS_SHUT_WR);  // non-blocking: at most one try
}

std::string TlsSession::describe() const {
  gnutls_session_t s = impl_->session;
  const char* version = gnutls_protocol_get_name(gnutls_protocol_get_version(s));
  const char* cipher = gnutls_cipher_get_name(gnutls_cipher_get(s));
  std::string out = std::string(version ? version : "?") + " " + (cipher ? cipher : "?");
  if (gnutls_auth_get_type(s) == GNUTLS_CRD_PSK) {
    const char* user = gnutls_psk_server_get_username(s);
    out += std::string(", PSK user ") + (user ? user : "?");
  } else {
    out += ", X.509";
  }
  return out;
}

}  // namespace bscache::proxy
