#include "proxy/upstream_connection.hpp"

#include <libnbd.h>
#include <poll.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace bscache::proxy {

namespace {
uint32_t libnbd_flags(const CommandFlags& f) {
  uint32_t out = 0;
  if (f.fua) out |= LIBNBD_CMD_FLAG_FUA;
  if (f.no_hole) out |= LIBNBD_CMD_FLAG_NO_HOLE;
  if (f.fast_zero) out |= LIBNBD_CMD_FLAG_FAST_ZERO;
  if (f.df) out |= LIBNBD_CMD_FLAG_DF;
  if (f.req_one) out |= LIBNBD_CMD_FLAG_REQ_ONE;
  return out;
}
}  // namespace

UpstreamConnection::UpstreamConnection(size_t index, NbdHandlePtr handle, const UpstreamTarget& target,
                                       UpstreamOptions options, Finished finished, StateChanged state_changed)
    : index_(index),
      target_(target),
      options_(options),
      finished_(std::move(finished)),
      state_changed_(std::move(state_changed)),
      work_(io_.get_executor()),
      socket_(io_),
      watchdog_(io_),
      backoff_timer_(io_) {
  // Adopted on this connection's own thread, like everything that touches the handle.
  asio::post(io_, [this, h = std::move(handle)]() mutable {
    adopt(std::move(h));
    if (options_.timeout.count() > 0) watch();
  });
  thread_ = std::thread([this] { io_.run(); });
}

UpstreamConnection::~UpstreamConnection() {
  asio::post(io_, [this] {
    closing_ = true;
    watchdog_.cancel();
    backoff_timer_.cancel();
    fail_connection(ESHUTDOWN, "");
    work_.reset();
  });
  thread_.join();
}

void UpstreamConnection::submit(std::unique_ptr<UpstreamCommand> command) {
  asio::post(io_, [this, c = std::move(command)]() mutable { issue(std::move(c)); });
}

void UpstreamConnection::disconnect() {
  asio::post(io_, [this] {
    closing_ = true;
    watchdog_.cancel();
    backoff_timer_.cancel();
    if (handle_ && nbd_aio_is_ready(handle_.get())) nbd_aio_disconnect(handle_.get(), 0);
    pump();
  });
}

void UpstreamConnection::adopt(NbdHandlePtr handle) {
  handle_ = std::move(handle);
  auto contexts = std::make_shared<std::vector<std::string>>();
  for (size_t i = 0;; ++i) {
    char* raw_name = nbd_get_meta_context(handle_.get(), i);
    if (!raw_name) break;
    std::string name = take_libnbd_string(raw_name);
    if (nbd_can_meta_context(handle_.get(), name.c_str()) == 1) contexts->push_back(std::move(name));
  }
  contexts_ = std::move(contexts);
  socket_.assign(nbd_aio_get_fd(handle_.get()));
  pump();
}

void UpstreamConnection::issue(std::unique_ptr<UpstreamCommand> command) {
  if (!handle_) {
    command->result.error = ESHUTDOWN;  // upstream is gone; we are reconnecting
    finished_(std::move(command));
    return;
  }
  if (command->cancelled && command->cancelled->load(std::memory_order_relaxed)) {
    command->result.error = ECANCELED;  // nobody waits for it: never send it
    finished_(std::move(command));
    return;
  }
  UpstreamCommand* raw = command.get();
  raw->via = this;
  raw->started = std::chrono::steady_clock::now();
  if (raw->args.op == UpstreamOp::BlockStatus) {
    raw->result.contexts = contexts_;
    raw->result.extents.resize(contexts_->size());
  }
  pending_.emplace(raw, std::move(command));
  const int64_t cookie = start_command(handle_.get(), *raw);
  if (cookie == -1) {
    // libnbd refused the command (dead handle, bad arguments): complete it now.
    const int err = nbd_get_errno();
    spdlog::warn("upstream connection {} refused command: {}", index_,
                 nbd_get_error() ? nbd_get_error() : "unknown error");
    auto it = pending_.find(raw);
    auto failed = std::move(it->second);
    pending_.erase(it);
    failed->result.error = err ? err : EIO;
    finished_(std::move(failed));
    nbd_handle* h = handle_.get();
    if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) fail_connection(ESHUTDOWN, "libnbd says the handle is dead");
    return;
  }
  pump();
}

