#include "proxy/client_memory.hpp"

#include <unistd.h>

#include <algorithm>
#include <utility>

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

void ClientMemory::wait(Waiter& waiter, Verdict why) {
  if (waiter.is_linked()) waiter.unlink();
  (why == Verdict::Full ? room_waiters_ : pressure_waiters_).push_back(waiter);
}

// A waiter of room looks again after any release; a waiter of the pressure
// rule only once the total is back under half (until then only its own
// replies leaving can let it go on, and its session sees those itself).
void ClientMemory::wake() {
  const auto wake_all = [](Waiters& waiters) {
    while (!waiters.empty()) {
      Waiter& waiter = waiters.front();
      waiters.pop_front();
      waiter.timer_.cancel();
    }
  };
  wake_all(room_waiters_);
  if (held_ <= limit_ / 2) wake_all(pressure_waiters_);
}

}  // namespace bscache::proxy
