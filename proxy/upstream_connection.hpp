// UpstreamConnection: one libnbd connection to the upstream server, pumped by
// its own thread and io_context.
//
// Why a thread per connection: the bytes of READ and WRITE payloads are
// copied by the kernel once on each side of the proxy. On one loop thread the
// two copies serialise; with the upstream side on its own thread the receive
// from upstream overlaps the send to the client. Everything that decides (the
// cache, the taint tracker, the counters) stays on the proxy's loop thread:
// this class only moves commands and bytes, and talks to the loop by message.
//
// Thread rules: submit() may be called from any thread. Everything else in
// here, the libnbd handle included, is touched only on this connection's
// thread. libnbd runs our callbacks with the handle lock held, from inside
// nbd_aio_notify_*: they only record results and hand the command on.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

#include "proxy/asio.hpp"
#include "proxy/upstream_command.hpp"
#include "proxy/upstream_connect.hpp"
#include "proxy/upstream_info.hpp"

namespace bscache::proxy {

struct UpstreamOptions {
  // Reconnect (with backoff from 100 ms to 5 s) when a connection dies. Default: on.
  bool reconnect = true;
  // A command unanswered this long drops its connection (then reconnect). Default: 0, off.
  std::chrono::milliseconds timeout{0};
  // Upstream connections when upstream advertises CAN_MULTI_CONN (else 1). Default: 4.
  unsigned connections = 4;
};

// Set by the client side when nobody wants the command's answer any more
// (the client disconnected): a command not yet sent upstream is then dropped
// with ECANCELED instead of being sent.
using CancelFlag = std::shared_ptr<const std::atomic<bool>>;

// A command on its way through a connection. The pool creates it, the
// connection fills `result`, and hands it back through its `Finished` callback.
class UpstreamConnection;

struct UpstreamCommand {
  CommandArgs args;
  CommandResult result;
  CancelFlag cancelled;
  size_t connection = 0;
  std::chrono::steady_clock::time_point sent_at;  // by the pool, on the loop thread
  std::chrono::steady_clock::time_point started;  // by the connection, on its thread
  UpstreamConnection* via = nullptr;              // set while libnbd holds the command
  virtual ~UpstreamCommand() = default;
  // Resumes whoever waits for the result. Called on the loop thread, once.
  virtual void deliver() = 0;
};

class UpstreamConnection {
 public:
  // Called on this connection's thread; the receiver must move to its own thread.
  using Finished = std::function<void(std::unique_ptr<UpstreamCommand>)>;
  // Lost (nullopt) or re-established (with what the new connection negotiated).
  using StateChanged = std::function<void(size_t index, std::optional<UpstreamInfo> reconnected)>;

  // Adopts an open handle (see open_upstream) and starts the thread.
  UpstreamConnection(size_t index, NbdHandlePtr handle, const UpstreamTarget& target, UpstreamOptions options,
                     Finished finished, StateChanged state_changed);
  // Closes the handle (failing what is in flight) and joins the thread.
  ~UpstreamConnection();
  UpstreamConnection(const UpstreamConnection&) = delete;
  UpstreamConnection& operator=(const UpstreamConnection&) = delete;

  // Any thread. The command is sent from this connection's thread soon after.
  void submit(std::unique_ptr<UpstreamCommand> command);
  // Any thread. Asks upstream to disconnect once what is in flight is answered.
  void disconnect();

 private:
  void issue(std::unique_ptr<UpstreamCommand> command);
  int64_t start_command(nbd_handle* h, UpstreamCommand& command);
  void hand_back_completed();
  void adopt(NbdHandlePtr handle);
  void fail_connection(int error, const std::string& why);
  void schedule_reconnect();
  void watch();
  void pump();
  void wait_until(short events);
  void on_ready(bool reading);
  bool socket_ready(short events);

  static int on_complete(void* user_data, int* error);
  static int on_extent(void* user_data, const char* context, uint64_t offset, uint32_t* entries, size_t count,
                       int* error);
  static int on_chunk(void* user_data, const void* subbuf, size_t count, uint64_t offset, unsigned status, int* error);

  static constexpr std::chrono::milliseconds kFirstBackoff{100};

  const size_t index_;
  const UpstreamTarget target_;
  const UpstreamOptions options_;
  const Finished finished_;
  const StateChanged state_changed_;

  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  NbdHandlePtr handle_;
  // What handle_ negotiated: names result.extents.
  std::shared_ptr<const std::vector<std::string>> contexts_;
  asio::posix::stream_descriptor socket_;
  asio::steady_timer watchdog_;
  asio::steady_timer backoff_timer_;
  std::chrono::milliseconds backoff_ = kFirstBackoff;
  uint64_t reconnect_failures_ = 0;
  bool closing_ = false;
  bool read_armed_ = false;
  bool write_armed_ = false;
  // In flight, keyed by address: libnbd's callbacks get the raw pointer.
  std::unordered_map<UpstreamCommand*, std::unique_ptr<UpstreamCommand>> pending_;
  // Completed inside a libnbd call; handed back once that call has returned.
  std::vector<UpstreamCommand*> completed_;
  std::thread thread_;  // last: started once everything above exists
};

}  // namespace bscache::proxy
