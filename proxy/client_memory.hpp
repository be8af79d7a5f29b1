// ClientMemory: the bytes every client holds in bscache, counted together,
// and the one bound on them all (--max-client-memory).
//
// What a client holds is charged at its real footprint, not its payload: a
// request in flight costs kRequestCharge (its coroutine frames, the command
// upstream, room for its reply's header) plus the buffer or pipe pages its
// payload takes (a 1-byte READ takes a whole 4 KiB buffer); a queued reply
// costs its object, its header's heap block and its whole payload buffer
// (see Reply::memory). Sessions apply their own bound (--max-reply-backlog)
// to their own share, and ask this one before taking more:
//
//   - a request is taken only if the total stays within the limit with it
//     (its charge is known before any buffer is allocated), so the total
//     never exceeds the limit by more than the replies answered without
//     going upstream (cache hits, errors), each within kRequestCharge;
//   - beyond half the limit, a client with replies queued in bscache (its
//     socket is full: it does not read them) is not read from until they are
//     written. These are the clients that hold the most, and the memory they
//     hold is not coming back by itself; a client that reads its replies
//     holds only what is in flight, and is served while the total allows.
//
// A session that may not go on waits here: its timer is cancelled when
// memory comes back (after any release for a waiter of room; once the total
// is back under half for a waiter of the pressure rule). Each wait is woken
// once, so a release costs nothing when nobody waits and O(1) amortized
// when many do.
//
// Loop thread only: plain integers, no locks.
#pragma once

#include <cstddef>
#include <cstdint>

#include <boost/intrusive/list.hpp>

#include "proxy/asio.hpp"

namespace bscache::proxy {

// Bytes glibc's malloc takes for a block of `n` bytes: its 8-byte header,
// rounded up to 16, at least 32 (0 for no block).
constexpr size_t heap_block(size_t n) {
  if (n == 0) return 0;
  const size_t chunk = (n + 8 + 15) & ~size_t{15};
  return chunk < 32 ? 32 : chunk;
}

// A quarter of the machine's physical memory, at least 256 MiB: the default
// of --max-client-memory.
size_t default_client_memory();

class ClientMemory {
 public:
  // Charged per request in flight on top of its payload's buffer or pipes.
  static constexpr size_t kRequestCharge = 2048;

  explicit ClientMemory(size_t limit);

  size_t limit() const { return limit_; }
  size_t held() const { return held_; }
  // The most held at once since the last call to take_peak (which returns it).
  size_t peak() const { return peak_; }
  size_t take_peak();

  void charge(size_t bytes) {
    held_ += bytes;
    if (held_ > peak_) peak_ = held_;
  }
  void release(size_t bytes) {
    held_ -= bytes;
    if (!room_waiters_.empty() || (!pressure_waiters_.empty() && held_ <= limit_ / 2)) wake();
  }

  enum class Verdict : uint8_t {
    Go,        // take it
    Pressure,  // over half the limit and this client has replies queued: wait until they go
    Full,      // the limit cannot hold it: wait for memory to come back
  };
  // Whether a client whose queued replies hold `queued` bytes may take `more`.
  Verdict admit(size_t queued, size_t more) const {
    if (queued > 0 && held_ + more > limit_ / 2) return Verdict::Pressure;
    if (held_ + more > limit_) return Verdict::Full;
    return Verdict::Go;
  }

  // A session waiting for memory: its timer is cancelled when it should look again.
  class Waiter : public boost::intrusive::list_base_hook<boost::intrusive::link_mode<boost::intrusive::auto_unlink>> {
   public:
    explicit Waiter(asio::steady_timer& timer) : timer_(timer) {}

   private:
    friend class ClientMemory;
    asio::steady_timer& timer_;
  };
  // Registers `waiter` (once) for a wake-up; `why` is the verdict that stopped it.
  void wait(Waiter& waiter, Verdict why);

  // Clients stopped by this bound, ever (each stop counted once), and now.
  uint64_t pauses() const { return pauses_; }
  size_t paused() const { return room_waiters_.size() + pressure_waiters_.size(); }  // O(paused)
  void count_pause() { ++pauses_; }

 private:
  using Waiters = boost::intrusive::list<Waiter, boost::intrusive::constant_time_size<false>>;
  void wake();

  const size_t limit_;
  size_t held_ = 0;
  size_t peak_ = 0;
  uint64_t pauses_ = 0;
  Waiters room_waiters_;
  Waiters pressure_waiters_;
};

}  // namespace bscache::proxy
