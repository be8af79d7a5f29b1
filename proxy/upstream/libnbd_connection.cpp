#include "proxy/upstream/libnbd_connection.hpp"

#include <libnbd.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "proxy/wire/protocol.hpp"

namespace bscache::proxy {

namespace {
// libnbd's command flags are the NBD wire bits: CommandFlags::to_wire is the mapping.
static_assert(LIBNBD_CMD_FLAG_FUA == wire::kCmdFlagFua && LIBNBD_CMD_FLAG_NO_HOLE == wire::kCmdFlagNoHole &&
              LIBNBD_CMD_FLAG_DF == wire::kCmdFlagDf && LIBNBD_CMD_FLAG_REQ_ONE == wire::kCmdFlagReqOne &&
              LIBNBD_CMD_FLAG_FAST_ZERO == wire::kCmdFlagFastZero);

#ifdef BSCACHE_HAVE_NBD_BLOCK_STATUS_64
// At most this many descriptors per context and reply (the protocol's cap for
// one chunk): a reply covering less than asked is allowed without REQ_ONE.
constexpr size_t kMaxDescriptors = (size_t{1} << 20) - 1;

// nbd_aio_block_status_64's callback (libnbd lock held): copies, as
// LibnbdConnection::on_extent does, since libnbd reuses `entries`. Extents
// keep their 64-bit lengths (wire::Descriptor's): a compact client's answer is
// clipped to its 32-bit request where it is cut (clip_descriptors).
int on_extent64(void* user_data, const char* context, uint64_t, nbd_extent* entries, size_t count, int* error) {
  auto* command = static_cast<UpstreamCommand*>(user_data);
  const auto& contexts = *command->result.contexts;
  auto it = std::find(contexts.begin(), contexts.end(), context);
  if (it == contexts.end()) return 0;
  auto& out = command->result.extents[static_cast<size_t>(it - contexts.begin())];
  const size_t most = command->args.flags.req_one ? 1 : kMaxDescriptors;
  uint64_t covered = 0;  // nothing past the request's end is of use
  for (size_t i = 0; i < count && out.size() < most && covered < command->args.length; ++i) {
    if (entries[i].flags > UINT32_MAX) {
      // No context bscache serves has such a status, and a descriptor's
      // status is 32 bits: fail the command rather than cut the status short.
      *error = EOVERFLOW;
      return -1;
    }
    out.push_back({entries[i].length, static_cast<uint32_t>(entries[i].flags)});
    covered += entries[i].length;
  }
  return 0;
}
#endif

int64_t start_command(nbd_handle* h, UpstreamCommand& c, nbd_chunk_callback chunk, nbd_extent_callback extent,
                      nbd_completion_callback done) {
  const auto& a = c.args;
  const uint32_t flags = a.flags.to_wire();
  switch (a.op) {
    case UpstreamOp::Read:
      return nbd_aio_pread_structured(h, a.buffer.data(), a.buffer.size(), a.offset, chunk, done, flags);
    case UpstreamOp::Write: return nbd_aio_pwrite(h, a.buffer.data(), a.buffer.size(), a.offset, done, flags);
    case UpstreamOp::Flush: return nbd_aio_flush(h, done, flags);
    case UpstreamOp::Trim: return nbd_aio_trim(h, a.length, a.offset, done, flags);
    case UpstreamOp::Zero: return nbd_aio_zero(h, a.length, a.offset, done, flags);
    case UpstreamOp::Cache: return nbd_aio_cache(h, a.length, a.offset, done, flags);
    case UpstreamOp::BlockStatus:
#ifdef BSCACHE_HAVE_NBD_BLOCK_STATUS_64
      // Whatever the length: one callback for every window, and with
      // extended headers extents (and windows) longer than 4 GiB - 1.
      return nbd_aio_block_status_64(h, a.length, a.offset,
                                     {.callback = on_extent64, .user_data = extent.user_data, .free = nullptr}, done,
                                     flags);
#else
      return nbd_aio_block_status(h, a.length, a.offset, extent, done, flags);
#endif
  }
  return -1;
}
}  // namespace

LibnbdConnection::LibnbdConnection(size_t index, NbdHandlePtr handle, const UpstreamTarget& target,
                                   UpstreamOptions options, Finished finished, StateChanged state_changed)
    : index_(index),
      finished_(std::move(finished)),
      state_changed_(std::move(state_changed)),
      first_handle_(std::move(handle)),
      doorbell_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)),
      reconnector_(index, target, options) {
  if (doorbell_ < 0) throw std::runtime_error(std::string("eventfd: ") + strerror(errno));
  thread_ = std::thread([this] { run(); });
}

