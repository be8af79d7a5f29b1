#include "proxy/upstream.hpp"

#include <poll.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

#include <boost/asio/async_result.hpp>
#include <boost/asio/dispatch.hpp>

namespace bscache::proxy {

namespace {
std::runtime_error libnbd_failure(const char* what) {
  return std::runtime_error(std::string(what) + ": " + (nbd_get_error() ? nbd_get_error() : "unknown error"));
}

int meta_context_collector(void* user_data, const char* name) {
  static_cast<std::vector<std::string>*>(user_data)->emplace_back(name);
  return 0;
}
}  // namespace

// A command in flight. The libnbd callbacks get a raw pointer to it; it is
// owned by `pending_` until its completion has been posted back to the loop.
struct Upstream::Command {
  Upstream* owner = nullptr;
  uint64_t id = 0;
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

Upstream::Upstream(asio::io_context& io, const UpstreamTarget& target) : io_(io), socket_(io) {
  handle_.reset(nbd_create());
  if (!handle_) throw libnbd_failure("nbd_create");
  nbd_handle* h = handle_.get();
  nbd_set_handle_name(h, "upstream");
  // Option mode lets us ask which meta contexts upstream offers before GO.
  if (nbd_set_opt_mode(h, true) == -1 || nbd_set_full_info(h, true) == -1) throw libnbd_failure("libnbd setup");
  if (!target.command.empty()) {
    std::vector<char*> argv;
    for (const auto& arg : target.command) argv.push_back(const_cast<char*>(arg.c_str()));
    argv.push_back(nullptr);
    if (target.export_name_set) nbd_set_export_name(h, target.export_name.c_str());
    if (nbd_connect_systemd_socket_activation(h, argv.data()) == -1) throw libnbd_failure("starting upstream command");
  } else {
    if (nbd_connect_uri(h, target.uri.c_str()) == -1) throw libnbd_failure("connecting to upstream");
  }
  if (target.export_name_set) nbd_set_export_name(h, target.export_name.c_str());

  std::vector<std::string> offered;
  if (nbd_get_structured_replies_negotiated(h) == 1) {
    nbd_context_callback collect{.callback = meta_context_collector, .user_data = &offered, .free = nullptr};
    if (nbd_opt_list_meta_context(h, collect) == -1) offered.clear();
  }
  for (const auto& name : offered) nbd_add_meta_context(h, name.c_str());
  if (nbd_opt_go(h) == -1) throw libnbd_failure("upstream refused the export");
  learn_info();
  socket_.assign(nbd_aio_get_fd(h));
  pump();
}

Upstream::~Upstream() {
  // libnbd owns the descriptor: never let Asio close it.
  if (socket_.is_open()) socket_.release();
}

void Upstream::learn_info() {
  nbd_handle* h = handle_.get();
  auto flag = [](int v) { return v == 1; };
  info_.size = static_cast<uint64_t>(nbd_get_size(h));
  info_.read_only = flag(nbd_is_read_only(h));
  info_.can_flush = flag(nbd_can_flush(h));
  info_.can_fua = flag(nbd_can_fua(h));
  info_.can_trim = flag(nbd_can_trim(h));
  info_.can_zero = flag(nbd_can_zero(h));
  info_.can_fast_zero = flag(nbd_can_fast_zero(h));
  info_.can_cache = flag(nbd_can_cache(h));
  info_.can_df = flag(nbd_can_df(h));
  info_.can_multi_conn = flag(nbd_can_multi_conn(h));
  info_.rotational = flag(nbd_is_rotational(h));
  if (int64_t v = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM); v > 0) {
    info_.min_block = static_cast<uint32_t>(v);
    info_.advertises_block_size = true;
  }
  if (int64_t v = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED); v > 0) info_.preferred_block = static_cast<uint32_t>(v);
  if (int64_t v = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM); v > 0) info_.max_block = static_cast<uint32_t>(v);
  if (char* name = nbd_get_canonical_export_name(h)) {
    info_.export_name = name;
    free(name);  // NOLINT: libnbd returns malloc'd strings
  }
  if (char* d = nbd_get_export_description(h)) {
    info_.description = d;
    free(d);  // NOLINT
  }
  // Ask libnbd which contexts were really selected, in a stable order.
  std::vector<std::string> offered;
  for (size_t i = 0;; ++i) {
    char* name = nbd_get_meta_context(h, i);
    if (!name) break;
    offered.emplace_back(name);
    free(name);  // NOLINT
  }
  for (const auto& name : offered) {
    if (nbd_can_meta_context(h, name.c_str()) == 1) info_.contexts.push_back(name);
  }
  auto it = std::find(info_.contexts.begin(), info_.contexts.end(), wire::kBaseAllocation);
  info_.base_allocation_index = it == info_.contexts.end() ? -1 : static_cast<int>(it - info_.contexts.begin());
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
  if (dead_) {
    command->result.error = ENOTCONN;
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
    if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) dead_ = true;
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
  command->complete(false);
}

void Upstream::pump() {
  if (dead_) return;
  nbd_handle* h = handle_.get();
  if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
    if (!dead_) spdlog::warn("upstream connection is gone: {}", nbd_get_error() ? nbd_get_error() : "closed");
    dead_ = true;
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
  if (!dead_ && nbd_aio_is_ready(handle_.get())) nbd_aio_disconnect(handle_.get(), 0);
  pump();
}

}  // namespace bscache::proxy
