#include "cache/coherent_cache.hpp"

#include <algorithm>

namespace bscache::cache {

namespace {
using Interval = boost::icl::right_open_interval<uint64_t>;
}

CoherentCache::CoherentCache(CacheLimits limits, Clock clock) : cache_(limits, std::move(clock)) {}

void CoherentCache::complete_fetch(Ticket ticket, std::span<const Extent> extents, uint64_t clip_end) {
  const RangeSet taint = taint_.finish(ticket);
  for (const auto& e : extents) {
    const uint64_t end = std::min(e.end(), clip_end);
    if (e.offset >= end) continue;
    if (taint.empty()) {
      cache_.store(e.offset, end - e.offset, e.flags);
      continue;
    }
    // Only what no mutation could have changed under the fetch is stored.
    RangeSet clean;
    clean += Interval(e.offset, end);
    clean -= taint;
    for (const auto& piece : clean) cache_.store(piece.lower(), piece.upper() - piece.lower(), e.flags);
  }
}

CoherentCache::Ticket CoherentCache::begin_mutation(uint64_t offset, uint64_t length) {
  cache_.erase(offset, length);
  return taint_.begin_mutation(offset, length);
}

void CoherentCache::complete_mutation(Ticket ticket, uint64_t offset, uint64_t length,
                                      std::optional<uint32_t> state_after) {
  const RangeSet taint = taint_.finish(ticket);
  if (length == 0) return;
  if (!state_after) {
    cache_.erase(offset, length);
    return;
  }
  const Interval range(offset, offset + length);
  if (*state_after == 0 || !boost::icl::intersects(taint, range)) {
    cache_.store(offset, length, *state_after);
    return;
  }
  // An overlapping mutation ran concurrently and may have landed after this
  // one: claim nothing but "data" (always safe) where they overlap.
  cache_.store(offset, length, 0);
  RangeSet clean;
  clean += range;
  clean -= taint;
  for (const auto& piece : clean) cache_.store(piece.lower(), piece.upper() - piece.lower(), *state_after);
}

}  // namespace bscache::cache
