#include "proxy/upstream.hpp"

#include "proxy/upstream_connect.hpp"

#include <poll.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

#include <boost/asio/async_result.hpp>
#include <boost/asio/dispatch.hpp>

namespace bscache::proxy {

// A command in flight. The libnbd callbacks get a raw pointer to it; it is
// owned by `pending_` until its completion has been posted back to the loop.
struct Upstream::Command {
  Upstream* owner = nullptr;
  uint64_t id = 0;
  const char* what = "";  // for logs
  uint64_t offset = 0, count = 0;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  CommandResult result;
  virtual ~Command() = default;
  // Hands the result to the awaiting coroutine. `defer` posts rather than
  // dispatches: needed while still inside the initiating function.
  virtual void complete(bool defer) = 0;
};

template <typename Handler>
struct Upstream::CommandWith final : Upstream::Command {
  explicit CommandWith(Handler h) : handler(std::move(h)) {}
  Handler handler;
  void complete(bool defer) override {
    auto executor = asio::get_associated_executor(handler, owner->io_.get_executor());
    auto job = [h = std::move(handler), r = std::move(result)]() mutable { h(std::move(r)); };
    if (defer) {
      asio::post(executor, std::move(job));
    } else {
      asio::dispatch(executor, std::move(job));
    }
  }
};

Upstream::Upstream(asio::io_context& io, const UpstreamTarget& target, UpstreamOptions options)
    : io_(io), target_(target), options_(options), socket_(io), watchdog_(io) {
  NbdHandlePtr handle = open_upstream(target_);
  info_ = read_upstream_info(handle.get());
  adopt(std::move(handle));
  if (options_.timeout.count() > 0) watch();
}

Upstream::~Upstream() {
  closing_ = true;
  helper_.join();  // a reconnect may be under way
  // libnbd owns the descriptor: never let Asio close it.
  if (socket_.is_open()) socket_.release();
}

void Upstream::adopt(NbdHandlePtr handle) {
  handle_ = std::move(handle);
  socket_.assign(nbd_aio_get_fd(handle_.get()));
  dead_ = false;
  pump();
}

// Ends the connection now: every command in flight fails with `error`. With
// the handle closed, libnbd no longer touches any of their buffers.
void Upstream::fail_connection(int error, const std::string& why) {
  if (!handle_) return;
  spdlog::warn("upstream connection lost: {}; {} commands in flight fail", why, pending_.size());
  if (socket_.is_open()) socket_.release();  // cancels our waits; libnbd closes the fd
  handle_.reset();
  dead_ = true;
  auto failed = std::move(pending_);
  pending_.clear();
  for (auto& [id, command] : failed) {
    command->result = CommandResult{};
    command->result.error = error;
    command->complete(true);
  }
  if (on_state_) on_state_(false);
  if (options_.reconnect && !closing_) schedule_reconnect();
}

void Upstream::schedule_reconnect() {
  const auto delay = backoff_;
  backoff_ = std::min(backoff_ * 2, std::chrono::milliseconds(5000));
  auto timer = std::make_shared<asio::steady_timer>(io_, delay);
  timer->async_wait([this, timer](boost::system::error_code ec) {
    if (ec || closing_) return;
    // Connecting blocks (DNS, TCP, the handshake): do it off the loop.
    asio::post(helper_, [this] {
      NbdHandlePtr handle;
      std::string error;
      try {
        handle = open_upstream(target_);
      } catch (const std::exception& e) {
        error = e.what();
      }
      asio::post(io_, [this, handle = std::move(handle), error]() mutable { reconnected(std::move(handle), error); });
    });
  });
}

void Upstream::reconnected(NbdHandlePtr handle, const std::string& error) {
  if (closing_) return;
  if (!handle) {
    ++reconnect_failures_;
    spdlog::warn("upstream reconnect attempt {} failed: {}", reconnect_failures_, error);
    schedule_reconnect();
    return;
  }
  const UpstreamInfo fresh = read_upstream_info(handle.get());
  if (fresh.size != info_.size || fresh.contexts != info_.contexts) {
    spdlog::warn("upstream changed across the reconnect (size {} -> {}); clients keep what they negotiated", info_.size,
                 fresh.size);
  }
  spdlog::info("upstream reconnected after {} failed attempts", reconnect_failures_);
  reconnect_failures_ = 0;
  backoff_ = kFirstBackoff;
  ++reconnects_;
  adopt(std::move(handle));
  if (on_state_) on_state_(true);
}

// With --upstream-timeout: a command upstream has not answered in time means
// the connection is stuck; drop it (failing everything in flight) and reconnect.
void Upstream::watch() {
  const auto period = std::max<std::chrono::milliseconds>(options_.timeout / 4, std::chrono::milliseconds(10));
  watchdog_.expires_after(period);
  watchdog_.async_wait([this](boost::system::error_code ec) {
    if (ec || closing_) return;
    const auto now = std::chrono::steady_clock::now();
    for (const auto& [id, command] : pending_) {
      if (now - command->started > options_.timeout) {
        fail_connection(ETIMEDOUT, "a command got no answer within --upstream-timeout");
        break;
      }
    }
    watch();
  });
}

awaitable<CommandResult> Upstream::pread(std::span<uint8_t> buffer, uint64_t offset, uint32_t flags) {
  return submit({Kind::Read, buffer.data(), buffer.size(), offset, flags});
}
awaitable<CommandResult> Upstream::pwrite(std::span<const uint8_t> data, uint64_t offset, uint32_t flags) {
  // libnbd takes a const buffer for writes; the cast only fits the shared Args shape.
  return submit({Kind::Write, const_cast<uint8_t*>(data.data()), data.size(), offset, flags});
}
awaitable<CommandResult> Upstream::flush(uint32_t flags) {
  return submit({Kind::Flush, nullptr, 0, 0, flags});
}
awaitable<CommandResult> Upstream::trim(uint64_t length, uint64_t offset, uint32_t flags) {
  return submit({Kind::Trim, nullptr, length, offset, flags});
}
awaitable<CommandResult> Upstream::zero(uint64_t length, uint64_t offset, uint32_t flags) {
  return submit({Kind::Zero, nullptr, length, offset, flags});
}
awaitable<CommandResult> Upstream::cache(uint64_t length, uint64_t offset, uint32_t flags) {
  return submit({Kind::Cache, nullptr, length, offset, flags});
}
awaitable<CommandResult> Upstream::block_status(uint64_t length, uint64_t offset, uint32_t flags) {
  return submit({Kind::BlockStatus, nullptr, length, offset, flags});
}

awaitable<CommandResult> Upstream::submit(Args args) {
  return asio::async_initiate<decltype(use_awaitable), void(CommandResult)>(
      [this, args](auto handler) { issue(std::make_unique<CommandWith<decltype(handler)>>(std::move(handler)), args); },
      use_awaitable);
}

void Upstream::issue(std::unique_ptr<Command> command, const Args& a) {
  command->owner = this;
  command->id = next_id_++;
  static constexpr const char* kNames[] = {"read", "write", "flush", "trim", "write_zeroes", "cache", "block_status"};
  command->what = kNames[static_cast<int>(a.kind)];
  command->offset = a.offset;
  command->count = a.count;
  if (dead_) {
    command->result.error = ESHUTDOWN;  // upstream is gone; we are reconnecting
    command->complete(true);
    return;
  }
  Command* raw = command.get();
  const uint64_t id = raw->id;
  pending_.emplace(id, std::move(command));
  nbd_handle* h = handle_.get();
  nbd_completion_callback done{.callback = on_complete, .user_data = raw, .free = nullptr};
  int64_t rc = -1;
  switch (a.kind) {
    case Kind::Read: {
      nbd_chunk_callback chunk{.callback = on_chunk, .user_data = raw, .free = nullptr};
      rc = nbd_aio_pread_structured(h, a.buffer, a.count, a.offset, chunk, done, a.flags);
      break;
    }
    case Kind::Write: rc = nbd_aio_pwrite(h, a.buffer, a.count, a.offset, done, a.flags); break;
    case Kind::Flush: rc = nbd_aio_flush(h, done, a.flags); break;
    case Kind::Trim: rc = nbd_aio_trim(h, a.count, a.offset, done, a.flags); break;
    case Kind::Zero: rc = nbd_aio_zero(h, a.count, a.offset, done, a.flags); break;
    case Kind::Cache: rc = nbd_aio_cache(h, a.count, a.offset, done, a.flags); break;
    case Kind::BlockStatus: {
      raw->result.extents.resize(info_.contexts.size());
      nbd_extent_callback extent{.callback = on_extent, .user_data = raw, .free = nullptr};
      rc = nbd_aio_block_status(h, a.count, a.offset, extent, done, a.flags);
      break;
    }
  }
  spdlog::trace("upstream: issued command {} as libnbd cookie {}", id, rc);
  if (rc == -1) {
    // libnbd refused the command (dead handle, bad arguments): complete it now.
    int err = nbd_get_errno();
    spdlog::warn("upstream refused command: {}", nbd_get_error() ? nbd_get_error() : "unknown");
    auto it = pending_.find(id);
    auto failed = std::move(it->second);
    pending_.erase(it);
    failed->result.error = err ? err : EIO;
    failed->complete(true);
    if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) fail_connection(ESHUTDOWN, "libnbd says the handle is dead");
    return;
  }
  pump();
}

