// CacheBudget: one extent limit shared by several ExtentCaches (one per
// export), so that --cache-max-extents bounds the sum over every export
// bscache serves. When a store takes the total over the limit, the least
// recently used segment among all the caches goes first, whichever cache it
// is in: a busy export can use the whole budget, an idle one gives it back.
//
// Recency is comparable across caches because every cache stamps its
// segments from the one counter here. Single-threaded, like the caches.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace bscache::cache {

class ExtentCache;

class CacheBudget {
 public:
  explicit CacheBudget(size_t max_extents) : max_extents_(std::max<size_t>(max_extents, 1)) {}
  CacheBudget(const CacheBudget&) = delete;
  CacheBudget& operator=(const CacheBudget&) = delete;

  size_t max_extents() const { return max_extents_; }
  // What the caches hold, each counted as it counts against the limit.
  size_t used() const;
  size_t caches() const { return members_.size(); }

 private:
  friend class ExtentCache;
  uint64_t next_tick() { return ++tick_; }

  size_t max_extents_;
  uint64_t tick_ = 0;
  std::vector<ExtentCache*> members_;  // every cache sharing the budget (they join and leave themselves)
};

}  // namespace bscache::cache
