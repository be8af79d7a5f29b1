// Upstream: one libnbd connection, driven by the proxy's io_context.
//
// Every command is an awaitable. libnbd runs our callbacks with the handle
// lock held, so a callback only records the result and posts the completion
// back to the loop; nothing ever calls the handle from inside a callback.
// Commands are pipelined on the one connection; replies complete in any order.
#pragma once

#include <libnbd.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/thread_pool.hpp>

#include "proxy/asio.hpp"
#include "proxy/upstream_connect.hpp"
#include "proxy/upstream_info.hpp"
#include "proxy/wire/codec.hpp"

namespace bscache::proxy {

struct UpstreamOptions {
  // Reconnect (with backoff from 100 ms to 5 s) when the connection dies. Default: on.
  bool reconnect = true;
  // A command unanswered this long drops the connection (then reconnect). Default: 0, off.
  std::chrono::milliseconds timeout{0};
};

// A piece of a structured READ reply.
struct ReadChunk {
  uint64_t offset = 0;
  uint32_t length = 0;
  bool hole = false;
};

struct CommandResult {
  int error = 0;  // errno from upstream or libnbd; 0 on success
  // BLOCK_STATUS: descriptors per upstream context (indexed like UpstreamInfo::contexts).
  std::vector<std::vector<wire::Descriptor>> extents;
  std::vector<ReadChunk> chunks;  // READ: the pieces upstream sent, in order received
};

class Upstream {
 public:
  // Connects (blocking: only at start-up) and negotiates every meta context
  // upstream offers. Throws std::runtime_error with libnbd's message on failure.
  Upstream(asio::io_context& io, const UpstreamTarget& target, UpstreamOptions options = {});
  ~Upstream();
  Upstream(const Upstream&) = delete;
  Upstream& operator=(const Upstream&) = delete;

  const UpstreamInfo& info() const { return info_; }
  uint64_t reconnects() const { return reconnects_; }
  // Called with false when the connection is lost, true when it is back.
  void on_state_change(std::function<void(bool connected)> callback) { on_state_ = std::move(callback); }
  size_t in_flight() const { return pending_.size(); }

  awaitable<CommandResult> pread(std::span<uint8_t> buffer, uint64_t offset, uint32_t flags);
  awaitable<CommandResult> pwrite(std::span<const uint8_t> data, uint64_t offset, uint32_t flags);
  awaitable<CommandResult> flush(uint32_t flags);
  awaitable<CommandResult> trim(uint64_t length, uint64_t offset, uint32_t flags);
  awaitable<CommandResult> zero(uint64_t length, uint64_t offset, uint32_t flags);
  awaitable<CommandResult> cache(uint64_t length, uint64_t offset, uint32_t flags);
  awaitable<CommandResult> block_status(uint64_t length, uint64_t offset, uint32_t flags);

  // Stops waiting on the socket and asks upstream to disconnect.
  void shutdown();

 private:
  struct Command;
  template <typename Handler>
  struct CommandWith;
  enum class Kind { Read, Write, Flush, Trim, Zero, Cache, BlockStatus };
  struct Args {
    Kind kind;
    uint8_t* buffer = nullptr;
    size_t count = 0;
    uint64_t offset = 0;
    uint32_t flags = 0;
  };

  awaitable<CommandResult> submit(Args args);
  void issue(std::unique_ptr<Command> command, const Args& args);
  void finish(uint64_t id);
  void adopt(NbdHandlePtr handle);
  void fail_connection(int error, const std::string& why);
  void schedule_reconnect();
  void reconnected(NbdHandlePtr handle, const std::string& error);
  void watch();
  void pump();
  void wait_until(short events, std::function<void()> notify);
  void on_ready(bool reading, const std::function<void()>& notify);
  bool socket_ready(short events);

  static int on_complete(void* user_data, int* error);
  static int on_extent(void* user_data, const char* context, uint64_t offset, uint32_t* entries, size_t count,
                       int* error);
  static int on_chunk(void* user_data, const void* subbuf, size_t count, uint64_t offset, unsigned status, int* error);

  static constexpr std::chrono::milliseconds kFirstBackoff{100};

  asio::io_context& io_;
  UpstreamTarget target_;
  UpstreamOptions options_;
  NbdHandlePtr handle_;
  asio::posix::stream_descriptor socket_;
  asio::steady_timer watchdog_;
  asio::thread_pool helper_{1};  // blocking reconnects happen here, never on the loop
  std::function<void(bool)> on_state_;
  std::chrono::milliseconds backoff_ = kFirstBackoff;
  uint64_t reconnects_ = 0;
  uint64_t reconnect_failures_ = 0;
  bool closing_ = false;
  UpstreamInfo info_;
  bool read_armed_ = false;
  bool write_armed_ = false;
  bool dead_ = false;
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, std::unique_ptr<Command>> pending_;
};

}  // namespace bscache::proxy
