#include "proxy/upstream/connect.hpp"

#include <fcntl.h>
#include <libnbd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "proxy/io/socket_buffers.hpp"
#include "proxy/upstream/option_exchange.hpp"
#include "proxy/wire/codec.hpp"
#include "proxy/wire/protocol.hpp"

namespace bscache::proxy {

namespace {
std::runtime_error libnbd_failure(const char* what) {
  return std::runtime_error(std::string(what) + ": " + (nbd_get_error() ? nbd_get_error() : "unknown error"));
}

int meta_context_collector(void* user_data, const char* name) {
  static_cast<std::vector<std::string>*>(user_data)->emplace_back(name);
  return 0;
}

int list_finished(void* user_data, int* error) {
  *static_cast<int*>(user_data) = *error;
  return 1;
}

// nbd_opt_list_meta_context, minus a stall. libnbd 1.14 sends the option's
// last piece (a query count of zero: "every context") with MSG_MORE, so on
// TCP the kernel holds the request back for its 200 ms cork timeout before
// the server sees it: every upstream connection took 0.2 s longer to open
// (an export with 4 connections 0.8 s before its first client got an
// answer). Unix sockets ignore MSG_MORE. So the request is issued
// asynchronously and then pushed out: turning TCP_NODELAY on, even when on
// already (libnbd sets it), sends what the kernel holds at once (tcp(7)).
// On a Unix socket that setsockopt just fails. False: no list (failed or refused).
bool list_meta_contexts(nbd_handle* h, std::vector<std::string>& offered) {
  int error = -1;  // set by list_finished
  nbd_context_callback collect{.callback = meta_context_collector, .user_data = &offered, .free = nullptr};
  nbd_completion_callback finished{.callback = list_finished, .user_data = &error, .free = nullptr};
  if (nbd_aio_opt_list_meta_context(h, collect, finished) == -1) return false;
  const int on = 1;
  (void)::setsockopt(nbd_aio_get_fd(h), IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
  while (nbd_aio_is_connecting(h) == 1) {
    if (nbd_poll(h, -1) == -1) return false;
  }
  return error == 0 && nbd_aio_is_negotiating(h) == 1;
}

bool is_tls_uri(const std::string& uri) {
  return uri.rfind("nbds:", 0) == 0 || uri.rfind("nbds+", 0) == 0;
}

// Applied before connecting, so reconnects negotiate TLS the same way.
void configure_tls(nbd_handle* h, const UpstreamTarget& target) {
  const UpstreamTls& tls = target.tls;
  const bool wanted = is_tls_uri(target.uri) || tls.any();
  if (!wanted) return;
  if (nbd_supports_tls(h) != 1) {
    throw std::runtime_error("upstream TLS asked for, but this libnbd was built without TLS");
  }
  if (!target.uri.empty() && !is_tls_uri(target.uri)) {
    // libnbd turns TLS off for nbd:// URIs whatever was set before.
    throw std::runtime_error("--upstream-tls-* options need an nbds:// or nbds+unix:// URI (got " + target.uri + ")");
  }
  // The URI's tls-certificates and tls-psk-file keys name local files.
  if (nbd_set_uri_allow_local_file(h, true) == -1 || nbd_set_tls(h, LIBNBD_TLS_REQUIRE) == -1 ||
      (!tls.certificates_dir.empty() && nbd_set_tls_certificates(h, tls.certificates_dir.c_str()) == -1) ||
      (!tls.psk_file.empty() && nbd_set_tls_psk_file(h, tls.psk_file.c_str()) == -1) ||
      (!tls.username.empty() && nbd_set_tls_username(h, tls.username.c_str()) == -1) ||
      nbd_set_tls_verify_peer(h, tls.verify_peer) == -1) {
    throw libnbd_failure("upstream TLS setup");
  }
}

}  // namespace

std::string take_libnbd_string(char* s) {
  if (!s) return {};
  std::string out(s);
  free(s);  // NOLINT(cppcoreguidelines-no-malloc,cppcoreguidelines-owning-memory): libnbd's malloc
  return out;
}

void NbdClose::operator()(nbd_handle* h) const {
  nbd_close(h);
}

namespace {
// Connected, in option mode (nothing negotiated yet but what the URI asks).
NbdHandlePtr connect_for_options(const UpstreamTarget& target) {
  NbdHandlePtr handle(nbd_create());
  if (!handle) throw libnbd_failure("nbd_create");
  nbd_handle* h = handle.get();
  nbd_set_handle_name(h, "upstream");
  // libnbd zero-fills every read buffer first unless told not to: a guard for
  // callers that use a buffer whose read failed. bscache never sends such a
  // buffer (a failed READ gets an error reply), and libnbd fails a structured
  // READ whose chunks do not cover the request, so the fill would only write
  // every byte once more (and fault in every page of the buffer).
  if (nbd_set_pread_initialize(h, false) == -1) throw libnbd_failure("libnbd setup");
  // Option mode lets us ask which meta contexts upstream offers before GO.
  if (nbd_set_opt_mode(h, true) == -1 || nbd_set_full_info(h, true) == -1) throw libnbd_failure("libnbd setup");
  configure_tls(h, target);
  // --upstream-command is started once by UpstreamChild, and reached by its URI.
  if (!target.command.empty()) throw std::logic_error("open_upstream: start the upstream command first");
  if (nbd_connect_uri(h, target.uri.c_str()) == -1) throw libnbd_failure("connecting to upstream");
  if (target.export_name_set) nbd_set_export_name(h, target.export_name.c_str());
  return handle;
}

int export_collector(void* user_data, const char* name, const char* description) {
  static_cast<std::vector<ExportListing>*>(user_data)->push_back({name, description});
  return 0;
}

// Larger replies are not a LIST answer (a name and a description are 4 KiB at most each).
constexpr uint32_t kMaxListReply = 64 * 1024;
constexpr size_t kMaxListedExports = 100'000;

// NBD_OPT_LIST asked by bscache itself on the socket of a handle in option
// mode, rather than with nbd_opt_list: libnbd 1.14 turns every error reply to
// LIST into ENOTSUP and drops upstream's code and message, and a client must
// get the answer upstream gave. The handle stays usable: the exchange is
// whole when this returns.
UpstreamListing list_on_socket(int fd) {
  OptionExchange exchange(fd, "listing upstream's exports");
  exchange.send(wire::kOptList);
  UpstreamListing listing;
  for (;;) {
    const auto reply = exchange.receive(wire::kOptList, kMaxListReply);
    const uint32_t type = reply.header.type;
    if (type == wire::kRepAck) return listing;
    if (type & wire::kRepErrBit) {
      listing.exports.clear();
      listing.error = type;
      listing.message.assign(reply.payload.begin(), reply.payload.end());
      return listing;
    }
    const auto server = type == wire::kRepServer ? wire::decode_server_reply(reply.payload) : std::nullopt;
    if (!server || listing.exports.size() >= kMaxListedExports) {
      throw std::runtime_error("listing upstream's exports: malformed reply");
    }
    listing.exports.push_back({server->name, server->description});
  }
}
}  // namespace

UpstreamListing list_upstream_exports(const UpstreamTarget& target) {
  NbdHandlePtr handle = connect_for_options(target);
  nbd_handle* h = handle.get();
  UpstreamListing listing;
  if (nbd_get_tls_negotiated(h) != 1) {
    listing = list_on_socket(nbd_aio_get_fd(h));
  } else {
    // Over TLS the bytes are libnbd's to read: its error (always ENOTSUP in
    // 1.14) is all there is, so the client is told the option is unsupported.
    nbd_list_callback collect{.callback = export_collector, .user_data = &listing.exports, .free = nullptr};
    if (nbd_opt_list(h, collect) == -1) {
      listing.exports.clear();
      listing.error = wire::kRepErrUnsup;
      listing.message = nbd_get_error() ? nbd_get_error() : "upstream refused to list its exports";
    }
  }
  nbd_opt_abort(h);
  return listing;
}

std::string named_export(const UpstreamTarget& target) {
  if (target.export_name_set) return target.export_name;
  NbdHandlePtr handle = connect_for_options(target);
  std::string name = take_libnbd_string(nbd_get_export_name(handle.get()));
  nbd_opt_abort(handle.get());
  return name;
}

namespace {
// What upstream offers a handle in option mode (none without structured replies).
std::vector<std::string> offered_meta_contexts(nbd_handle* h) {
  std::vector<std::string> offered;
  if (nbd_get_structured_replies_negotiated(h) == 1 && !list_meta_contexts(h, offered)) offered.clear();
  return offered;
}

// libnbd's GO, selecting every context offered.
void go_with_libnbd(nbd_handle* h, const std::vector<std::string>& offered) {
  for (const auto& name : offered) nbd_add_meta_context(h, name.c_str());
  if (nbd_opt_go(h) == -1) throw libnbd_failure("upstream refused the export");
  // WRITEs go out whole; the duplicate WireConnection takes shares the setting.
  enlarge_send_buffer(nbd_aio_get_fd(h));
}

// Whether this libnbd asks for extended headers itself when it connects
// (>= 1.18, on by default): then bscache never asks a second time.
#ifdef LIBNBD_HAVE_NBD_GET_EXTENDED_HEADERS_NEGOTIATED
constexpr bool kLibnbdNegotiatesExtendedHeaders = true;
#else
constexpr bool kLibnbdNegotiatesExtendedHeaders = false;
#endif
}  // namespace

NbdHandlePtr open_upstream(const UpstreamTarget& target) {
  NbdHandlePtr handle = connect_for_options(target);
  go_with_libnbd(handle.get(), offered_meta_contexts(handle.get()));
  return handle;
}

OpenedUpstream open_libnbd_upstream(const UpstreamTarget& target) {
  NbdHandlePtr handle = open_upstream(target);
  UpstreamInfo info = read_upstream_info(handle.get());
  return {std::move(handle), std::move(info), false};
}

// libnbd has connected (and negotiated structured replies) in option mode.
// Where it cannot negotiate extended headers itself, bscache asks for them on
// the socket (the spec lets a client ask after structured replies) and, if
// upstream agrees, sends the GO itself too: libnbd 1.14 could not enter
// transmission after them. Its handle then stays in option mode, idle, and
// only bscache's client speaks on the socket. The GO names the export
// libnbd's GO would (the URI's or --export-name), so this connection reaches
// the export the libnbd connections of the pool reach. Refused (nbdkit 1.32:
// NBD_REP_ERR_UNSUP), nothing changed, and libnbd goes on as open_upstream.
OpenedUpstream open_wire_upstream(const UpstreamTarget& target) {
  NbdHandlePtr handle = connect_for_options(target);
  nbd_handle* h = handle.get();
  // Listed first, with libnbd, either way: the contexts upstream offers are
  // part of what this connection reports of the export (across reconnects too).
  const std::vector<std::string> offered = offered_meta_contexts(h);
  if (!kLibnbdNegotiatesExtendedHeaders && nbd_get_tls_negotiated(h) != 1) {
    OptionExchange exchange(nbd_aio_get_fd(h), "negotiating extended headers upstream");
    if (negotiate_extended_headers(exchange)) {
      const std::string name = take_libnbd_string(nbd_get_export_name(h));
      UpstreamInfo info = go_on_socket(exchange, name);
      info.contexts = offered;  // what libnbd's connections select: every context offered
      info.extended_headers = true;
      enlarge_send_buffer(nbd_aio_get_fd(h));
      return {std::move(handle), std::move(info), true};
    }
  }
  go_with_libnbd(h, offered);
  UpstreamInfo info = read_upstream_info(h);
  return {std::move(handle), std::move(info), false};
}

UpstreamInfo read_upstream_info(nbd_handle* h) {
  UpstreamInfo info;
  auto flag = [](int v) { return v == 1; };
  info.size = static_cast<uint64_t>(nbd_get_size(h));
  info.read_only = flag(nbd_is_read_only(h));
  info.can_flush = flag(nbd_can_flush(h));
  info.can_fua = flag(nbd_can_fua(h));
  info.can_trim = flag(nbd_can_trim(h));
  info.can_zero = flag(nbd_can_zero(h));
  info.can_fast_zero = flag(nbd_can_fast_zero(h));
  info.can_cache = flag(nbd_can_cache(h));
  info.can_df = flag(nbd_can_df(h));
  info.can_multi_conn = flag(nbd_can_multi_conn(h));
  info.rotational = flag(nbd_is_rotational(h));
  if (int64_t v = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM); v > 0) {
    info.min_block = static_cast<uint32_t>(v);
    info.advertises_block_size = true;
  }
  if (int64_t v = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED); v > 0) info.preferred_block = static_cast<uint32_t>(v);
  if (int64_t v = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM); v > 0) info.max_block = static_cast<uint32_t>(v);
