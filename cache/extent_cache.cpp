#include "cache/extent_cache.hpp"

#include <algorithm>
#include <limits>

namespace bscache::cache {

namespace {
using Interval = boost::icl::right_open_interval<uint64_t>;

uint64_t saturating_add(uint64_t a, uint64_t b) {
  return b > std::numeric_limits<uint64_t>::max() - a ? std::numeric_limits<uint64_t>::max() : a + b;
}
}  // namespace

ExtentCache::ExtentCache(CacheLimits limits, Clock clock) : limits_(limits), clock_(std::move(clock)) {
  if (limits_.granule_bytes == 0) limits_.granule_bytes = uint64_t{1} << 30;
}

bool ExtentCache::store(uint64_t offset, uint64_t length, uint32_t flags, TimePoint stamp) {
  if (length == 0) return true;
  if (too_old(stamp)) return false;
  const uint64_t end = saturating_add(offset, length);
  // Data stored into a stale granule would inherit its age: expire it first.
  if (limits_.ttl) {
    for (uint64_t g = offset / limits_.granule_bytes; g <= (end - 1) / limits_.granule_bytes; ++g) {
      expire_if_stale(g * limits_.granule_bytes);
    }
  }
  map_.set(std::make_pair(Interval(offset, end), flags));
  touch(offset, end, stamp);
  evict_to_limit();
  return true;
}

void ExtentCache::erase(uint64_t offset, uint64_t length) {
  if (length == 0) return;
  map_.erase(Interval(offset, saturating_add(offset, length)));
}

void ExtentCache::clear() {
  map_.clear();
  lru_.clear();
  granules_.clear();
}

size_t ExtentCache::lookup(uint64_t offset, uint64_t limit, std::vector<Extent>& out, size_t max_count) {
  if (limit == 0 || max_count == 0) return 0;
  expire_if_stale(offset);
  auto it = map_.find(offset);
  if (it == map_.end()) return 0;
  const uint64_t end = saturating_add(offset, limit);
  uint64_t pos = offset;
  uint64_t granule = offset / limits_.granule_bytes;
  std::optional<uint64_t> stale_granule;
  size_t added = 0;
  while (it != map_.end() && added < max_count && pos < end) {
    if (it->first.lower() > pos) break;  // a gap: the run ends here
    if (limits_.ttl && pos / limits_.granule_bytes != granule) {
      granule = pos / limits_.granule_bytes;
      if (is_stale(granule)) {
        stale_granule = granule;
        break;
      }
    }
    // Do not run past the granule boundary unchecked: clip to it under a TTL.
    uint64_t piece_end = std::min(it->first.upper(), end);
    if (limits_.ttl) piece_end = std::min(piece_end, (granule + 1) * limits_.granule_bytes);
    if (!out.empty() && added > 0 && out.back().flags == it->second && out.back().end() == pos) {
      out.back().length += piece_end - pos;  // the same interval split at a granule boundary
    } else {
      out.push_back({pos, piece_end - pos, it->second});
      ++added;
    }
    pos = piece_end;
    if (pos >= it->first.upper()) ++it;
  }
  touch(offset, pos, std::nullopt);
  if (stale_granule) {
    erase_granule(*stale_granule);
    ++expirations_;
  }
  return added;
}

size_t ExtentCache::memory_bytes() const {
  // A std::map node holding (interval, value): 32 bytes of tree links and
  // colour, 16 of interval, 8 of padded value, plus ~8 of malloc header.
  // A granule: a list node (24 + 8) and an unordered_map node with its
  // bucket (~64).
  constexpr size_t kPerInterval = 64;
  constexpr size_t kPerGranule = 104;
  return map_.iterative_size() * kPerInterval + granules_.size() * kPerGranule;
}

bool ExtentCache::too_old(TimePoint stamp) const {
  return limits_.ttl && clock_() - stamp > *limits_.ttl;
}

bool ExtentCache::is_stale(uint64_t granule) const {
  if (!limits_.ttl) return false;
  auto it = granules_.find(granule);
  return it != granules_.end() && too_old(it->second.oldest_stamp);
}

void ExtentCache::expire_if_stale(uint64_t offset) {
  const uint64_t granule = offset / limits_.granule_bytes;
  if (is_stale(granule)) {
    erase_granule(granule);
    ++expirations_;
  }
}

void ExtentCache::touch(uint64_t offset, uint64_t end, std::optional<TimePoint> stored_stamp) {
  if (end <= offset) return;
  for (uint64_t g = offset / limits_.granule_bytes; g <= (end - 1) / limits_.granule_bytes; ++g) {
    auto it = granules_.find(g);
    if (it == granules_.end()) {
      if (!stored_stamp) continue;  // lookups only touch granules that hold data
      lru_.push_front(g);
      granules_.emplace(g, Granule{lru_.begin(), *stored_stamp});
      continue;
    }
    // A slow fetch may deliver an older stamp than what the granule holds:
    // the granule is as old as the oldest state in it.
    if (stored_stamp) it->second.oldest_stamp = std::min(it->second.oldest_stamp, *stored_stamp);
    if (it->second.lru_pos != lru_.begin()) lru_.splice(lru_.begin(), lru_, it->second.lru_pos);
  }
}

void ExtentCache::evict_to_limit() {
  // The most recently used granule is never evicted: it holds what was just
  // stored. A single granule may therefore exceed the limit on its own.
  while (map_.iterative_size() > limits_.max_extents && lru_.size() > 1) {
    erase_granule(lru_.back());
    ++evictions_;
  }
}

void ExtentCache::erase_granule(uint64_t index) {
  const uint64_t start = index * limits_.granule_bytes;
  map_.erase(Interval(start, saturating_add(start, limits_.granule_bytes)));
  if (auto it = granules_.find(index); it != granules_.end()) {
    lru_.erase(it->second.lru_pos);
    granules_.erase(it);
  }
}

}  // namespace bscache::cache
