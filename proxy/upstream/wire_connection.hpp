// WireConnection: one upstream connection that bscache speaks NBD on
// itself, on the loop thread, over the socket libnbd negotiated. UpstreamPool
// sends it READ, CACHE and the WRITEs whose data is in pipes (any command
// would work: see below for why only those).
//
// Why: moving bytes is CPU-bound on two cores shared with the client and the
// upstream server, and what a proxy adds is copies, system calls and
// wake-ups. Here READ data is spliced from the socket into pipes and WRITE
// data from pipes into the socket (splice(2): no copy; see PipePool), which
// libnbd cannot do; the loop sends the requests of one loop step in one
// gathered write, and nothing changes threads (a command through libnbd on a
// thread of its own, LibnbdConnection, costs a hand-off each way). A WRITE
// in a buffer stays on libnbd threads: through this class it measured slower
// (the loop then did both copies of every written byte between reading
// clients; see bench/results/RESULTS-data-path.md).
//
// libnbd still opens the connection (URI, handshake, options) and is then
// left idle: bscache takes a duplicate of its socket (duplicate_socket).
// Requests and replies are compact, or extended (32-byte headers, 64-bit
// lengths) where the connection negotiated extended headers: through libnbd
// >= 1.18, or by bscache itself on libnbd's option-mode socket where libnbd
// cannot (open_wire_upstream). Not used over TLS (libnbd holds the session),
// nor for BLOCK_STATUS: libnbd does not say which context id upstream gave
// which meta context.
//
// Everything here runs on the loop thread but the blocking reconnect, which
// runs on a helper thread and posts its result back. Results are handed back
// where they arrive: `finished` is called on the loop (never inside submit()).
#pragma once

#include <memory>

#include "proxy/io/asio.hpp"
#include "proxy/upstream/config.hpp"
#include "proxy/upstream/connect.hpp"
#include "proxy/upstream/connection.hpp"

namespace bscache::proxy {

class WireConnection final : public UpstreamConnection {
 public:
  // Adopts an open connection (see open_wire_upstream) that usable() accepts.
  WireConnection(asio::io_context& loop, size_t index, OpenedUpstream opened, const UpstreamTarget& target,
                 UpstreamOptions options, Finished finished, StateChanged state_changed);
  // Fails what is in flight with ESHUTDOWN; waits for a reconnect attempt in progress.
  ~WireConnection() override;
  WireConnection(const WireConnection&) = delete;
  WireConnection& operator=(const WireConnection&) = delete;

  // Loop thread only.
  void submit(std::unique_ptr<UpstreamCommand> command) override;
  void disconnect() override;
  Kind kind() const override { return Kind::Wire; }
  // Until a READ overflowed its pipe (see splice_payload in the .cpp).
  bool splices() const override;

  // Whether a connection can be driven by this class: not over TLS.
  static bool usable(const OpenedUpstream& opened);

 private:
  struct State;  // shared with the I/O handlers, which may outlive this object briefly
  std::shared_ptr<State> state_;
};

}  // namespace bscache::proxy