#ifdef BSCACHE_HAVE_NBD_BLOCK_STATUS_64
  // 64-bit lengths on the wire, and LibnbdConnection asks through
  // nbd_aio_block_status_64, whose extents may be that long too. Without
  // extended headers libnbd refuses any length over 32 bits (ERANGE).
  if (nbd_get_extended_headers_negotiated(h) == 1) info.max_block_status_length = UINT64_MAX;
#endif
#ifdef LIBNBD_HAVE_NBD_GET_EXTENDED_HEADERS_NEGOTIATED
  info.extended_headers = nbd_get_extended_headers_negotiated(h) == 1;
#endif
  info.export_name = take_libnbd_string(nbd_get_canonical_export_name(h));
  info.description = take_libnbd_string(nbd_get_export_description(h));
  info.contexts = selected_meta_contexts(h);
  return info;
}

// Of the contexts asked for, those libnbd says upstream really selected.
std::vector<std::string> selected_meta_contexts(nbd_handle* h) {
  std::vector<std::string> selected;
  for (size_t i = 0;; ++i) {
    char* name = nbd_get_meta_context(h, i);
    if (!name) break;
    std::string context = take_libnbd_string(name);
    if (nbd_can_meta_context(h, context.c_str()) == 1) selected.push_back(std::move(context));
  }
  return selected;
}

int duplicate_socket(nbd_handle* h) {
  const int fd = nbd_aio_get_fd(h);
  if (fd < 0) throw libnbd_failure("the upstream socket");
  const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) throw std::runtime_error(std::string("duplicating the upstream socket: ") + strerror(errno));
  return copy;
}

}  // namespace bscache::proxy