LibnbdConnection::~LibnbdConnection() {
  {
    std::lock_guard lock(mutex_);
    inbox_.stop = true;
    ring();
  }
  thread_.join();
  ::close(doorbell_);
}

// Under mutex_: wake the thread if it sleeps (once; it clears the flag when it wakes).
void LibnbdConnection::ring() {
  if (!inbox_.sleeping) return;
  inbox_.sleeping = false;
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(doorbell_, &one, sizeof one);  // can only fail if the counter is full
}

void LibnbdConnection::submit(std::unique_ptr<UpstreamCommand> command) {
  std::lock_guard lock(mutex_);
  inbox_.commands.push_back(std::move(command));
  ring();
}

void LibnbdConnection::disconnect() {
  std::lock_guard lock(mutex_);
  inbox_.disconnect = true;
  ring();
}

void LibnbdConnection::run() {
  adopt(std::move(first_handle_));
  while (take_inbox()) {
    const auto now = Clock::now();
    if (reconnect_at_ && now >= *reconnect_at_) try_reconnect();
    check_timeout(now);
    hand_back();

    std::array<pollfd, 2> fds{pollfd{doorbell_, POLLIN, 0}, pollfd{-1, 0, 0}};
    if (handle_) {
      const unsigned dir = nbd_aio_get_direction(handle_.get());
      short events = 0;
      if (dir & LIBNBD_AIO_DIRECTION_READ) events |= POLLIN;
      if (dir & LIBNBD_AIO_DIRECTION_WRITE) events |= POLLOUT;
      fds[1] = {fd_, events, 0};
    }
    {
      std::lock_guard lock(mutex_);
      const bool more = !inbox_.commands.empty() || inbox_.disconnect || inbox_.stop;
      if (more) continue;  // take it before sleeping
      inbox_.sleeping = true;
    }
    const int ready = ::poll(fds.data(), fds.size(), poll_timeout_ms(Clock::now()));
    {
      std::lock_guard lock(mutex_);
      inbox_.sleeping = false;
    }
    if (ready <= 0) continue;  // timeout (timers run above) or EINTR
    if (fds[0].revents & POLLIN) {
      uint64_t count = 0;
      [[maybe_unused]] ssize_t n = ::read(doorbell_, &count, sizeof count);
    }
    // poll is level-triggered and libnbd is this thread's alone, so readiness
    // is real when we notify: a spurious nbd_aio_notify_read would park libnbd
    // in REPLY.START, where it sends no queued command until a reply arrives.
    // Both ready: read first (libnbd's rule), then write only if libnbd, asked
    // again, still wants to (reading may have moved its state machine on);
    // the socket's write space cannot have shrunk meanwhile.
    const short revents = fds[1].revents;
    if (handle_ && revents) {
      if (revents & (POLLIN | POLLHUP | POLLERR)) notify(false);
      if ((revents & POLLOUT) && handle_ && (nbd_aio_get_direction(handle_.get()) & LIBNBD_AIO_DIRECTION_WRITE)) {
        notify(true);
      }
    }
  }
  closing_ = true;
  fail_connection(ESHUTDOWN, nullptr);
  hand_back();
}

