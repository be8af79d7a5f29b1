// What the server wing is configured with: where to listen, what one client
// may hold, and TLS for clients. Plain data (from the command line), apart
// from the classes that use it.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "proxy/io/memory_bound.hpp"
#include "proxy/negotiation/handshake.hpp"

namespace bscache::proxy {

struct ListenConfig {
  std::string unix_path;           // empty: no Unix socket
  std::optional<uint16_t> port;    // TCP port (0 picks a free one)
  std::string bind = "127.0.0.1";  // TCP address; loopback unless told otherwise
  unsigned socket_mode = 0600;     // permissions of the Unix socket
  bool systemd = false;            // use sockets passed in LISTEN_FDS
  // -s: serve one client, then report it gone (on_single_client_done): the
  // first connection on a socket passed in LISTEN_FDS if there is one, else
  // the connected socket on stdin. No other listener.
  bool single = false;
  unsigned max_connections = 1024;
};

struct SessionLimits {
  // Requests one client may have in flight before we stop reading from it. Default: 64.
  unsigned max_in_flight = 64;
  // Time a client has to finish the handshake. Default: 30 s.
  std::chrono::milliseconds handshake_timeout{30'000};
  // Bytes one client may hold in bscache, counted as allocated (see
  // ClientMemory): its requests in flight (ClientMemory::kRequestCharge each
  // plus the buffer their payload takes) and the replies not yet written to
  // it (each one's object, header and whole payload buffer, however little of
  // a buffer a reply of holes sends). At the limit bscache stops reading that
  // client's requests until it reads its replies, so a client holds at most
  // this plus one request (2 KiB + 32 MiB). Default: 64 MiB.
  size_t max_backlog_bytes = size_t{64} << 20;
  // Bytes all clients together may hold, counted the same way (see
  // ClientMemory for what happens at the limit). Default: a quarter of the
  // machine's memory, at least 256 MiB.
  size_t max_client_memory = default_client_memory();
};

struct TlsServerOptions {
  TlsMode mode = TlsMode::Off;
  std::string certificates_dir;  // X.509, nbdkit's file names
  std::string psk_file;          // PSK; exclusive with certificates_dir
  bool verify_peer = false;      // require a client certificate signed by ca-cert.pem
  std::string priority = "NORMAL";
};

}  // namespace bscache::proxy
