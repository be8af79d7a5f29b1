#include "proxy/io/pipe_pool.hpp"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <utility>

namespace bscache::proxy {

namespace {
unsigned pipe_class_for(size_t bytes) {
  const size_t rounded = std::bit_ceil(std::max(bytes, PipePool::kSmallestClass));
  return static_cast<unsigned>(std::countr_zero(rounded) - std::countr_zero(PipePool::kSmallestClass));
}

void close_pair(int read_fd, int write_fd) {
  ::close(read_fd);
  ::close(write_fd);
}
}  // namespace

void PooledPipe::Shelves::closed(unsigned size_class) {
  --open;
  open_bytes -= PipePool::kSmallestClass << size_class;
}

PooledPipe::Shelves::~Shelves() {
  for (auto& shelf : idle) {
    for (const auto& p : shelf) close_pair(p.read_fd, p.write_fd);
  }
}

PooledPipe::PooledPipe(PooledPipe&& other) noexcept
    : shelves_(std::move(other.shelves_)),
      read_fd_(std::exchange(other.read_fd_, -1)),
      write_fd_(std::exchange(other.write_fd_, -1)),
      capacity_(std::exchange(other.capacity_, 0)),
      size_class_(other.size_class_) {}

PooledPipe& PooledPipe::operator=(PooledPipe&& other) noexcept {
  if (this != &other) {
    give_back();
    shelves_ = std::move(other.shelves_);
    read_fd_ = std::exchange(other.read_fd_, -1);
    write_fd_ = std::exchange(other.write_fd_, -1);
    capacity_ = std::exchange(other.capacity_, 0);
    size_class_ = other.size_class_;
  }
  return *this;
}

PooledPipe::~PooledPipe() {
  give_back();
}

// Only an empty pipe is reused: one a failed READ left bytes in (upstream
// died mid-payload, the client left before its reply) is closed instead.
void PooledPipe::give_back() {
  if (read_fd_ < 0) return;
  int unread = 0;
  auto& shelves = *shelves_;
  const bool empty = ::ioctl(read_fd_, FIONREAD, &unread) == 0 && unread == 0;
  bool kept = false;
  if (empty && shelves.idle_count < shelves.max_idle) {
    try {
      shelves.idle[size_class_].push_back({read_fd_, write_fd_});
      ++shelves.idle_count;
      kept = true;
    } catch (...) {
      // No memory for the shelf: just close it.
    }
  }
  if (!kept) {
    close_pair(read_fd_, write_fd_);
    shelves.closed(size_class_);
  }
  read_fd_ = write_fd_ = -1;
  shelves_.reset();
}

std::vector<int> write_ends(std::span<const PooledPipe> pipes) {
  std::vector<int> fds;
  fds.reserve(pipes.size());
  for (const auto& p : pipes) fds.push_back(p.write_fd());
  return fds;
}

std::vector<int> read_ends(std::span<const PooledPipe> pipes) {
  std::vector<int> fds;
  fds.reserve(pipes.size());
  for (const auto& p : pipes) fds.push_back(p.read_fd());
  return fds;
}

PipePool::PipePool(size_t max_idle, size_t max_open, std::chrono::milliseconds refusal_memory)
    : shelves_(std::make_shared<PooledPipe::Shelves>(max_idle, max_open, refusal_memory)) {}

std::optional<PooledPipe> PipePool::acquire(size_t bytes) {
  if (bytes == 0 || bytes > kMaxBytes) return std::nullopt;
  const unsigned size_class = pipe_class_for(bytes);
  PooledPipe pipe;
  pipe.shelves_ = shelves_;
  pipe.size_class_ = size_class;
  pipe.capacity_ = kSmallestClass << size_class;
  auto& shelf = shelves_->idle[size_class];
  if (!shelf.empty()) {
    pipe.read_fd_ = shelf.back().read_fd;
    pipe.write_fd_ = shelf.back().write_fd;
    shelf.pop_back();
    --shelves_->idle_count;
    return pipe;
  }
  auto& shelves = *shelves_;
  if (shelves.open >= shelves.max_open) {
    // At the limit: an idle pipe of another size makes room, else no pipe.
    auto other = std::find_if(shelves.idle.begin(), shelves.idle.end(), [](const auto& s) { return !s.empty(); });
    if (other == shelves.idle.end()) {
      return std::nullopt;
    }
    close_pair(other->back().read_fd, other->back().write_fd);
    other->pop_back();
    --shelves.idle_count;
    shelves.closed(static_cast<unsigned>(other - shelves.idle.begin()));
  }
  const bool past_refused_room = shelves.open_bytes + pipe.capacity_ > shelves.room_when_refused;
  if (shelves.refused > 0 && past_refused_room && std::chrono::steady_clock::now() < shelves.refusal_expires) {
    return std::nullopt;  // the kernel said no lately, with no more of its pipes taken than now
  }
  int fds[2];
  if (::pipe2(fds, O_NONBLOCK | O_CLOEXEC) == -1) {
    refuse(pipe.capacity_, errno);
    return std::nullopt;
  }
  // F_SETPIPE_SZ may round up; less than asked is a refusal.
  const int got = ::fcntl(fds[1], F_SETPIPE_SZ, static_cast<int>(pipe.capacity_));
  if (got < 0 || static_cast<size_t>(got) < pipe.capacity_) {
    const int error = got < 0 ? errno : 0;
    close_pair(fds[0], fds[1]);
    refuse(pipe.capacity_, error);
    return std::nullopt;
  }
  pipe.read_fd_ = fds[0];
  pipe.write_fd_ = fds[1];
  ++shelves.created;
  ++shelves.open;
  shelves.open_bytes += pipe.capacity_;
  return pipe;
}

void PipePool::refuse(size_t capacity, int error) {
  auto& shelves = *shelves_;
  if (shelves.refused++ == 0) {
    spdlog::warn(
        "the kernel refused a pipe of {} KiB ({}) with {} KiB of pipes open: data goes through buffers while "
        "it does. An unprivileged process may own fs.pipe-user-pages-soft pages of pipes in all (default 64 MiB, "
        "shared with the user's other processes) and one of at most fs.pipe-max-size bytes",
        capacity >> 10, error ? std::strerror(error) : "less than asked", shelves.open_bytes >> 10);
  }
  shelves.room_when_refused = shelves.open_bytes;
  shelves.refusal_expires = std::chrono::steady_clock::now() + shelves.refusal_memory;
}

std::vector<PooledPipe> PipePool::acquire_for(size_t bytes) {
  std::vector<PooledPipe> pipes;
  if (bytes == 0 || bytes > kMaxPayload) return pipes;
  for (size_t at = 0; at < bytes; at += kBytesPerPipe) {
    auto pipe = acquire(2 * std::min(kBytesPerPipe, bytes - at));
    if (!pipe) return {};
    pipes.push_back(std::move(*pipe));
  }
  return pipes;
}

bool PipePool::copy_out(std::span<const PooledPipe> pipes, std::span<uint8_t> out) {
  for (size_t at = 0; at < out.size();) {
    const auto share = share_at(at, out.size());
    if (share.index >= pipes.size()) return false;
    const ssize_t n = ::read(pipes[share.index].read_fd(), out.data() + at, share.bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;  // EAGAIN too: the data is not all there
    at += static_cast<size_t>(n);
  }
  return true;
}

uint64_t PipePool::created() const {
  return shelves_->created;
}

size_t PipePool::open() const {
  return shelves_->open;
}

uint64_t PipePool::refused() const {
  return shelves_->refused;
}

}  // namespace bscache::proxy