// libnbd lock held: record and defer.
int Upstream::on_complete(void* user_data, int* error) {
  auto* command = static_cast<Command*>(user_data);
  command->result.error = *error;
  Upstream* owner = command->owner;
  asio::post(owner->io_, [owner, id = command->id] { owner->finish(id); });
  return 1;  // retire the command automatically
}

int Upstream::on_extent(void* user_data, const char* context, uint64_t, uint32_t* entries, size_t count, int*) {
  auto* command = static_cast<Command*>(user_data);
  const auto& contexts = command->owner->info_.contexts;
  auto it = std::find(contexts.begin(), contexts.end(), context);
  if (it == contexts.end()) return 0;
  auto& out = command->result.extents[static_cast<size_t>(it - contexts.begin())];
  out.reserve(out.size() + count / 2);
  for (size_t i = 0; i + 1 < count; i += 2) out.push_back({entries[i], entries[i + 1]});
  return 0;
}

int Upstream::on_chunk(void* user_data, const void*, size_t count, uint64_t offset, unsigned status, int*) {
  auto* command = static_cast<Command*>(user_data);
  if (status == LIBNBD_READ_DATA || status == LIBNBD_READ_HOLE) {
    command->result.chunks.push_back({offset, static_cast<uint32_t>(count), status == LIBNBD_READ_HOLE});
  }
  return 0;
}

