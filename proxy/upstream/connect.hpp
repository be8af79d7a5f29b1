// Opening an upstream connection: connect, learn the meta contexts upstream
// offers (option mode), select them all, GO. Blocking: used once at start-up
// on the loop thread, and for reconnects on a helper thread.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "proxy/negotiation/upstream_info.hpp"

struct nbd_handle;  // libnbd's handle; libnbd.h stays inside proxy/upstream*.cpp

namespace bscache::proxy {

struct NbdClose {
  void operator()(nbd_handle* h) const;
};
using NbdHandlePtr = std::unique_ptr<nbd_handle, NbdClose>;

// TLS to upstream beyond what the URI says (nbds:// turns it on; libnbd 1.14
// URIs carry only tls-certificates and tls-psk-file).
struct UpstreamTls {
  std::string certificates_dir;
  std::string psk_file;
  std::string username;
  bool verify_peer = true;  // libnbd's default
  bool any() const { return !certificates_dir.empty() || !psk_file.empty() || !username.empty(); }
};

// How to reach the upstream server.
struct UpstreamTarget {
  std::string uri;                   // any libnbd URI, or empty when command is set
  std::vector<std::string> command;  // started once by UpstreamChild, then reached by its uri
  std::string export_name;           // overrides the URI's export when set
  bool export_name_set = false;
  UpstreamTls tls;
};

// Throws std::runtime_error with libnbd's message on failure.
NbdHandlePtr open_upstream(const UpstreamTarget& target);
// Upstream's export list (NBD_OPT_LIST on a connection of its own), or the
// error upstream replied with. Throws std::runtime_error if it cannot connect
// or the exchange breaks off.
UpstreamListing list_upstream_exports(const UpstreamTarget& target);
// The export the target names (--export-name, else the URI's path; "" if
// neither). Connects to find out (libnbd parses the URI). Throws like open_upstream.
std::string named_export(const UpstreamTarget& target);
UpstreamInfo read_upstream_info(nbd_handle* h);
// The meta contexts upstream selected on a handle in transmission, in a stable order.
std::vector<std::string> selected_meta_contexts(nbd_handle* h);
// A duplicate of the socket of a handle in the transmission phase, for
// speaking NBD over it without libnbd (the handle must then stay idle, and
// must not be encrypted: see WireConnection::usable). Throws
// std::runtime_error if dup fails.
int duplicate_socket(nbd_handle* h);
// Takes ownership of a string libnbd allocated (nullptr gives "").
std::string take_libnbd_string(char* s);

}  // namespace bscache::proxy