// Tells libnbd its socket is ready; what that finished joins the batch.
void LibnbdConnection::notify(bool write) {
  nbd_handle* h = handle_.get();
  if ((write ? nbd_aio_notify_write(h) : nbd_aio_notify_read(h)) == -1) {
    spdlog::warn("upstream connection {}: {}", index_, nbd_get_error());
  }
  after_libnbd_call();
}

// Takes what other threads handed in; false once asked to stop.
bool LibnbdConnection::take_inbox() {
  incoming_.commands.clear();
  {
    std::lock_guard lock(mutex_);
    std::swap(incoming_.commands, inbox_.commands);
    incoming_.disconnect = std::exchange(inbox_.disconnect, false);
    incoming_.stop = inbox_.stop;
  }
  if (incoming_.stop) {
    for (auto& command : incoming_.commands) {
      command->result.error = ESHUTDOWN;  // handed in as we close: never sent
      finish(std::move(command));
    }
    return false;
  }
  for (auto& command : incoming_.commands) issue(std::move(command));
  if (incoming_.disconnect) {
    closing_ = true;
    reconnect_at_.reset();
    if (handle_ && nbd_aio_is_ready(handle_.get())) {
      nbd_aio_disconnect(handle_.get(), 0);
      after_libnbd_call();
    }
  }
  return true;
}

void LibnbdConnection::adopt(NbdHandlePtr handle) {
  handle_ = std::move(handle);
  contexts_ = std::make_shared<const std::vector<std::string>>(selected_meta_contexts(handle_.get()));
  fd_ = nbd_aio_get_fd(handle_.get());
}

void LibnbdConnection::finish(std::unique_ptr<UpstreamCommand> command) {
  finished_batch_.push_back(std::move(command));
}

void LibnbdConnection::issue(std::unique_ptr<UpstreamCommand> command) {
  if (!handle_) {
    // Submitted before the loop heard this connection was lost.
    command->result.error = ESHUTDOWN;
    command->never_sent = true;
    finish(std::move(command));
    return;
  }
  if (command->cancelled && command->cancelled->load(std::memory_order_relaxed)) {
    command->result.error = ECANCELED;  // nobody waits for it: never send it
    finish(std::move(command));
    return;
  }
  UpstreamCommand* raw = command.get();
  raw->done = &completed_;
  raw->started = Clock::now();
  if (raw->args.op == UpstreamOp::BlockStatus) {
    raw->result.contexts = contexts_;
    raw->result.extents.resize(contexts_->size());
  }
  pending_.emplace(raw, std::move(command));
  const int64_t cookie = start_command(handle_.get(), *raw, {.callback = on_chunk, .user_data = raw, .free = nullptr},
                                       {.callback = on_extent, .user_data = raw, .free = nullptr},
                                       {.callback = on_complete, .user_data = raw, .free = nullptr});
  if (cookie == -1) {
    // libnbd refused the command (dead handle, bad arguments): complete it now.
    const int err = nbd_get_errno();
    spdlog::warn("upstream connection {} refused command: {}", index_,
                 nbd_get_error() ? nbd_get_error() : "unknown error");
    auto it = pending_.find(raw);
    auto failed = std::move(it->second);
    pending_.erase(it);
    failed->result.error = err ? err : EIO;
    // A handle found dead only now sent nothing: another connection may.
    failed->never_sent = nbd_aio_is_dead(handle_.get()) || nbd_aio_is_closed(handle_.get());
    finish(std::move(failed));
  }
  // Issuing may have sent bytes, completed commands or found the handle dead.
  after_libnbd_call();
}

// libnbd lock held, inside an nbd_aio_* call: record, hand back later.
int LibnbdConnection::on_complete(void* user_data, int* error) {
  auto* command = static_cast<UpstreamCommand*>(user_data);
  command->result.error = *error;
  command->done->push_back(command);
  return 1;  // retire the command automatically
}