void Upstream::finish(uint64_t id) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return;
  auto command = std::move(it->second);
  pending_.erase(it);
  spdlog::trace("upstream: command {} completed, error {}", id, command->result.error);
  if (command->result.error) {
    spdlog::warn("upstream {} at {}+{} failed: {}", command->what, command->offset, command->count,
                 strerror(command->result.error));
  }
  command->complete(false);
}

void Upstream::pump() {
  if (dead_ || !handle_) return;
  nbd_handle* h = handle_.get();
  if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
    fail_connection(ESHUTDOWN, "the server closed the connection");
    return;
  }
  const unsigned dir = nbd_aio_get_direction(h);
  if ((dir & LIBNBD_AIO_DIRECTION_READ) && !read_armed_) {
    read_armed_ = true;
    wait_until(POLLIN, [this] {
      if (nbd_aio_notify_read(handle_.get()) == -1) spdlog::warn("upstream: {}", nbd_get_error());
    });
  }
  if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && !write_armed_) {
    write_armed_ = true;
    wait_until(POLLOUT, [this] {
      // If a read notification already moved the state machine on, libnbd may
      // no longer want to write: ask again rather than notify blindly.
      if (nbd_aio_get_direction(handle_.get()) & LIBNBD_AIO_DIRECTION_WRITE) {
        if (nbd_aio_notify_write(handle_.get()) == -1) spdlog::warn("upstream: {}", nbd_get_error());
      }
    });
  }
}

// Tell libnbd only about readiness that is real. Asio's epoll reactor is
// edge-triggered and libnbd, not Asio, does the I/O: a wait can complete for
// data libnbd already consumed, and a spurious nbd_aio_notify_read parks
// libnbd in REPLY.START, where it sends no queued command until a reply
// arrives (none will: a deadlock). A wait can also miss an edge that came
// before it started. So poll(2) decides, before waiting and before notifying.
void Upstream::wait_until(short events, std::function<void()> notify) {
  const bool reading = events == POLLIN;
  if (socket_ready(events)) {
    asio::post(io_, [this, reading, notify = std::move(notify)] { on_ready(reading, notify); });
    return;
  }
  socket_.async_wait(reading ? asio::posix::stream_descriptor::wait_read : asio::posix::stream_descriptor::wait_write,
                     [this, reading, notify = std::move(notify)](boost::system::error_code ec) {
                       if (ec) {
                         (reading ? read_armed_ : write_armed_) = false;
                         return;
                       }
                       on_ready(reading, notify);
                     });
}

void Upstream::on_ready(bool reading, const std::function<void()>& notify) {
  (reading ? read_armed_ : write_armed_) = false;
  if (dead_) return;
  if (socket_ready(reading ? POLLIN : POLLOUT)) notify();
  pump();
}

bool Upstream::socket_ready(short events) {
  pollfd p{socket_.native_handle(), events, 0};
  // POLLHUP/POLLERR count as readable: libnbd must see the EOF or error.
  return ::poll(&p, 1, 0) > 0 && (p.revents & (events | POLLHUP | POLLERR));
}

void Upstream::shutdown() {
  closing_ = true;
  watchdog_.cancel();
  if (handle_ && !dead_ && nbd_aio_is_ready(handle_.get())) nbd_aio_disconnect(handle_.get(), 0);
  pump();
}

}  // namespace bscache::proxy
