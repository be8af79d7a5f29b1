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
//     going upstream (cache hits, errors), each within kRequestCharge. Clients
//     waiting for room are served first come, first served: a client does
//     not take room while others wait for it before it (else one client
//     among many that want room would lose every race for it). A request
//     larger than the whole limit is taken when nothing else is held;
//   - beyond half the limit, a client that holds anything (requests in
//     flight, replies queued) is not read from until it holds nothing: one
//     request at a time each, and a client whose replies queue up because it
//     does not read them stops for good. Those are the clients that hold the
//     most, and what they hold is not coming back by itself; a client that
//     reads its replies comes back to holding nothing after each answer and
//     is served while the total allows. So clients that never read hold at
//     most half the limit plus one request and its reply each.
//
// A session that may not go on waits here: its timer is cancelled when it
// may (the first waiter of room, once its request fits; every waiter of the
// pressure rule once the total is back under half). A release costs nothing
// when nobody waits, and O(1) amortized when many do.
//
// Loop thread only: plain integers, no locks.
#pragma once

#include <cstddef>
#include <cstdint>

#include <boost/intrusive/list.hpp>

#include "proxy/io/asio.hpp"
#include "proxy/io/loop_signal.hpp"

namespace bscache::proxy {

// Bytes glibc's malloc takes for a block of `n` bytes: its 8-byte header,
// rounded up to 16, at least 32 (0 for no block).
constexpr size_t heap_block(size_t n) {
  if (n == 0) return 0;
  const size_t chunk = (n + 8 + 15) & ~size_t{15};
  return chunk < 32 ? 32 : chunk;
}

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
  bool fits(size_t more) const { return held_ + more <= limit_ || held_ == 0; }

  enum class Verdict : uint8_t {
    Go,        // take it
    Pressure,  // over half the limit and this client holds something: wait until it holds nothing
    Full,      // the limit cannot hold it: wait for memory to come back
  };
  // A session waiting for memory: its signal is notified when it should look again.
  class Waiter : public boost::intrusive::list_base_hook<boost::intrusive::link_mode<boost::intrusive::auto_unlink>> {
   public:
    explicit Waiter(LoopSignal& signal) : signal_(signal) {}

   private:
    friend class ClientMemory;
    LoopSignal& signal_;
    size_t more_ = 0;
    bool for_room_ = false;
  };

  // Whether the client of `waiter`, which holds `own` bytes, may take `more`.
  Verdict admit(const Waiter& waiter, size_t own, size_t more) const {
    if (own > 0 && held_ + more > limit_ / 2) return Verdict::Pressure;
    if (!fits(more)) return Verdict::Full;
    if (!room_waiters_.empty() && &room_waiters_.front() != &waiter) return Verdict::Full;  // not past those waiting
    return Verdict::Go;
  }
  // Registers `waiter` for a wake-up (a waiter of room keeps its place); `why`
  // is the verdict that stopped it, `more` what it wants.
  void wait(Waiter& waiter, Verdict why, size_t more);
  // The client of `waiter` was let go on (Go): it leaves the queue.
  void went(Waiter& waiter);

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
