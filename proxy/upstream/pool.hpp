// UpstreamPool: the proxy's upstream, as one or more connections.
//
// When upstream advertises CAN_MULTI_CONN, bscache opens --upstream-connections
// connections and spreads commands over them; otherwise exactly one. Each of
// the first half (at least one) is driven by libnbd on a thread of its own
// (LibnbdConnection) and carries block status, writes in buffers, trims,
// zeroes and flushes. With --data-path wire (the default) and more than one
// connection to a plain upstream, the second half carries READ, CACHE and
// WRITEs through pipes, spoken by bscache itself on the loop
// (WireConnection), and flushes when they carried writes; with
// --data-path libnbd they are libnbd connections too and every command goes
// anywhere. All of the pool's own
// state lives on the loop thread, and every upstream request and error is
// counted in one place, complete(), when the command comes back.
//
// A command is handed to its connection's thread at the co_await of run()'s
// awaitable, in the same loop step as the caller's code before it: a caller
// that takes a TaintTracker ticket and then awaits run() with no co_await in
// between has taken the ticket before the command can reach upstream (the
// race rule's precondition; taking it earlier than the send only widens the
// taint, which is safe).
//
// FLUSH: a client FLUSH must cover every write any client saw completed
// before it. Each connection remembers whether it carried a write since its
// last flush was sent; flush() flushes every such connection (or one, if none
// did) and fails if any of them fails.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "proxy/io/asio.hpp"
#include "proxy/negotiation/upstream_info.hpp"
#include "proxy/ops/metrics.hpp"
#include "proxy/upstream/block_status_upstream.hpp"
#include "proxy/upstream/command.hpp"
#include "proxy/upstream/config.hpp"
#include "proxy/upstream/libnbd_connection.hpp"

namespace bscache::proxy {

class UpstreamPool final : public BlockStatusUpstream {
 public:
  // Opens the connections a pool of `target` gets: --upstream-connections if
  // upstream advertises multi-conn, else one. Blocking: at start-up, or off
  // the loop. Throws std::runtime_error with libnbd's message if the first
  // connection fails. The others open at the same time, after the first; one
  // that fails is logged and left out with those after it.
  // The first is always a libnbd connection (its info is the export's); those
  // meant for the wire client are opened for it (open_wire_upstream).
  static std::vector<OpenedUpstream> connect(const UpstreamTarget& target, const UpstreamOptions& options);
  // Adopts connections from connect() (at least one) and starts their threads.
  UpstreamPool(asio::io_context& loop, std::vector<OpenedUpstream> opened, const UpstreamTarget& target,
               UpstreamOptions options, Metrics& metrics);
  ~UpstreamPool() override;
  UpstreamPool(const UpstreamPool&) = delete;
  UpstreamPool& operator=(const UpstreamPool&) = delete;

  const UpstreamInfo& info() const { return info_; }
  size_t connections() const { return connections_.size(); }
  size_t connections_up() const;
  // How many carry the data commands through WireConnection.
  size_t wire_connections() const;
  // Whether a READ or WRITE through pipes (CommandArgs::pipes) can be sent now.
  bool splices() const;
  size_t in_flight() const { return in_flight_; }

  // A connection was lost (nullopt) or came back (with what it negotiated).
  using StateChanged = std::function<void(std::optional<UpstreamInfo> reconnected)>;
  void on_state_change(StateChanged callback) { on_state_ = std::move(callback); }

  // Any single command (flush() may send several). `cancelled`, when set before the command is sent,
  // drops it with ECANCELED.
  awaitable<CommandResult> run(CommandArgs args, CancelFlag cancelled = {});
  awaitable<CommandResult> flush(CommandFlags flags);
  awaitable<CommandResult> block_status(uint64_t offset, uint64_t length, CommandFlags flags) override;

  // Asks every connection to disconnect once what is in flight is answered.
  void shutdown();

 private:
  struct Slot {
    std::unique_ptr<UpstreamConnection> connection;
    bool up = true;
    bool wrote_since_flush = false;  // carried a WRITE/TRIM/ZERO since its last FLUSH was sent
    unsigned writes_in_flight = 0;
    uint64_t load = 0;              // bytes (and a page per command) in flight
    bool extended_headers = false;  // as last (re)connected: carries effect lengths past 4 GiB - 1
  };
  template <typename Handler>
  struct PendingWith;
  struct FlushFanOut;

  // The least loaded connection that is up and suits the command, other than
  // `avoid`: a TRIM, WRITE_ZEROES or CACHE longer than a compact request
  // carries only on a connection with extended headers, of either kind; a
  // READ or WRITE through pipes only on a connection that splices; other READs
  // and CACHE on the wire connections while any is up, else anywhere;
  // everything else on the libnbd connections (see WireConnection).
  std::optional<size_t> pick(const CommandArgs& args, std::optional<size_t> avoid = std::nullopt) const;
  std::optional<size_t> flush_target() const;
  // A command pick() finds no connection for: what the caller is told (nothing was sent).
  static void unsendable(CommandResult& result, const CommandArgs& args);
  void count_extended_headers();
  void send(size_t slot, std::unique_ptr<UpstreamCommand> command);
  void complete(std::unique_ptr<UpstreamCommand> command);
  bool resend(std::unique_ptr<UpstreamCommand>& command);
  void connection_changed(size_t index, std::optional<UpstreamInfo> reconnected);

  asio::io_context& loop_;
  Metrics& metrics_;
  UpstreamInfo info_;
  std::vector<Slot> connections_;
  size_t in_flight_ = 0;
  bool lost_unflushed_writes_ = false;  // a connection died with writes not yet flushed
  StateChanged on_state_;
  // Expires with the pool; messages the connections posted check it (loop thread only).
  std::shared_ptr<UpstreamPool*> alive_ = std::make_shared<UpstreamPool*>(this);
};

}  // namespace bscache::proxy
