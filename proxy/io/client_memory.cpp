#include "proxy/io/client_memory.hpp"

#include <unistd.h>

#include <algorithm>
#include <utility>

#include "proxy/io/memory_bound.hpp"

namespace bscache::proxy {

size_t default_client_memory() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  const size_t floor = size_t{256} << 20;
  if (pages <= 0 || page_size <= 0) return floor;
  return std::max(floor, static_cast<size_t>(pages) * static_cast<size_t>(page_size) / 4);
}

ClientMemory::ClientMemory(size_t limit) : limit_(limit) {}

size_t ClientMemory::take_peak() {
  return std::exchange(peak_, held_);
}

void ClientMemory::wait(Waiter& waiter, Verdict why, size_t more) {
  waiter.more_ = more;
  const bool for_room = why == Verdict::Full;
  if (waiter.is_linked() && waiter.for_room_ == for_room) return;  // keeps its place
  went(waiter);
  waiter.for_room_ = for_room;
  (for_room ? room_waiters_ : pressure_waiters_).push_back(waiter);
}

void ClientMemory::went(Waiter& waiter) {
  const bool was_first = !room_waiters_.empty() && &room_waiters_.front() == &waiter;
  waiter.unlink();
  if (was_first) wake();  // the next may fit too
}

// The first waiter of room looks again once its request fits (the others
// after it, in turn); waiters of the pressure rule once the total is back
// under half (until then only their own replies leaving can let them go on,
// and their sessions see those themselves).
void ClientMemory::wake() {
  if (!room_waiters_.empty() && fits(room_waiters_.front().more_)) room_waiters_.front().signal_.notify();
  if (held_ > limit_ / 2) return;
  while (!pressure_waiters_.empty()) {
    Waiter& waiter = pressure_waiters_.front();
    pressure_waiters_.pop_front();
    waiter.signal_.notify();
  }
}

}  // namespace bscache::proxy
