// PipePool: kernel pipes that READ and WRITE data is spliced through, from
// one socket to the other (upstream's to the client's for a READ, the
// client's to upstream's for a WRITE), without entering bscache's memory.
//
// Why: moving bytes is what costs on these machines, and even with payload
// buffers reused (BufferPool) every byte would be copied twice by the
// kernel, from one socket into bscache and from bscache into the other.
// splice(2) moves the socket's pages into a pipe and from the pipe into the
// other socket: no copy at all on the way through.
//
// A payload is spread over pipes, kBytesPerPipe of it in each (acquire_for),
// and stays there until it is sent on (the READ's reply to the client, the
// WRITE to upstream), so a pipe needs room for its whole share: pipes come in
// power-of-two capacities (64 KiB to kMaxBytes), set with F_SETPIPE_SZ. The kernel may
// refuse a capacity (an unprivileged process is limited by
// /proc/sys/fs/pipe-max-size, default 1 MiB, and pipe-user-pages-soft, in
// all 64 MiB of pipes, shared by every process of the user: the packaged
// service runs as a dynamic user); acquire() then says no and the data takes
// a buffer instead. For a second after a refusal the pool asks the kernel
// for no pipe that would take its own past what it held when refused: each
// attempt costs four system calls, and under load every request would make
// one. Logged once. Data sits in the kernel's pages, not in bscache's
// heap; sessions count it in their byte budgets like a buffer (see
// SessionLimits).
//
// Loop thread only (pipes are taken and given back by sessions).
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

namespace bscache::proxy {

class PipePool;

// An owned pipe; back to the pool on destruction if it is empty, else closed.
class PooledPipe {
 public:
  PooledPipe() = default;
  PooledPipe(PooledPipe&& other) noexcept;
  PooledPipe& operator=(PooledPipe&& other) noexcept;
  ~PooledPipe();

  int read_fd() const { return read_fd_; }
  int write_fd() const { return write_fd_; }
  size_t capacity() const { return capacity_; }
  explicit operator bool() const { return read_fd_ >= 0; }

 private:
  friend class PipePool;
  struct Shelves;
  void give_back();

  std::shared_ptr<Shelves> shelves_;
  int read_fd_ = -1;
  int write_fd_ = -1;
  size_t capacity_ = 0;
  unsigned size_class_ = 0;
};

// The descriptors to splice into (write ends) or out of (read ends) of each pipe, in order.
std::vector<int> write_ends(std::span<const PooledPipe> pipes);
std::vector<int> read_ends(std::span<const PooledPipe> pipes);

class PipePool {
 public:
  // Keeps at most `max_idle` empty pipes for reuse, and has at most
  // `max_open` pipes open at once (each takes two descriptors): beyond that
  // acquire() says no and the data takes a buffer. After the kernel refuses
  // a pipe, no new one is asked for during `refusal_memory` if it would take
  // the pool's pipes past the room they had then.
  explicit PipePool(size_t max_idle = 64, size_t max_open = 1024,
                    std::chrono::milliseconds refusal_memory = std::chrono::seconds(1));

  // A pipe that holds at least `bytes` (1 to kMaxBytes); nullopt if the
  // kernel will not give one that large (limits, out of descriptors), did
  // not lately (see above), or max_open pipes are in use.
  std::optional<PooledPipe> acquire(size_t bytes);

  // Pipes for a payload of `bytes` (1 to kMaxPayload): one per kBytesPerPipe,
  // each with twice the room it is to hold (a pipe counts pieces of pages,
  // and pieces can be short). Empty if any is refused.
  std::vector<PooledPipe> acquire_for(size_t bytes);

  // Reads out.size() bytes out of `pipes` (from acquire_for) into `out`: a
  // copy, for when spliced data must go where no splice can take it. False
  // if the pipes hold less.
  static bool copy_out(std::span<const PooledPipe> pipes, std::span<uint8_t> out);

  // A payload of `total` bytes spread over pipes by acquire_for: byte `at`
  // is in pipe `index`, whose share goes on for `bytes` more.
  struct Share {
    size_t index;
    uint64_t bytes;
  };
  static Share share_at(uint64_t at, uint64_t total) {
    const uint64_t index = at / kBytesPerPipe;
    return {static_cast<size_t>(index), std::min(total, (index + 1) * kBytesPerPipe) - at};
  }

  // Pipes created (each one was not already in the pool); open now; the
  // kernel's refusals.
  uint64_t created() const;
  size_t open() const;
  uint64_t refused() const;

  static constexpr size_t kSmallestClass = size_t{64} * 1024;  // a pipe's default capacity
  static constexpr unsigned kClasses = 8;                      // 64 KiB << 7 = 8 MiB
  static constexpr size_t kMaxBytes = kSmallestClass << (kClasses - 1);
  // Twice this is the most an unprivileged process may make a pipe hold
  // (/proc/sys/fs/pipe-max-size, default 1 MiB).
  static constexpr size_t kBytesPerPipe = size_t{512} * 1024;
  static constexpr size_t kMaxPayload = 8 * kBytesPerPipe;  // larger payloads take a buffer

 private:
  void refuse(size_t capacity, int error);  // the kernel said no (error 0: a smaller pipe than asked)

  std::shared_ptr<PooledPipe::Shelves> shelves_;
};

struct PooledPipe::Shelves {
  Shelves(size_t idle_limit, size_t open_limit, std::chrono::milliseconds refusal_memory)
      : max_idle(idle_limit), max_open(open_limit), refusal_memory(refusal_memory) {}
  struct Idle {
    int read_fd, write_fd;
  };
  std::array<std::vector<Idle>, PipePool::kClasses> idle;
  const size_t max_idle;
  const size_t max_open;
  const std::chrono::milliseconds refusal_memory;
  size_t idle_count = 0;
  size_t open = 0;        // in use and idle
  size_t open_bytes = 0;  // their capacities
  uint64_t created = 0;
  // The last refusal: open_bytes then, and until when to believe it.
  uint64_t refused = 0;
  size_t room_when_refused = 0;
  std::chrono::steady_clock::time_point refusal_expires{};
  void closed(unsigned size_class);  // an open pipe was closed
  ~Shelves();
  Shelves(const Shelves&) = delete;
  Shelves& operator=(const Shelves&) = delete;
};

}  // namespace bscache::proxy