int LibnbdConnection::on_extent(void* user_data, const char* context, uint64_t, uint32_t* entries, size_t count, int*) {
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

int LibnbdConnection::on_chunk(void* user_data, const void*, size_t count, uint64_t offset, unsigned status, int*) {
  auto* command = static_cast<UpstreamCommand*>(user_data);
  if (status == LIBNBD_READ_DATA || status == LIBNBD_READ_HOLE) {
    command->result.chunks.push_back({offset, static_cast<uint32_t>(count), status == LIBNBD_READ_HOLE});
  }
  return 0;
}

// After any libnbd call: what completed in it joins the batch (libnbd has
// returned, so nothing of its refers to those commands any more), then a dead
// handle ends the connection.
void LibnbdConnection::after_libnbd_call() {
  for (UpstreamCommand* raw : completed_) {
    auto it = pending_.find(raw);
    if (it == pending_.end()) continue;
    finish(std::move(it->second));
    pending_.erase(it);
  }
  completed_.clear();
  if (!handle_) return;
  nbd_handle* h = handle_.get();
  if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
    fail_connection(ESHUTDOWN, closing_ ? nullptr : "the server closed the connection");
  }
}

// One message to the loop for everything that finished since the last one.
void LibnbdConnection::hand_back() {
  if (finished_batch_.empty()) return;
  finished_(std::exchange(finished_batch_, {}));
}

// Ends the connection now: every command in flight fails with `error`. With
// the handle closed, libnbd no longer touches any of their buffers.
void LibnbdConnection::fail_connection(int error, const char* why) {
  if (!handle_) return;
  if (why) reconnector_.log_lost(why, pending_.size());
  handle_.reset();  // libnbd closes its socket
  fd_ = -1;
  completed_.clear();  // their commands are in pending_ and fail below
  auto failed = std::move(pending_);
  pending_.clear();
  for (auto& [raw, command] : failed) {
    command->result = CommandResult{};
    command->result.error = error;
    finish(std::move(command));
  }
  if (closing_) return;
  hand_back();  // the failures reach the loop before the news of the loss
  state_changed_(index_, std::nullopt);
  if (reconnector_.reconnects()) reconnect_at_ = Clock::now() + reconnector_.backoff();
}

void LibnbdConnection::try_reconnect() {
  reconnect_at_.reset();
  if (closing_) return;
  // Connecting blocks (DNS, TCP, the handshake). That is fine here: this
  // thread serves only this connection, and while it is down the pool sends
  // it nothing.
  try {
    OpenedUpstream opened = reconnector_.open(Reconnector::For::Libnbd);
    reconnector_.succeeded();
    adopt(std::move(opened.handle));
    state_changed_(index_, std::move(opened.info));
  } catch (const std::exception& e) {
    reconnector_.failed(e.what());
    reconnect_at_ = Clock::now() + reconnector_.backoff();
  }
}

// With --upstream-timeout: a command upstream has not answered in time means
// the connection is stuck; drop it (failing everything in flight) and reconnect.
void LibnbdConnection::check_timeout(Clock::time_point now) {
  if (!reconnector_.times_out() || now < next_timeout_check_) return;
  next_timeout_check_ = now + reconnector_.timeout_check_period();
  for (const auto& [raw, command] : pending_) {
    if (reconnector_.overdue(command->started, now)) {
      fail_connection(ETIMEDOUT, Reconnector::kOverdue);
      return;
    }
  }
}

// Until the next timer: a reconnect attempt, or the timeout check while commands are in flight.
int LibnbdConnection::poll_timeout_ms(Clock::time_point now) const {
  std::optional<Clock::time_point> wake = reconnect_at_;
  if (reconnector_.times_out() && !pending_.empty() && (!wake || next_timeout_check_ < *wake)) {
    wake = next_timeout_check_;
  }
  if (!wake) return -1;
  if (*wake <= now) return 0;
  // Rounded up, so a wake-up is never early (and never spins at 0 ms).
  return static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(*wake - now).count());
}

}  // namespace bscache::proxy
