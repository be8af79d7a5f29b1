// CacheLimits: how much an extent cache may hold, and what that costs in
// memory. Plain data, apart from ExtentCache, so that option structs can
// name the limits without the interval map.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>

#include "cache/cache_budget.hpp"

namespace bscache::cache {

// Estimated heap bytes per cached interval: a std::map node holding
// (interval, value): 32 bytes of tree links and colour, 16 of interval, 8 of
// padded value, plus ~8 of malloc header. (Measured RSS, bench "memory": 75 bytes
// per extent at 10^6 extents in one window; 141 at 10^5 with every extent its own
// window, which kBytesPerSegment below accounts for.)
inline constexpr size_t kBytesPerInterval = 64;
// Per segment: a std::map node with its Segment (~80) and a list node (~32).
inline constexpr size_t kBytesPerSegment = 112;

// The most extents a cache may hold so that its memory estimate stays under
// `bytes` even if every extent were its own segment.
constexpr size_t max_extents_for_memory(uint64_t bytes) {
  return static_cast<size_t>(bytes / (kBytesPerInterval + kBytesPerSegment));
}

// Default --cache-max-memory: 256 MiB, i.e. 1,525,201 extents.
inline constexpr uint64_t kDefaultMaxMemory = uint64_t{256} << 20;

struct CacheLimits {
  // Most intervals (and most segments) kept before least recently used
  // segments are evicted. Default: what kDefaultMaxMemory holds, 1,525,201.
  size_t max_extents = max_extents_for_memory(kDefaultMaxMemory);
  // Entries older than this are treated as absent. Default: none (live forever).
  std::optional<std::chrono::nanoseconds> ttl;
  // Upstream may change the reported allocation of whole units of this size
  // around a write (nbdkit's memory plugin allocates 32 KiB pages, filesystems
  // whole blocks, qcow2 whole clusters): a mutation forgets its range rounded
  // out to this alignment. Used by CoherentCache. Default: 64 KiB.
  uint64_t allocation_granularity = uint64_t{64} * 1024;
  // Shared with other caches (one per export): the limit is then the
  // budget's, over all of them, and max_extents above is not used. Null: the
  // cache has a budget of its own, of max_extents.
  std::shared_ptr<CacheBudget> budget;
};

}  // namespace bscache::cache