int64_t UpstreamConnection::start_command(nbd_handle* h, UpstreamCommand& c) {
  const auto& a = c.args;
  const uint32_t flags = libnbd_flags(a.flags);
  nbd_completion_callback done{.callback = on_complete, .user_data = &c, .free = nullptr};
  switch (a.op) {
    case UpstreamOp::Read: {
      nbd_chunk_callback chunk{.callback = on_chunk, .user_data = &c, .free = nullptr};
      return nbd_aio_pread_structured(h, a.buffer.data(), a.buffer.size(), a.offset, chunk, done, flags);
    }
    case UpstreamOp::Write: return nbd_aio_pwrite(h, a.buffer.data(), a.buffer.size(), a.offset, done, flags);
    case UpstreamOp::Flush: return nbd_aio_flush(h, done, flags);
    case UpstreamOp::Trim: return nbd_aio_trim(h, a.length, a.offset, done, flags);
    case UpstreamOp::Zero: return nbd_aio_zero(h, a.length, a.offset, done, flags);
    case UpstreamOp::Cache: return nbd_aio_cache(h, a.length, a.offset, done, flags);
    case UpstreamOp::BlockStatus: {
      nbd_extent_callback extent{.callback = on_extent, .user_data = &c, .free = nullptr};
      return nbd_aio_block_status(h, a.length, a.offset, extent, done, flags);
    }
  }
  return -1;
}

// libnbd lock held, inside nbd_aio_notify_*: record, hand back later.
int UpstreamConnection::on_complete(void* user_data, int* error) {
  auto* command = static_cast<UpstreamCommand*>(user_data);
  command->result.error = *error;
  command->via->completed_.push_back(command);
  return 1;  // retire the command automatically
}

int UpstreamConnection::on_extent(void* user_data, const char* context, uint64_t, uint32_t* entries, size_t count,
                                  int*) {
  auto* command = static_cast<UpstreamCommand*>(user_data);
  const auto& contexts = *command->result.contexts;
  auto it = std::find(contexts.begin(), contexts.end(), context);
  if (it == contexts.end()) return 0;
  // libnbd reuses `entries` for the next chunk: copy.
  auto& out = command->result.extents[static_cast<size_t>(it - contexts.begin())];
  out.reserve(out.size() + count / 2);
  for (size_t i = 0; i + 1 < count; i += 2) out.push_back({entries[i], entries[i + 1]});
  return 0;
}

int UpstreamConnection::on_chunk(void* user_data, const void*, size_t count, uint64_t offset, unsigned status, int*) {
  auto* command = static_cast<UpstreamCommand*>(user_data);
  if (status == LIBNBD_READ_DATA || status == LIBNBD_READ_HOLE) {
    command->result.chunks.push_back({offset, static_cast<uint32_t>(count), status == LIBNBD_READ_HOLE});
  }
  return 0;
}

// libnbd has returned: nothing of its still refers to these commands.
void UpstreamConnection::hand_back_completed() {
  for (UpstreamCommand* raw : completed_) {
    auto it = pending_.find(raw);
    if (it == pending_.end()) continue;
    auto command = std::move(it->second);
    pending_.erase(it);
    finished_(std::move(command));
  }
  completed_.clear();
}

// Ends the connection now: every command in flight fails with `error`. With
// the handle closed, libnbd no longer touches any of their buffers.
void UpstreamConnection::fail_connection(int error, const std::string& why) {
  if (!handle_) return;
  if (!why.empty()) {
    spdlog::warn("upstream connection {} lost: {}; {} commands in flight fail", index_, why, pending_.size());
  }
  if (socket_.is_open()) socket_.release();  // cancels our waits; libnbd closes the fd
  handle_.reset();
  read_armed_ = write_armed_ = false;
  completed_.clear();  // their commands are in pending_ and fail below
  auto failed = std::move(pending_);
  pending_.clear();
  for (auto& [raw, command] : failed) {
    command->result = CommandResult{};
    command->result.error = error;
    finished_(std::move(command));
  }
  if (closing_) return;
  state_changed_(index_, std::nullopt);
  if (options_.reconnect) schedule_reconnect();
}

