// Session: one client connection. A thin loop: read, decode, decide, encode,
// write. Requests are pipelined (one coroutine per request that must wait on
// upstream); replies go out in completion order through one write queue.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include <boost/asio/generic/stream_protocol.hpp>

#include "proxy/asio.hpp"
#include "proxy/block_status_service.hpp"
#include "proxy/export_info.hpp"
#include "proxy/handshake.hpp"
#include "proxy/metrics.hpp"
#include "proxy/upstream.hpp"
#include "proxy/wire/codec.hpp"

namespace bscache::proxy {

struct SessionLimits {
  // Requests one client may have in flight before we stop reading from it. Default: 64.
  unsigned max_in_flight = 64;
  // Time a client has to finish the handshake. Default: 30 s.
  std::chrono::milliseconds handshake_timeout{30'000};
};

// What every session shares.
struct ProxyContext {
  asio::io_context& io;
  Upstream& upstream;
  const ExportInfo& info;
  BlockStatusService& block_status;
  Metrics& metrics;
  SessionLimits limits;
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  using Socket = asio::generic::stream_protocol::socket;

  Session(ProxyContext& context, Socket socket, uint64_t id);
  awaitable<void> run();
  // Stop reading requests; those in flight complete, then the connection closes.
  void stop();
  uint64_t id() const { return id_; }

 private:
  awaitable<bool> handshake();
  awaitable<bool> read_exact(std::span<uint8_t> buffer);
  awaitable<bool> discard(uint64_t length);
  awaitable<void> transmission();
  awaitable<void> serve(wire::RequestHeader request, wire::Bytes payload);
  awaitable<void> serve_read(const wire::RequestHeader& request);
  awaitable<void> serve_block_status(const wire::RequestHeader& request);
  awaitable<void> serve_passthrough_block_status(const wire::RequestHeader& request);
  awaitable<void> serve_mutation(const wire::RequestHeader& request, const wire::Bytes& payload);
  bool try_block_status_hit(const wire::RequestHeader& request);
  void reply_base_allocation(const wire::RequestHeader& request, std::span<const wire::Descriptor> descriptors);
  void reply_status(const wire::RequestHeader& request, int error);
  void reply_nbd_error(const wire::RequestHeader& request, uint32_t nbd_error, std::string_view message);
  void send(wire::Bytes bytes);
  awaitable<void> write_queue();
  void request_done();
  void close_when_idle();
  awaitable<void> wait_for_wakeup();

  ProxyContext& ctx_;
  Socket socket_;
  uint64_t id_;
  Negotiated negotiated_;
  wire::TransmissionLimits limits_;
  bool only_base_allocation_ = false;
  bool stopping_ = false;
  bool broken_ = false;
  unsigned in_flight_ = 0;
  asio::steady_timer wakeup_;  // cancelled whenever a request finishes
  struct Outgoing {
    wire::Bytes bytes;
    size_t sent = 0;  // already written by send()'s direct attempt
  };
  std::deque<Outgoing> outbox_;
  bool writing_ = false;
  // Reused for cache hits: building a hit reply allocates only the reply itself.
  std::vector<wire::Descriptor> descriptors_;
};

}  // namespace bscache::proxy
