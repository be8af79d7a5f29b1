// Session: one client connection. A thin loop: read a request, validate it,
// answer cache hits inline, and spawn one coroutine per request that waits on
// upstream; replies leave in completion order through the ReplyWriter.
//
// The connection loop is session.cpp; what each command does (the cache
// bracket around mutations, READs through pipes or buffers) is
// session_commands.cpp, one short function per command. A BLOCK_STATUS is
// one call to the export's BlockStatusService, which answers it whole.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "proxy/exports/block_status_service.hpp"
#include "proxy/exports/export.hpp"
#include "proxy/exports/export_registry.hpp"
#include "proxy/io/asio.hpp"
#include "proxy/io/buffer_pool.hpp"
#include "proxy/io/client_memory.hpp"
#include "proxy/io/loop_signal.hpp"
#include "proxy/io/pipe_pool.hpp"
#include "proxy/negotiation/export_info.hpp"
#include "proxy/negotiation/handshake.hpp"
#include "proxy/ops/metrics.hpp"
#include "proxy/server/client_stream.hpp"
#include "proxy/server/config.hpp"
#include "proxy/server/reply_writer.hpp"
#include "proxy/upstream/pool.hpp"
#include "proxy/wire/codec.hpp"

namespace bscache::proxy {

// What every session shares.
struct ProxyContext {
  asio::io_context& io;
  ExportRegistry& exports;
  Metrics& metrics;  // the client connection counters; the rest is counted per export
  BufferPool& buffers;
  PipePool* pipes;       // null: nothing is spliced
  ClientMemory& memory;  // what all clients hold, and its bound
  SessionLimits limits;
  const TlsServerCredentials* tls = nullptr;  // --tls off: null
};

// A WRITE's data as read from the client: in a pooled buffer, or spliced
// from the client's socket into pipes (see PipePool), `in_pipes` bytes.
struct WritePayload {
  PooledBuffer buffer;
  std::vector<PooledPipe> pipes;
  size_t in_pipes = 0;
  size_t size() const { return buffer.size() + in_pipes; }
};

// What a request in flight is charged (see ClientMemory): its bookkeeping,
// and for a READ or WRITE of `length` bytes the buffer (or pipe pages) its data takes.
size_t request_charge(uint16_t type, uint64_t length);

// Longest piece of a TRIM, WRITE_ZEROES or CACHE longer than upstream takes
// in one command: compact requests carry 32-bit lengths, an extended-headers
// client's 64-bit ones. A power of two, so every piece stays aligned to any
// minimum block size.
inline constexpr uint64_t kUpstreamCommandPiece = uint64_t{1} << 31;

class Session : public std::enable_shared_from_this<Session> {
 public:
  using Socket = ClientStream::Socket;

  Session(ProxyContext& context, Socket socket, uint64_t id);
  awaitable<void> run();
  // Stop reading requests; those in flight complete, then the connection closes.
  void stop();
  uint64_t id() const { return id_; }

 private:
  // The connection loop (session.cpp).
  awaitable<void> transmission();
  bool must_wait() const;
  bool room_for(size_t more, bool new_request);
  awaitable<bool> read_write_payload(size_t length, WritePayload& payload);
  // Extended headers: the payload of a command other than WRITE (session_extended.cpp).
  awaitable<bool> read_command_payload(wire::RequestHeader& request);
  void dispatch(const wire::RequestHeader& request, WritePayload payload, size_t charged);
  void request_done(size_t held_bytes);
  void hold(size_t bytes);    // charged to this client's requests in flight and to the total
  void unhold(size_t bytes);  // ...and given back
  awaitable<void> drain_replies();
  void writer_progress();
  void close_when_idle();
  awaitable<void> wait_for_wakeup();

  // What each command does (session_commands.cpp).
  awaitable<void> serve(wire::RequestHeader request, WritePayload payload, size_t held);
  awaitable<void> serve_read(const wire::RequestHeader& request);
  awaitable<bool> serve_spliced_read(const wire::RequestHeader& request);
  awaitable<void> serve_mutation(wire::RequestHeader request, WritePayload payload);
  awaitable<void> serve_cache(const wire::RequestHeader& request);
  // A TRIM, WRITE_ZEROES or CACHE of any length: whole where an upstream
  // connection takes it, else as consecutive pieces (session_extended.cpp).
  awaitable<CommandResult> run_whole_or_in_pieces(CommandArgs args);
  awaitable<CommandResult> run_in_pieces(CommandArgs args);
  // How this client's replies to `request` are framed.
  wire::ReplyForm reply_form(const wire::RequestHeader& request) const {
    return {.extended = negotiated_.extended_headers, .request_offset = request.offset};
  }

  // Requests of a client that did not agree to upstream's minimum block size,
  // made whole blocks for upstream (session_unaligned.cpp).
  bool unaligned(const wire::RequestHeader& request) const;
  awaitable<void> serve_unaligned_read(const wire::RequestHeader& request);
  awaitable<void> serve_unaligned_write(const wire::RequestHeader& request, WritePayload payload);
  // Reads `block` into `into`, holes as zeroes. Returns an errno (0 on success).
  awaitable<int> read_whole(uint64_t offset, std::span<uint8_t> into);

  // Replies: every error a client sees goes through reply_error, which counts it.
  void reply_result(const wire::RequestHeader& request, int error);
  void reply_error(const wire::RequestHeader& request, uint32_t nbd_error, std::string_view message);
  void reply_block_status(const wire::RequestHeader& request, BlockStatusReply reply);

  ProxyContext& ctx_;
  ClientStream stream_;
  uint64_t id_;
  // The export the client chose (held while the session lasts), and its parts.
  std::unique_ptr<Export::Hold> export_;
  UpstreamPool* upstream_ = nullptr;
  BlockStatusService* block_status_ = nullptr;
  Metrics* metrics_ = nullptr;
  // What this client was offered, fixed when it chose the export: if upstream
  // comes back from a reconnect with another size or contexts, new clients
  // see the new export and this one keeps what it negotiated.
  ExportInfo info_;
  ReplyWriter writer_;
  Negotiated negotiated_;
  wire::TransmissionLimits limits_;
  wire::Bytes command_payload_;  // reused by read_command_payload
  // Upstream's minimum block size when this client did not agree to it (its
  // requests may be unaligned: see session_unaligned.cpp), else 1.
  uint32_t align_ = 1;
  // info_, negotiated_.contexts and align_, as the block-status service needs them.
  BlockStatusClient block_status_client_;
  bool splice_reads_ = false;   // plain socket, structured replies, pipes on offer
  bool splice_writes_ = false;  // plain socket, pipes on offer
  bool stopping_ = false;
  bool paused_by_total_ = false;  // stopped by --max-client-memory (counted once per stop)
  unsigned in_flight_ = 0;
  unsigned requests_this_turn_ = 0;  // handled since the session last waited or yielded
  size_t held_in_flight_ = 0;        // requests in flight, as charged (see request_charge)
  // Set when the client is gone: its commands not yet sent upstream are dropped.
  std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);
  LoopSignal wakeup_;                            // notified whenever a request finishes or replies drain
  ClientMemory::Waiter memory_waiter_{wakeup_};  // ...or when the total bound lets this client go on
};

}  // namespace bscache::proxy
