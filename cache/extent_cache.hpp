// ExtentCache: the interval map of known base:allocation states.
//
// Every byte range is either unknown (absent) or has exactly one flags value,
// including 0 ("data"), which ICL's default absorber would silently drop; we use
// partial_enricher with set() so 0 is kept and writes overwrite rather than
// aggregate. Adjacent equal values coalesce.
//
// Eviction and expiry work on *segments*: each contiguous stretch one store
// put into the cache (a fetched window, a mutation's range) is one segment,
// least recently used first. A later store over part of a segment carves it
// (what is left keeps its recency and stamp). Invariant: every segment's range
// is exactly covered by cached data, and all cached data lies in segments.
// Evicting by segment rather than by fixed regions of the address space means
// storing a window never evicts the window itself or the one being read: only
// least recently used windows go, and when what was just stored alone exceeds
// the limit, its beginning (nearest the query that caused it) is kept.
//
// The limit counts intervals and segments (the larger of the two must stay
// under it), so memory is bounded by max_extents * (per-interval + per-segment
// cost) whatever the workload (many small writes coalesce into few intervals
// but stay separate segments).
//
// With a TTL, every store carries a *stamp*: the moment the upstream command
// that established the state was sent (a block-status reply describes upstream
// at some moment after that, never before). A segment expires once its stamp
// is older than the TTL. A store whose stamp is already older than the TTL is
// refused: it would be stale the moment it became visible.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <optional>
#include <span>
#include <vector>

#include <memory>

#include <boost/icl/interval_map.hpp>

#include "cache/cache_budget.hpp"
#include "cache/extent.hpp"
#include "cache/limits.hpp"

namespace bscache::cache {

using TimePoint = std::chrono::steady_clock::time_point;
using Clock = std::function<TimePoint()>;

class ExtentCache {
 public:
  // `group`: caches of one owner (the meta contexts of one export) count as
  // one holder in planning_share(); null: this cache alone.
  explicit ExtentCache(CacheLimits limits = {}, Clock clock = &std::chrono::steady_clock::now,
                       const void* group = nullptr);
  ~ExtentCache();
  ExtentCache(const ExtentCache&) = delete;
  ExtentCache& operator=(const ExtentCache&) = delete;

  // The cache's clock: stamps must come from it.
  TimePoint now() const { return clock_(); }

  // Records that [offset, offset+length) has `flags`, as upstream described it
  // no earlier than `stamp`, replacing what was there: one segment. Returns
  // false (and stores nothing) if a TTL is set and `stamp` is already older.
  bool store(uint64_t offset, uint64_t length, uint32_t flags, TimePoint stamp);
  // The same for a run of extents (sorted, non-overlapping, gaps allowed):
  // each contiguous stretch becomes one segment.
  bool store(std::span<const Extent> run, TimePoint stamp);
  // Forgets [offset, offset+length).
  void erase(uint64_t offset, uint64_t length);
  void clear();

  // Appends to `out` the consecutive cached extents starting exactly at `offset`
  // (the first one clipped to start there), stopping at the first gap, at
  // `offset + limit`, or after `max_count` extents. Returns how many were added;
  // 0 means `offset` is not cached.
  size_t lookup(uint64_t offset, uint64_t limit, std::vector<Extent>& out, size_t max_count);

  size_t extent_count() const { return map_.iterative_size(); }
  size_t segment_count() const { return segments_.size(); }
  // The limit: this cache's own, or the one it shares.
  size_t max_extents() const { return budget_->max_extents(); }
  // The part of the limit to size windows for: all of it while no other
  // group of caches sharing the budget holds anything, else an equal share,
  // so that exports scanning at once do not evict each other's windows
  // before use. (An export's meta contexts are one group: its windows are
  // sized for all of them together.)
  size_t planning_share() const;
  // What this cache counts against the limit: the larger of its intervals and segments.
  size_t charge() const { return std::max(map_.iterative_size(), segments_.size()); }
  // Approximate heap bytes held by the map and the segment bookkeeping.
  size_t memory_bytes() const;
  uint64_t evictions() const { return evictions_; }
  uint64_t expirations() const { return expirations_; }
  // For tests: every segment is exactly covered by data, all data lies in
  // segments, and the LRU list names every segment once.
  bool invariants_hold() const;

 private:
  using Map =
      boost::icl::interval_map<uint64_t, uint32_t, boost::icl::partial_enricher, std::less, boost::icl::inplace_plus,
                               boost::icl::inter_section, boost::icl::right_open_interval<uint64_t>>;
  struct Segment {
    uint64_t end = 0;
    TimePoint stamp;
    uint64_t generation = 0;  // which store() call made it
    uint64_t last_used = 0;   // the budget's tick when stored or last looked up: recency across caches
    std::list<uint64_t>::iterator lru_pos;
  };
  using Segments = std::map<uint64_t, Segment>;  // by start offset; disjoint

  bool too_old(TimePoint stamp) const;
  bool over_limit() const;
  Segments::iterator segment_at(uint64_t offset);
  void add_segment(uint64_t start, uint64_t end, TimePoint stamp, uint64_t generation, uint64_t last_used,
                   std::list<uint64_t>::iterator lru_before);
  // The tick of this cache's least recently used segment; nullopt if there
  // is none, or (spare_newest: the cache storing now) it is of the store in progress.
  std::optional<uint64_t> evictable_tick(bool spare_newest) const;
  void evict_least_recent();
  Segments::iterator remove_segment(Segments::iterator it);
  void drop(Segments::iterator it);  // its data too
  void carve(uint64_t start, uint64_t end);
  void touch(Segment& segment);
  void evict_to_limit();
  void trim_last_segment();

  CacheLimits limits_;
  std::shared_ptr<CacheBudget> budget_;  // limits_.budget, or one of our own
  const void* group_;                    // see the constructor
  Clock clock_;
  Map map_;
  Segments segments_;
  std::list<uint64_t> lru_;  // segment start offsets, most recently used first
  uint64_t generation_ = 0;
  uint64_t evictions_ = 0;
  uint64_t expirations_ = 0;
};

}  // namespace bscache::cache