void UpstreamConnection::schedule_reconnect() {
  backoff_timer_.expires_after(backoff_);
  backoff_ = std::min(backoff_ * 2, std::chrono::milliseconds(5000));
  backoff_timer_.async_wait([this](boost::system::error_code ec) {
    if (ec || closing_) return;
    // Connecting blocks (DNS, TCP, the handshake). That is fine here: this
    // thread serves only this connection, and while it is down the pool
    // sends it nothing.
    try {
      NbdHandlePtr handle = open_upstream(target_);
      UpstreamInfo fresh = read_upstream_info(handle.get());
      spdlog::info("upstream connection {} reconnected after {} failed attempts", index_, reconnect_failures_);
      reconnect_failures_ = 0;
      backoff_ = kFirstBackoff;
      adopt(std::move(handle));
      state_changed_(index_, std::move(fresh));
    } catch (const std::exception& e) {
      ++reconnect_failures_;
      spdlog::warn("upstream connection {}: reconnect attempt {} failed: {}", index_, reconnect_failures_, e.what());
      schedule_reconnect();
    }
  });
}

// With --upstream-timeout: a command upstream has not answered in time means
// the connection is stuck; drop it (failing everything in flight) and reconnect.
void UpstreamConnection::watch() {
  const auto period = std::max<std::chrono::milliseconds>(options_.timeout / 4, std::chrono::milliseconds(10));
  watchdog_.expires_after(period);
  watchdog_.async_wait([this](boost::system::error_code ec) {
    if (ec || closing_) return;
    const auto now = std::chrono::steady_clock::now();
    for (const auto& [raw, command] : pending_) {
      if (now - command->started > options_.timeout) {
        fail_connection(ETIMEDOUT, "a command got no answer within --upstream-timeout");
        break;
      }
    }
    watch();
  });
}

void UpstreamConnection::pump() {
  hand_back_completed();
  if (!handle_) return;
  nbd_handle* h = handle_.get();
  if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
    fail_connection(ESHUTDOWN, closing_ ? "" : "the server closed the connection");
    return;
  }
  const unsigned dir = nbd_aio_get_direction(h);
  if ((dir & LIBNBD_AIO_DIRECTION_READ) && !read_armed_) {
    read_armed_ = true;
    wait_until(POLLIN);
  }
  if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && !write_armed_) {
    write_armed_ = true;
    wait_until(POLLOUT);
  }
}

// Tell libnbd only about readiness that is real. Asio's epoll reactor is
// edge-triggered and libnbd, not Asio, does the I/O: a wait can complete for
// data libnbd already consumed, and a spurious nbd_aio_notify_read parks
// libnbd in REPLY.START, where it sends no queued command until a reply
// arrives (none will: a deadlock). A wait can also miss an edge that came
// before it started. So poll(2) decides, before waiting and before notifying.
void UpstreamConnection::wait_until(short events) {
  const bool reading = events == POLLIN;
  if (socket_ready(events)) {
    asio::post(io_, [this, reading] { on_ready(reading); });
    return;
  }
  socket_.async_wait(reading ? asio::posix::stream_descriptor::wait_read : asio::posix::stream_descriptor::wait_write,
                     [this, reading](boost::system::error_code ec) {
                       if (ec) {
                         (reading ? read_armed_ : write_armed_) = false;
                         return;
                       }
                       on_ready(reading);
                     });
}

void UpstreamConnection::on_ready(bool reading) {
  (reading ? read_armed_ : write_armed_) = false;
  if (!handle_) return;
  nbd_handle* h = handle_.get();
  if (reading) {
    if (socket_ready(POLLIN) && nbd_aio_notify_read(h) == -1) spdlog::warn("upstream: {}", nbd_get_error());
  } else if (nbd_aio_get_direction(h) & LIBNBD_AIO_DIRECTION_WRITE) {
    // A read notification may already have moved the state machine on:
    // libnbd may no longer want to write, so ask again rather than notify blindly.
    if (socket_ready(POLLOUT) && nbd_aio_notify_write(h) == -1) spdlog::warn("upstream: {}", nbd_get_error());
  }
  pump();
}

bool UpstreamConnection::socket_ready(short events) {
  pollfd p{socket_.native_handle(), events, 0};
  // POLLHUP/POLLERR count as readable: libnbd must see the EOF or error.
  return ::poll(&p, 1, 0) > 0 && (p.revents & (events | POLLHUP | POLLERR));
}

}  // namespace bscache::proxy
