// Opening an upstream connection: connect, learn the meta contexts upstream
// offers (option mode), select them all, GO. Blocking: used once at start-up
// on the loop thread, and for reconnects on a helper thread.
#pragma once

#include <memory>
#include <string>

#include "proxy/negotiation/upstream_info.hpp"
#include "proxy/upstream/config.hpp"

struct nbd_handle;  // libnbd's handle; libnbd.h stays inside proxy/upstream/*.cpp

namespace bscache::proxy {

struct NbdClose {
  void operator()(nbd_handle* h) const;
};
using NbdHandlePtr = std::unique_ptr<nbd_handle, NbdClose>;

// An open connection to upstream, in transmission, and what it negotiated.
struct OpenedUpstream {
  NbdHandlePtr handle;
  UpstreamInfo info;  // info.extended_headers: how requests and replies are framed on its socket
  // bscache negotiated past option mode itself (NBD_OPT_EXTENDED_HEADERS and
  // NBD_OPT_GO on libnbd's socket): libnbd's handle is still in option mode
  // and knows nothing of the export, so only WireConnection can drive it.
  bool negotiated_by_bscache = false;
};

// Connects through libnbd: its handle, in transmission. Throws
// std::runtime_error with libnbd's message on failure.
NbdHandlePtr open_upstream(const UpstreamTarget& target);
// open_upstream and what the handle negotiated.
OpenedUpstream open_libnbd_upstream(const UpstreamTarget& target);
// A connection for bscache's own client (WireConnection): with extended
// headers where upstream serves them, whether libnbd can negotiate them (>=
// 1.18) or not (then bscache does; see connect.cpp). TLS connections go
// through libnbd alone, as open_libnbd_upstream. Throws like open_upstream.
OpenedUpstream open_wire_upstream(const UpstreamTarget& target);
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
