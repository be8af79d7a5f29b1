// ExtentCache: the interval map of known base:allocation states.
//
// Every byte range is either unknown (absent) or has exactly one flags value,
// including 0 ("data"), which ICL's default absorber would silently drop; we use
// partial_enricher with set() so 0 is kept and writes overwrite rather than
// aggregate. Adjacent equal values coalesce.
//
// Memory is bounded by a maximum number of stored intervals. Eviction works on
// fixed-size granules of the address space, least recently used first: a granule
// is touched by every lookup and store that covers it.
//
// With a TTL, every store carries a *stamp*: the moment the upstream command
// that established the state was sent (a block-status reply describes upstream
// at some moment after that, never before). A granule remembers the oldest
// stamp stored into it and expires once that stamp is older than the TTL
// (conservative: a granule may expire early, never late). A store whose stamp
// is already older than the TTL is refused: it would be stale the moment it
// became visible.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <list>
#include <optional>
#include <unordered_map>
#include <vector>

#include <boost/icl/interval_map.hpp>

#include "cache/extent.hpp"

namespace bscache::cache {

struct CacheLimits {
  // Most intervals kept before least recently used granules are evicted.
  // Default: 1,000,000 (about 64 MB: memory_bytes() counts 64 bytes per
  // interval, which is what the heap holds; the README measured 75 bytes of
  // resident memory per extent).
  size_t max_extents = 1'000'000;
  // Size of an eviction/expiry granule in bytes. Default: 1 GiB.
  uint64_t granule_bytes = uint64_t{1} << 30;
  // Entries older than this are treated as absent. Default: none (live forever).
  std::optional<std::chrono::nanoseconds> ttl;
  // Upstream may change the reported allocation of whole units of this size
  // around a write (nbdkit's memory plugin allocates 32 KiB pages, filesystems
  // whole blocks, qcow2 whole clusters): a mutation forgets its range rounded
  // out to this alignment. Used by CoherentCache. Default: 64 KiB.
  uint64_t allocation_granularity = uint64_t{64} * 1024;
};

using TimePoint = std::chrono::steady_clock::time_point;
using Clock = std::function<TimePoint()>;

class ExtentCache {
 public:
  explicit ExtentCache(CacheLimits limits = {}, Clock clock = &std::chrono::steady_clock::now);

  // The cache's clock: stamps must come from it.
  TimePoint now() const { return clock_(); }

  // Records that [offset, offset+length) has `flags`, as upstream described it
  // no earlier than `stamp`, replacing what was there. Returns false (and
  // stores nothing) if a TTL is set and `stamp` is already older than it.
  bool store(uint64_t offset, uint64_t length, uint32_t flags, TimePoint stamp);
  // Forgets [offset, offset+length).
  void erase(uint64_t offset, uint64_t length);
  void clear();

  // Appends to `out` the consecutive cached extents starting exactly at `offset`
  // (the first one clipped to start there), stopping at the first gap, at
  // `offset + limit`, or after `max_count` extents. Returns how many were added;
  // 0 means `offset` is not cached.
  size_t lookup(uint64_t offset, uint64_t limit, std::vector<Extent>& out, size_t max_count);

  size_t extent_count() const { return map_.iterative_size(); }
  // Approximate heap bytes held by the map and the granule bookkeeping.
  size_t memory_bytes() const;
  uint64_t evictions() const { return evictions_; }
  uint64_t expirations() const { return expirations_; }

 private:
  using Map =
      boost::icl::interval_map<uint64_t, uint32_t, boost::icl::partial_enricher, std::less, boost::icl::inplace_plus,
                               boost::icl::inter_section, boost::icl::right_open_interval<uint64_t>>;
  struct Granule {
    std::list<uint64_t>::iterator lru_pos;
    TimePoint oldest_stamp;  // of everything stored here since the granule was created
  };

  bool too_old(TimePoint stamp) const;
  void touch(uint64_t offset, uint64_t end, std::optional<TimePoint> stored_stamp);
  bool is_stale(uint64_t granule) const;
  void expire_if_stale(uint64_t offset);
  void evict_to_limit();
  void erase_granule(uint64_t index);

  CacheLimits limits_;
  Clock clock_;
  Map map_;
  std::list<uint64_t> lru_;  // granule indexes, most recently used first
  std::unordered_map<uint64_t, Granule> granules_;
  uint64_t evictions_ = 0;
  uint64_t expirations_ = 0;
};

}  // namespace bscache::cache
