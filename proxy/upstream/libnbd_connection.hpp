// LibnbdConnection: one libnbd connection to the upstream server, pumped by
// its own thread.
//
// Why a thread per connection: the thread that calls libnbd does the work of
// what the connection carries: the receives and sends of payloads (the
// kernel's copies into and out of our buffers) and, over TLS, GnuTLS's
// encryption. On a thread of its own that work overlaps the loop's (replies
// to clients, other sessions, WireConnection's spliced data) instead of
// taking turns with it. Everything that decides (the cache, the taint
// tracker, the counters) stays on the proxy's loop thread: this class only
// moves commands and bytes, and talks to the loop by message.
//
// Why a poll(2) loop of its own rather than an io_context: the thread waits
// on exactly two descriptors, libnbd's socket and a doorbell (eventfd), so one
// level-triggered poll per wake-up tells exactly what is ready. An Asio
// reactor here cost three system calls more per wake-up (epoll_wait, a poll
// to re-check readiness that libnbd, not Asio, consumes, and the epoll_ctl of
// every cross-thread post), about a third of the proxy's CPU on a byte-moving
// workload (measured with strace and perf).
//
// Thread rules: submit() and disconnect() may be called from any thread.
// Everything else in here, the libnbd handle included, is touched only on
// this connection's thread. libnbd runs our callbacks with the handle lock
// held, from inside nbd_aio_notify_*: they only record results; the commands
// are handed back once the libnbd call has returned, all that finished in one
// wake-up in one batch (one message to the loop, not one per command).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "proxy/upstream/config.hpp"
#include "proxy/upstream/connect.hpp"
#include "proxy/upstream/connection.hpp"
#include "proxy/upstream/reconnector.hpp"

namespace bscache::proxy {

class LibnbdConnection final : public UpstreamConnection {
 public:
  // Adopts an open handle (see open_upstream) and starts the thread.
  LibnbdConnection(size_t index, NbdHandlePtr handle, const UpstreamTarget& target, UpstreamOptions options,
                   Finished finished, StateChanged state_changed);
  // Closes the handle (failing what is in flight) and joins the thread.
  ~LibnbdConnection() override;
  LibnbdConnection(const LibnbdConnection&) = delete;
  LibnbdConnection& operator=(const LibnbdConnection&) = delete;

  // Any thread. The command is sent from this connection's thread soon after.
  void submit(std::unique_ptr<UpstreamCommand> command) override;
  // Any thread. Asks upstream to disconnect once what is in flight is answered.
  void disconnect() override;
  Kind kind() const override { return Kind::Libnbd; }
  bool splices() const override { return false; }

 private:
  using Clock = std::chrono::steady_clock;

  // What other threads hand this one, under mutex_.
  struct Inbox {
    UpstreamBatch commands;
    bool disconnect = false;
    bool stop = false;
    bool sleeping = false;  // the thread is (about to be) in poll: ring the doorbell
  };

  void run();
  void ring();        // under mutex_
  bool take_inbox();  // false: stop
  void issue(std::unique_ptr<UpstreamCommand> command);
  void finish(std::unique_ptr<UpstreamCommand> command);
  void hand_back();
  void adopt(NbdHandlePtr handle);
  void fail_connection(int error, const char* why);
  void try_reconnect();
  void check_timeout(Clock::time_point now);
  void notify(bool write);
  void after_libnbd_call();
  int poll_timeout_ms(Clock::time_point now) const;

  static int on_complete(void* user_data, int* error);
  static int on_extent(void* user_data, const char* context, uint64_t offset, uint32_t* entries, size_t count,
                       int* error);
  static int on_chunk(void* user_data, const void* subbuf, size_t count, uint64_t offset, unsigned status, int* error);

  const size_t index_;
  const Finished finished_;
  const StateChanged state_changed_;
  NbdHandlePtr first_handle_;  // adopted by the thread when it starts

  std::mutex mutex_;
  Inbox inbox_;     // guarded by mutex_
  int doorbell_;    // eventfd: written by ring(), drained by the thread
  Inbox incoming_;  // the thread's copy of what it took (reused)

  // The thread's own state.
  NbdHandlePtr handle_;
  int fd_ = -1;  // libnbd's socket (libnbd owns and closes it)
  // What handle_ negotiated: names result.extents.
  std::shared_ptr<const std::vector<std::string>> contexts_;
  bool closing_ = false;
  Reconnector reconnector_;
  std::optional<Clock::time_point> reconnect_at_;
  Clock::time_point next_timeout_check_;
  // In flight, keyed by address: libnbd's callbacks get the raw pointer.
  std::unordered_map<UpstreamCommand*, std::unique_ptr<UpstreamCommand>> pending_;
  // Completed inside a libnbd call; handed back once that call has returned.
  std::vector<UpstreamCommand*> completed_;
  UpstreamBatch finished_batch_;  // handed to finished_ once per wake-up
  std::thread thread_;            // last: started once everything above exists
};

}  // namespace bscache::proxy
